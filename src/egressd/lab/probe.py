"""A device's view: one request through a PoP, run inside a lab namespace, JSON on stdout.

`http`: GET a URL through the PoP's HTTP proxy with httpx (a real client, part of the
install); the answer is the echo's trace as a dict. `udp`: one datagram through SOCKS5 UDP
ASSOCIATE (RFC 1928 §7, with RFC 1929 login) to a UDP echo; the answer is its reply. The
device credential is read from a 0600 file so it never appears on a command line.

IPv6 literals go through SOCKS5 CONNECT instead (see `socks5_http_probe`).

`dns`: one query to the PoP's resolver on port 53.

Run: ``python -m egressd.lab.probe http|socks5-http PROXY CREDENTIALS_FILE URL``
     ``python -m egressd.lab.probe dns POP_ADDRESS NAME TYPE``
     ``python -m egressd.lab.probe udp PROXY CREDENTIALS_FILE HOST PORT``
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from egressd.protocols.socks5 import build_udp_datagram, encode_address, parse_udp_datagram

TIMEOUT = 5.0


def parse_trace(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def http_probe(proxy: str, credentials: str, url: str) -> dict[str, Any]:
    user, _, secret = credentials.partition(":")
    host_port = proxy.removeprefix("http://")
    started = time.monotonic()
    try:
        with httpx.Client(proxy=f"http://{user}:{secret}@{host_port}", timeout=TIMEOUT, trust_env=False) as client:
            response = client.get(url)
    except httpx.HTTPError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result: dict[str, Any] = {"ok": response.status_code == 200, "status": response.status_code,
                              "ms": round((time.monotonic() - started) * 1000, 1)}
    if response.status_code == 200:
        result["trace"] = parse_trace(response.text)
    else:
        result["error"] = response.text.strip()[:300]
    return result


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the PoP closed the SOCKS5 connection")
        data += chunk
    return data


def _read_bound(sock: socket.socket) -> tuple[str, int]:
    kind = _read_exactly(sock, 1)[0]
    if kind == 1:
        host = socket.inet_ntop(socket.AF_INET, _read_exactly(sock, 4))
    elif kind == 4:
        host = socket.inet_ntop(socket.AF_INET6, _read_exactly(sock, 16))
    else:
        host = _read_exactly(sock, _read_exactly(sock, 1)[0]).decode()
    return host, struct.unpack("!H", _read_exactly(sock, 2))[0]


class ProbeFailure(Exception):
    pass


def _socks5_open(proxy: str, credentials: str, command: int, host: str, port: int,
                 ) -> tuple[socket.socket, tuple[str, int]]:
    """Login (RFC 1929) and one request; the control socket and the bound address."""
    user, _, secret = credentials.partition(":")
    proxy_host, _, proxy_port = proxy.removeprefix("socks5://").rpartition(":")
    try:
        control = socket.create_connection((proxy_host, int(proxy_port)), timeout=TIMEOUT)
    except OSError as exc:
        raise ProbeFailure(f"cannot reach the PoP: {exc}") from None
    try:
        control.sendall(b"\x05\x01\x02")
        if _read_exactly(control, 2) != b"\x05\x02":
            raise ProbeFailure("the PoP did not offer username/password")
        name, password = user.encode(), secret.encode()
        control.sendall(bytes([1, len(name)]) + name + bytes([len(password)]) + password)
        if _read_exactly(control, 2) != b"\x01\x00":
            raise ProbeFailure("SOCKS5 login refused")
        control.sendall(bytes([5, command, 0]) + encode_address(host, port))
        _version, reply, _reserved = _read_exactly(control, 3)
        bound = _read_bound(control)
        if reply != 0:
            raise ProbeFailure(f"SOCKS5 request refused with reply {reply:#04x}")
    except BaseException:
        control.close()
        raise
    return control, bound


def socks5_http_probe(proxy: str, credentials: str, url: str) -> dict[str, Any]:
    """GET through a SOCKS5 CONNECT: for IPv6 literals, which httpx 0.28 sends to an HTTP
    proxy without their brackets (`GET http://2001:db8::1/`), a request a strict proxy refuses."""
    target = httpx.URL(url)
    host, port = target.host, target.port or 80
    started = time.monotonic()
    try:
        sock, _bound = _socks5_open(proxy, credentials, 1, host, port)
        with sock:
            authority = f"[{host}]" if ":" in host else host
            sock.sendall(f"GET {target.raw_path.decode()} HTTP/1.1\r\nHost: {authority}\r\n"
                         "Connection: close\r\nUser-Agent: egressd-lab-probe\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except (ProbeFailure, OSError) as exc:
        return {"ok": False, "error": str(exc)}
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
    result: dict[str, Any] = {"ok": status == 200, "status": status,
                              "ms": round((time.monotonic() - started) * 1000, 1)}
    if status == 200:
        result["trace"] = parse_trace(body.decode(errors="replace"))
    else:
        result["error"] = f"HTTP status {status}"
    return result


def udp_probe(proxy: str, credentials: str, host: str, port: int) -> dict[str, Any]:
    try:
        datagrams = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as exc:
        return {"ok": False, "error": str(exc)}
    with datagrams:
        try:
            datagrams.settimeout(TIMEOUT)
            datagrams.bind(("0.0.0.0", 0))
            control, relay = _socks5_open(proxy, credentials, 3, "0.0.0.0", 0)
        except (ProbeFailure, OSError) as exc:
            return {"ok": False, "error": str(exc)}
        with control:
            try:
                datagrams.sendto(build_udp_datagram(host, port, b"egressd lab probe"), relay)
                answer = parse_udp_datagram(datagrams.recv(65535))
            except (OSError, ValueError) as exc:
                return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    fields = answer.payload.decode(errors="replace").split()
    result: dict[str, Any] = {"ok": True, "reply": " ".join(fields)}
    if fields:
        result["trace"] = {"ip": fields[0], **parse_trace("\n".join(fields[2:]))}
    return result


def dns_probe(server: str, name: str, kind: str) -> dict[str, Any]:
    """One query to the PoP's resolver on port 53 (UDP), as a device's stub would send it."""
    import dns.exception
    import dns.message
    import dns.query
    import dns.rcode

    try:
        response = dns.query.udp(dns.message.make_query(name, kind), server, timeout=TIMEOUT)
    except (dns.exception.DNSException, OSError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    answers = [rdata.to_text() for rrset in response.answer for rdata in rrset]
    rcode = dns.rcode.to_text(response.rcode())
    return {"ok": rcode == "NOERROR" and bool(answers), "rcode": rcode, "answer": answers}


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "dns":
        print(json.dumps(dns_probe(argv[1], argv[2], argv[3])))
        return 0
    if len(argv) < 4 or argv[0] not in ("http", "socks5-http", "udp"):
        print(__doc__, file=sys.stderr)
        return 2
    credentials = Path(argv[2]).read_text(encoding="utf-8").strip()
    if argv[0] == "http":
        result = http_probe(argv[1], credentials, argv[3])
    elif argv[0] == "socks5-http":
        result = socks5_http_probe(argv[1], credentials, argv[3])
    else:
        result = udp_probe(argv[1], credentials, argv[3], int(argv[4]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
