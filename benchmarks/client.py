"""The added latency of the device client's hop (issue 7): local proxy -> one device link
-> PoP, against going straight to the PoP's HTTP proxy, and against no proxy at all.

Real processes on loopback: `egressd serve` (three PoPs with device links, the control
plane), `egressd client run` enrolled as a globex device (shared egress: the flow leaves
the connected PoP itself, so no simulated backbone delay is added), and an echo origin in
this process on 127.0.9.2 (inside serve's allowed destinations). The straight path uses
the same PoP the client attached to, with the device's own credential.

Three paths, interleaved in every round (the order rotates):

- `no_proxy`: a TCP connection to the origin;
- `pop`: an HTTP CONNECT tunnel through the PoP's plain listener (Proxy-Authorization);
- `pop_tls`: the same through the PoP's HTTPS proxy listener (a TLS handshake per flow:
  what a device talking TLS to its PoP pays without a multiplexed link);
- `client`: an HTTP CONNECT tunnel through the client's local proxy (a stream of the
  client's one TLS + HTTP/2 connection to the PoP).

Per path: (a) `open_ms`: CONNECT + a 1-byte request and its echo on a new tunnel (p50, p99
over every flow); (b) `rr_us`: 1-byte round trips on an open tunnel (p50, p99). Every
tunnel checks that the origin saw the PoP's shared address (`source_ok`).

Prints one JSON line on stdout (the figures, `added` = client - pop, and the ratios
client/pop) and a summary on stderr. Loopback and a shared machine: quote the differences
and ratios, not the absolute figures.

    python benchmarks/client.py                     # 5 rounds, ~20 s
    python benchmarks/client.py --rounds 2 --opens 50 --messages 200
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ORIGIN_HOST = "127.0.9.2"
PATHS = ("no_proxy", "pop", "pop_tls", "client")
IO_TIMEOUT = 20.0


def egressd() -> list[str]:
    script = shutil.which("egressd")
    return [script] if script else [sys.executable, "-c", "from egressd.cli import main; main()"]


def free_port_base() -> int:
    """A base with BASE..BASE+35 free (serve's ports), from a random ephemeral port."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1] // 100 * 100
        if 20000 < base < 60000:
            return base
    raise OSError("no port base")


class Origin:
    """Echoes bytes; first tells each connection the source address it saw (one line)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ORIGIN_HOST, 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn, peer[0]), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket, source: str) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                conn.sendall(f"{source}\n".encode())
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                return


def recv_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            raise OSError(f"closed during the head: {data!r}")
        data += chunk
    return data


TLS: dict[str, ssl.SSLContext] = {}


def open_tunnel(path: str, proxies: dict[str, tuple[str, int]], auth: str,
                origin: tuple[str, int]) -> tuple[socket.socket, str]:
    """A connected tunnel to the origin and the source address the origin saw."""
    target = origin if path == "no_proxy" else proxies[path]
    sock = socket.create_connection(target, timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if path == "pop_tls":
        sock = TLS["context"].wrap_socket(sock, server_hostname=target[0])
    if path != "no_proxy":
        extra = f"Proxy-Authorization: Basic {auth}\r\n" if path.startswith("pop") else ""
        sock.sendall(f"CONNECT {origin[0]}:{origin[1]} HTTP/1.1\r\nHost: {origin[0]}\r\n"
                     f"{extra}\r\n".encode())
        head = read_head(sock)
        if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
            raise OSError(f"{path}: {head!r}")
    return sock, recv_line(sock).decode().strip()


def one_open(path: str, proxies: dict[str, tuple[str, int]], auth: str,
             origin: tuple[str, int]) -> tuple[float, str]:
    started = time.perf_counter()
    sock, source = open_tunnel(path, proxies, auth, origin)
    with sock:
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise OSError("no echo")
        return time.perf_counter() - started, source


def round_trips(path: str, proxies: dict[str, tuple[str, int]], auth: str,
                origin: tuple[str, int], count: int) -> tuple[list[float], str]:
    sock, source = open_tunnel(path, proxies, auth, origin)
    times = []
    with sock:
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(b"y")
            if sock.recv(1) != b"y":
                raise OSError("no echo")
            times.append(time.perf_counter() - started)
    return times, source


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_for(path: Path, key: str, process: subprocess.Popen[bytes], within: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args} exited with {process.returncode}")
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            if data.get(key):
                return data
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"{path} did not appear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--opens", type=int, default=100, help="new tunnels per path and round")
    parser.add_argument("--messages", type=int, default=500, help="round trips per path and round")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="egressd-client-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    children: list[subprocess.Popen[bytes]] = []
    try:
        base = free_port_base()
        serve = subprocess.Popen([*egressd(), "serve", "--state-dir", str(work / "state"),
                                  "--port-base", str(base), "--json"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        children.append(serve)
        info = wait_for(work / "state" / "serve.json", "accounts", serve)
        control = info["control"]["url"]
        admin = (work / "state" / "admin.token").read_text().strip()
        token = httpx.post(f"{control}/v1/accounts/globex/enrollment-tokens", json={"user": "carol"},
                           headers={"Authorization": f"Bearer {admin}"}, timeout=10).json()["token"]
        subprocess.run([*egressd(), "client", "enroll", "--control", control, "--token", token,
                        "--state-dir", str(work / "client"), "--serve-json",
                        str(work / "state" / "serve.json")], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        client = subprocess.Popen([*egressd(), "client", "run", "--state-dir", str(work / "client"),
                                   "--listen", "127.0.0.1:0"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        children.append(client)
        status = wait_for(work / "client" / "status.json", "connected_pop", client)
        connected = status["connected_pop"]
        device = json.loads((work / "client" / "device.json").read_text())
        auth = base64.b64encode(f"{device['device_id']}:{device['secret']}".encode()).decode()
        pop_http = info["pops"][connected]["http_proxy"].removeprefix("http://").rsplit(":", 1)
        listen = status["listen"].rsplit(":", 1)
        pop_https = info["pops"][connected]["https_proxy"].removeprefix("https://").rsplit(":", 1)
        proxies = {"pop": (pop_http[0], int(pop_http[1])), "client": (listen[0], int(listen[1])),
                   "pop_tls": (pop_https[0], int(pop_https[1]))}
        TLS["context"] = ssl.create_default_context(cafile=info["ca_cert"])
        shared = set(info["pops"][connected]["shared_ipv4"])
        origin = Origin()
        target = (ORIGIN_HOST, origin.port)

        opens: dict[str, list[float]] = {path: [] for path in PATHS}
        trips: dict[str, list[float]] = {path: [] for path in PATHS}
        flows = {path: 0 for path in PATHS}
        good = {path: 0 for path in PATHS}
        for path in PATHS:  # warm up: the client's link, the PoP's caches
            one_open(path, proxies, auth, target)
        for round_index in range(args.rounds):
            order = PATHS[round_index % len(PATHS):] + PATHS[:round_index % len(PATHS)]
            for path in order:
                expected = {"127.0.0.1"} if path == "no_proxy" else shared
                for _ in range(args.opens):
                    seconds, source = one_open(path, proxies, auth, target)
                    opens[path].append(seconds)
                    flows[path] += 1
                    good[path] += source in expected
                times, source = round_trips(path, proxies, auth, target, args.messages)
                trips[path] += times
                flows[path] += 1
                good[path] += source in expected
        figures = {path: {"open_ms_p50": round(1000 * pct(opens[path], 0.5), 3),
                          "open_ms_p99": round(1000 * pct(opens[path], 0.99), 3),
                          "rr_us_p50": round(1e6 * pct(trips[path], 0.5), 1),
                          "rr_us_p99": round(1e6 * pct(trips[path], 0.99), 1),
                          "rr_us_mean": round(1e6 * statistics.fmean(trips[path]), 1),
                          "source_ok": f"{good[path]}/{flows[path]}"} for path in PATHS}
        client_f, pop_f = figures["client"], figures["pop"]
        result = {
            "benchmark": "client", "connected_pop": connected, "rounds": args.rounds,
            "opens_per_round": args.opens, "messages_per_round": args.messages,
            "paths": figures,
            "added": {"open_ms_p50": round(client_f["open_ms_p50"] - pop_f["open_ms_p50"], 3),
                      "rr_us_p50": round(client_f["rr_us_p50"] - pop_f["rr_us_p50"], 1)},
            "added_vs_pop_tls": {
                "open_ms_p50": round(client_f["open_ms_p50"] - figures["pop_tls"]["open_ms_p50"], 3),
                "rr_us_p50": round(client_f["rr_us_p50"] - figures["pop_tls"]["rr_us_p50"], 1)},
            "ratio_client_over_pop": {
                "open_p50": round(client_f["open_ms_p50"] / pop_f["open_ms_p50"], 2),
                "rr_p50": round(client_f["rr_us_p50"] / pop_f["rr_us_p50"], 2)},
        }
        print(json.dumps(result), flush=True)
        for path in PATHS:
            f = figures[path]
            print(f"{path:>8}: open p50 {f['open_ms_p50']:.3f} ms p99 {f['open_ms_p99']:.3f} ms; "
                  f"round trip p50 {f['rr_us_p50']:.0f} us p99 {f['rr_us_p99']:.0f} us; "
                  f"source ok {f['source_ok']}", file=sys.stderr)
    finally:
        for child in reversed(children):
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
