"""HTTP forwarding (absolute-form requests) and tunnel set-up details with real clients: the
origin gets a clean request (Via, no proxy credentials), bodies and responses of every
framing pass intact, early data is not lost, upstream failures get precise answers."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from .helpers import (
    basic,
    by_client_port,
    close_writer,
    credentials,
    curl,
    host_port,
    http_get,
    local_port,
    no_leaks,
    open_tcp,
    pop_plain,
    read_all,
    read_response,
    socks5_address,
    socks5_connect,
    tcp_server,
    wait_flow,
)

ORIGIN_HOST = "127.0.9.2"  # inside serve.toml's allowed 127.0.9.0/24, not the echo
BIG = bytes(range(256)) * 1171 + b"x" * 224  # 300,000 bytes


class Origin:
    """A scripted HTTP/1.1 origin: records every request head (and body) it gets."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lines = head.split(b"\r\n")
            fields = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
                      for line in lines[1:] if b":" in line}
            path = lines[0].split()[1]
            body = b""
            if path == b"/continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if b"content-length" in fields:
                body = await reader.readexactly(int(fields[b"content-length"]))
            elif fields.get(b"transfer-encoding") == b"chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    chunk = await reader.readexactly(size + 2)
                    body += chunk[:-2]
                    if size == 0:
                        break
            self.requests.append((head, body))
            answer = {
                b"/until-close": b"HTTP/1.1 200 OK\r\n\r\nbody until close",
                b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
                b"/big": b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + BIG,
                b"/head": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
                b"/204": b"HTTP/1.1 204 No Content\r\n\r\n",
            }.get(path, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            writer.write(answer)
            await writer.drain()
            if path == b"/until-close":
                return


@pytest.fixture
async def origin() -> Any:
    scripted = Origin()
    async with tcp_server(ORIGIN_HOST, scripted.handle) as address:
        yield scripted, f"http://{address[0]}:{address[1]}"


async def through_las(info: dict[str, Any], *args: str) -> Any:
    return await curl("-K", info["accounts"]["acme"]["curlrc"], "-x", info["pops"]["las"]["http_proxy"], *args)


async def test_origin_sees_via_and_never_the_proxy_credentials(serve: dict[str, Any], origin: Any) -> None:
    scripted, base = origin
    result = await through_las(serve, "-H", "X-Custom: kept", base + "/plain")
    assert result.status == 200 and result.headers["via"] == "1.1 egressd"
    head = scripted.requests[0][0].lower()
    assert b"proxy-authorization" not in head
    assert b"via: 1.1 egressd" in head and b"x-custom: kept" in head
    assert head.startswith(b"get /plain http/1.1\r\n")  # origin-form toward the origin


@pytest.mark.parametrize(("path", "args", "status", "body"), [
    ("/until-close", [], 200, b"body until close"),
    ("/chunked", [], 200, b"hello world"),
    ("/big", [], 200, BIG),
    ("/head", ["-I"], 200, b""),
    ("/204", [], 204, b""),
    ("/continue", ["-H", "Expect: 100-continue", "--data-binary", "b" * 5000], 200, b"b" * 5000),
    ("/echo", ["-H", "Transfer-Encoding: chunked", "--data-binary", "chunked body"], 200, b"chunked body"),
    ("/echo", ["--data-binary", "fixed body"], 200, b"fixed body"),
], ids=["until-close", "chunked-response", "big", "head", "204", "100-continue", "chunked-request",
        "fixed-request"])
async def test_response_and_request_framings_pass_intact(
    serve: dict[str, Any], origin: Any, path: str, args: list[str], status: int, body: bytes,
) -> None:
    _scripted, base = origin
    result = await through_las(serve, *args, base + path)
    assert result.returncode == 0, result.stderr
    assert result.status == status
    assert len(result.body) == len(body) and result.body == body


async def test_407_then_credentials_on_the_same_keep_alive_connection(serve: dict[str, Any]) -> None:
    reader, writer = await open_tcp(pop_plain(serve))
    try:
        request = f"GET {serve['echo']['http']} HTTP/1.1\r\nHost: 127.0.9.1\r\n"
        writer.write((request + "\r\n").encode())
        first = await read_response(reader)
        assert first.status == 407 and first.headers.get("connection") != "close"
        auth = f"Proxy-Authorization: {basic(*credentials(serve, 'acme'))}\r\n"
        writer.write((request + auth + "\r\n").encode())
        second = await read_response(reader)
        assert second.status == 200 and second.body == b"127.0.2.100\n"
    finally:
        await close_writer(writer)


async def test_connect_with_early_data_in_the_same_segment(serve: dict[str, Any]) -> None:
    """A client that sends its first tunnel bytes right after the CONNECT head."""
    echo_host, echo_port = host_port(serve["echo"]["http"])
    reader, writer = await open_tcp(pop_plain(serve))
    try:
        writer.write((f"CONNECT {echo_host}:{echo_port} HTTP/1.1\r\nHost: {echo_host}:{echo_port}\r\n"
                      f"Proxy-Authorization: {basic(*credentials(serve, 'acme'))}\r\n\r\n"
                      "GET /trace HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n").encode())
        answer = await read_all(reader)
    finally:
        await close_writer(writer)
    assert answer.startswith(b"HTTP/1.1 200 Connection Established\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert b"ip=127.0.2.100\n" in answer


async def test_socks5_dialogue_pipelined_in_one_segment(serve: dict[str, Any]) -> None:
    """Greeting, credentials, request and the first tunnel bytes in one write."""
    echo_host, echo_port = host_port(serve["echo"]["http"])
    user, password = (part.encode() for part in credentials(serve, "acme"))
    reader, writer = await open_tcp(pop_plain(serve))
    try:
        writer.write(b"\x05\x01\x02" + bytes([1, len(user)]) + user + bytes([len(password)]) + password
                     + b"\x05\x01\x00" + socks5_address(echo_host, echo_port)
                     + b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
        answer = await read_all(reader)
    finally:
        await close_writer(writer)
    assert answer[:4] == b"\x05\x02\x01\x00"  # method, auth ok
    assert answer[4:7] == b"\x05\x00\x00"  # request granted
    assert answer[7:12] == b"\x01\x7f\x00\x02\x64"  # BND.ADDR: the upstream socket's 127.0.2.100
    assert answer.endswith(b"\r\n\r\n127.0.2.100\n")


async def test_upstream_refusing_is_502_and_socks5_reply_5(serve: dict[str, Any]) -> None:
    """127.0.9.1:1 is allowed but nothing listens: the origin's refusal reaches the client."""
    response, port = await http_get(pop_plain(serve), "http://127.0.9.1:1/", credentials(serve, "acme"))
    assert response.status == 502 and b"refused" in response.body
    flow = await wait_flow(serve["flow_log"], by_client_port(port))
    assert flow["outcome"] == "upstream-error" and flow["egress_pop"] == "lax"
    reply, _reader, writer = await socks5_connect(pop_plain(serve), credentials(serve, "globex"), "127.0.9.1", 1)
    await close_writer(writer)
    assert reply == 0x05
    flow = await wait_flow(serve["flow_log"], by_client_port(local_port(writer)))
    assert flow["outcome"] == "upstream-error" and flow["account"] == "globex"


# --- broken upstream responses -----------------------------------------------------------


async def broken_origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    path = head.split()[1]
    if path == b"/short":  # promises 100 bytes, sends 50, closes
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 50)
    elif path == b"/bad-chunk":  # head and a malformed chunk in one segment
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n")
    elif path == b"/bad-head":
        writer.write(b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n")
    await writer.drain()


def via_listener(info: dict[str, Any], listener: str) -> list[str]:
    if listener == "tls":
        return ["--proxy", info["pops"]["las"]["https_proxy"], "--proxy-cacert", info["ca_cert"]]
    return ["-x", info["pops"]["las"]["http_proxy"]]


@pytest.mark.parametrize("listener", [
    "plain",
    "tls",
])
async def test_upstream_closing_mid_body_is_never_completed_with_foreign_bytes(
    serve: dict[str, Any], listener: str,
) -> None:
    async with tcp_server(ORIGIN_HOST, broken_origin) as address:
        result = await curl("-K", serve["accounts"]["acme"]["curlrc"], *via_listener(serve, listener),
                            f"http://{address[0]}:{address[1]}/short")
    assert result.returncode == 18, result  # "transfer closed with outstanding read data remaining"
    assert result.statuses == [200] and result.body == b"a" * 50
    flow = await wait_flow(serve["flow_log"], lambda flow: flow["outcome"] != "ok")
    assert flow["outcome"] == "protocol-error" and flow["bytes_down"] == 50


@pytest.mark.parametrize("listener", ["plain", "tls"])
async def test_malformed_upstream_head_is_502(serve: dict[str, Any], listener: str) -> None:
    async with tcp_server(ORIGIN_HOST, broken_origin) as address:
        result = await curl("-K", serve["accounts"]["acme"]["curlrc"], *via_listener(serve, listener),
                            f"http://{address[0]}:{address[1]}/bad-head")
    assert result.statuses == [502] and b"without a colon" in result.body


async def test_malformed_upstream_body_in_the_head_segment_is_502(serve: dict[str, Any]) -> None:
    """No byte of the response went out yet, so the client gets a clean 502 (not an empty
    reply): the framing of body bytes that arrive with the head is checked first."""
    async with tcp_server(ORIGIN_HOST, broken_origin) as address:
        result = await curl("-K", serve["accounts"]["acme"]["curlrc"], *via_listener(serve, "plain"),
                            f"http://{address[0]}:{address[1]}/bad-chunk")
    assert result.statuses == [502], result


async def test_malformed_upstream_body_is_an_error_for_the_client_of_the_tls_listener(
    serve: dict[str, Any],
) -> None:
    async with tcp_server(ORIGIN_HOST, broken_origin) as address:
        result = await curl("-K", serve["accounts"]["acme"]["curlrc"], *via_listener(serve, "tls"),
                            f"http://{address[0]}:{address[1]}/bad-chunk")
    # The body bytes that came with the head are checked before the head is sent: a 502.
    assert result.statuses == [502], result
    flow = await wait_flow(serve["flow_log"], lambda flow: flow["outcome"] != "ok")
    assert flow["outcome"] == "protocol-error"


# --- one client connection, many requests -------------------------------------------------


def get(url: str, auth: tuple[str, str] | None, *, close: bool = False) -> bytes:
    authority = url.split("://", 1)[1].split("/", 1)[0]
    lines = [f"GET {url} HTTP/1.1", f"Host: {authority}"]
    if auth is not None:
        lines.append(f"Proxy-Authorization: {basic(*auth)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_pipelined_requests_are_answered_in_order(serve: dict[str, Any], origin: Any) -> None:
    _scripted, base = origin
    auth = credentials(serve, "acme")
    async with no_leaks():
        reader, writer = await open_tcp(pop_plain(serve))
        try:
            writer.write(get(serve["echo"]["http"], auth) + get(base + "/chunked", auth)
                         + get(serve["echo"]["trace"], auth, close=True))
            first = await read_response(reader)
            head = await read_response(reader, body=False)
            chunked = await reader.readuntil(b"0\r\n\r\n")
            third = await read_response(reader)
            assert await read_all(reader) == b""
        finally:
            await close_writer(writer)
    assert first.body == b"127.0.2.100\n"
    assert head.headers["transfer-encoding"] == "chunked" and chunked.endswith(b"world\r\n0\r\n\r\n")
    assert b"ip=127.0.2.100\n" in third.body


async def test_connect_and_local_requests_after_forwarded_ones_on_one_connection(
    serve: dict[str, Any],
) -> None:
    """The forwarding path hands the connection back for a CONNECT or a PoP endpoint."""
    auth = credentials(serve, "acme")
    echo_host, echo_port = host_port(serve["echo"]["http"])
    # A tunnel borrows a pipe from the PoP's pool and gives it back (kept for reuse): fill
    # the pool first, so that the leak check counts what this connection leaves behind.
    await curl("-K", serve["accounts"]["acme"]["curlrc"], "-p", "-x", serve["pops"]["las"]["http_proxy"],
               serve["echo"]["http"])
    async with no_leaks():
        reader, writer = await open_tcp(pop_plain(serve))
        try:
            writer.write(get(serve["echo"]["http"], auth))
            assert (await read_response(reader)).body == b"127.0.2.100\n"
            writer.write(b"GET /health HTTP/1.1\r\nHost: pop\r\n\r\n")
            assert (await read_response(reader)).status == 200
            writer.write(get(serve["echo"]["http"], credentials(serve, "globex")))
            assert (await read_response(reader)).body.strip().decode() in serve["pops"]["las"]["shared_ipv4"]
            writer.write((f"CONNECT {echo_host}:{echo_port} HTTP/1.1\r\nHost: {echo_host}:{echo_port}\r\n"
                          f"Proxy-Authorization: {basic(*auth)}\r\n\r\n").encode())
            assert (await read_response(reader, body=False)).status == 200
            writer.write(b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
            tunnelled = await read_all(reader)
        finally:
            await close_writer(writer)
    assert tunnelled.startswith(b"HTTP/1.1 200 OK") and tunnelled.endswith(b"\r\n\r\n127.0.2.100\n")


async def test_20_mb_upload_and_download_through_absolute_form(serve: dict[str, Any], origin: Any) -> None:
    """A POST body and its echo, 20 MB each way, through the forwarding path."""
    _scripted, base = origin
    payload = hashlib.sha256(b"seed").digest() * (20 * 1024 * 1024 // 32)
    reader, writer = await open_tcp(pop_plain(serve))
    try:
        writer.write((f"POST {base}/echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n"
                      f"Proxy-Authorization: {basic(*credentials(serve, 'acme'))}\r\n\r\n").encode())

        async def upload() -> None:
            view = memoryview(payload)
            for offset in range(0, len(view), 1 << 20):
                writer.write(view[offset:offset + (1 << 20)])
                await writer.drain()

        async with asyncio.timeout(60), asyncio.TaskGroup() as group:
            group.create_task(upload())
            response = group.create_task(read_response(reader, body=False))
        head = response.result()
        assert head.status == 200 and int(head.headers["content-length"]) == len(payload)
        digest = hashlib.sha256()
        remaining = len(payload)
        async with asyncio.timeout(60):
            while remaining:
                chunk = await reader.read(min(remaining, 1 << 18))
                assert chunk, "connection closed before the end of the response"
                digest.update(chunk)
                remaining -= len(chunk)
    finally:
        await close_writer(writer)
    assert digest.digest() == hashlib.sha256(payload).digest()
