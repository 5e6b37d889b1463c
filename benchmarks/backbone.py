"""A flow carried over the backbone versus leaving directly (issue 5): throughput and added latency.

Two real `egressd pop` processes on loopback joined by the backbone (mTLS over
`egressd.mux`, certificates from `egressd.pki`): Las Vegas (`las`, 127.0.1.x) and Los
Angeles (`lax`, 127.0.2.x). acme's policy sends its flows to `lax`, leaving from
127.0.2.100. An origin process on 127.0.0.1 (the allowed destination) has three ports:
a sink, a source and an echo, and tells every flow the source address it saw.

Three paths, interleaved in every round (the order rotates from round to round):

- `no_proxy`: a plain TCP connection from the client to the origin (the baseline);
- `direct`: a CONNECT tunnel through `lax`, which leaves locally (splice relay);
- `backbone`: a CONNECT tunnel through `las`, carried over the backbone to `lax`.

Per path and round: (a) one tunnel's bulk throughput, upload into the sink and download
from the source; (b) CONNECT + a 1-byte request and its response on a new tunnel (p50,
p99); (c) 1-byte request/response round trips on an already open tunnel, the
per-message cost. Every flow checks the source address the origin saw (`source_ok`:
flows that left from 127.0.2.100, or from the client for `no_proxy`, out of all flows).

With `--lab` (root), the same measurements run in `egressd lab`'s namespaces with every
delay set to zero (the seed topology, stretch 0: plain veth links): the client in the
user's site namespace, the origin in the Internet namespace, the lab's real PoPs. There
both proxied paths go through the Las Vegas PoP the device is attached to: `backbone` as
acme (carried over the backbone to Los Angeles or New York — at zero delay both are equally
near, R6 — leaving from 198.51.100.50 or .60) and `direct` as globex (leaving
Las Vegas from a shared address), so the only difference is the backbone hop; `no_proxy`
connects from the Las Vegas PoP's namespace (the device has no route of its own).

Prints one JSON line on stdout (per-path medians over rounds, pooled latency percentiles,
ratios backbone/direct and direct/no_proxy, CPU seconds per GiB of each process) and a
summary on stderr. Loopback, no root and no added delay: quote the ratios, not the
absolute figures.

    python benchmarks/backbone.py                  # 5 rounds of 256 MiB each way, ~20 s
    python benchmarks/backbone.py --rounds 1 --bulk-mib 64 --connects 100 --messages 500
    sudo python benchmarks/backbone.py --lab       # in the lab's namespaces, zero delay
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egressd.lab import netns as lab_netns
from egressd.lab import runner as lab_runner
from egressd.pki import ensure_ca, ensure_server_cert
from egressd.pop.identity import hash_secret

DEVICE, SECRET = "acme-laptop", "backbone-bench-secret"
POPS = {"las": "127.0.1", "lax": "127.0.2"}
CITIES = {"las": ("Las Vegas", 36.17, -115.14), "lax": ("Los Angeles", 34.05, -118.24)}
EGRESS = "127.0.2.100"  # acme's dedicated address at lax
ORIGIN_HOST = "127.0.0.1"
PATHS = ("no_proxy", "direct", "backbone")
CHUNK = 4 << 20
IO_TIMEOUT = 30.0  # one socket operation, generous under load
ZEROS = bytes(CHUNK)
CLONE_NEWNET = 0x40000000
LAB_ORIGIN = "203.0.113.100"
LAB_LAS = ("203.0.113.1", 8080)


@contextlib.contextmanager
def in_namespace(name: str | None) -> Iterator[None]:
    """This thread in network namespace `name` for the block (sockets made there stay there).
    setns(2) through ctypes: os.setns arrives with Python 3.12."""
    if name is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            libc.setns(home, CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(home)


def deployment() -> str:
    parts = ['[deployment]\nallow_destinations = ["127.0.0.1/32"]\n']
    for slot, (code, net) in enumerate(POPS.items(), start=1):
        city, lat, lon = CITIES[code]
        parts.append(f"""
[[data_centers]]
code = "{code}"
city = "{city}"
country = "US"
latitude = {lat}
longitude = {lon}
shared_ipv4 = ["{net}.1"]
backbone = "{net}.254"
slot = {slot}
""")
    parts.append(f"""
[[accounts]]
id = "acme"
plan = "enterprise"

  [[accounts.locations]]
  id = "lax"
  pop = "lax"
  ipv4 = "{EGRESS}"
  ipv6 = "2001:db8:120::/48"

  [[accounts.locations]]  # R2: dedicated egress is active with locations in two cities
  id = "las"
  pop = "las"
  ipv4 = "127.0.1.100"
  ipv6 = "2001:db8:110::/48"

  [[accounts.users]]
  name = "alice"

  [[accounts.devices]]
  id = "{DEVICE}"
  user = "alice"
  secret_sha256 = "{hash_secret(SECRET)}"

  [[accounts.policies]]
  id = "via-la"
  action = "dedicated"
  primary = "lax"
  secondary = "las"
""")
    return "".join(parts)


def free_port(hosts: list[str]) -> int:
    """A port free on every one of `hosts` (the backbone uses one port for all PoPs)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts:
                with socket.socket() as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


# --- the origin: its own process, a thread per connection, blocking sockets ----------------


def _read_line(sock: socket.socket, limit: int = 256) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte or len(line) >= limit:
            raise ConnectionError(f"no line: {line!r}")
        line += byte
    return line


def _sink(sock: socket.socket, peer: str) -> None:
    buffer = bytearray(CHUNK)
    total = 0
    while received := sock.recv_into(buffer):
        total += received
    sock.sendall(f"{peer} {total}\n".encode())


def _source(sock: socket.socket, peer: str) -> None:
    wanted = int(_read_line(sock))
    sock.sendall(f"{peer}\n".encode())
    view = memoryview(ZEROS)
    while wanted > 0:
        step = min(wanted, CHUNK)
        sock.sendall(view[:step])
        wanted -= step
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # until the client closes


def _echo(sock: socket.socket, peer: str) -> None:
    if not sock.recv(1):
        return
    sock.sendall(f"{peer}\n".encode())  # the first response: the source address seen
    while data := sock.recv(65536):
        sock.sendall(data)


def _serve(listener: socket.socket, handler: Callable[[socket.socket, str], None]) -> None:
    def one(conn: socket.socket, peer: str) -> None:
        with conn, contextlib.suppress(OSError, ValueError):
            conn.settimeout(120.0)
            handler(conn, peer)

    while True:
        conn, address = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=one, args=(conn, address[0]), daemon=True).start()


def origin_main(ports: Any, host: str = ORIGIN_HOST, namespace: str | None = None) -> None:
    listeners = {}
    for name in ("sink", "source", "echo"):
        with in_namespace(namespace):
            listener = socket.socket()
        listener.bind((host, 0))
        listener.listen(256)
        listeners[name] = listener
    handlers = {"sink": _sink, "source": _source, "echo": _echo}
    for name, listener in listeners.items():
        threading.Thread(target=_serve, args=(listener, handlers[name]), daemon=True).start()
    ports.send({name: listener.getsockname()[1] for name, listener in listeners.items()})
    ports.recv()  # until the benchmark is done (or gone: EOFError)


# --- the client ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Conn:
    """A blocking socket with a small read buffer (the CONNECT response's head, lines)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""

    def read_until(self, marker: bytes, limit: int = 65536) -> bytes:
        while marker not in self.pending:
            data = self.sock.recv(65536)
            if not data or len(self.pending) > limit:
                raise ConnectionError(f"closed before {marker!r}: {self.pending[:200]!r}")
            self.pending += data
        head, _, self.pending = self.pending.partition(marker)
        return head

    def close(self) -> None:
        self.sock.close()


@dataclass
class Lab:
    proxies: dict[str, tuple[str, int]]  # path -> proxy address (absent for no_proxy)
    origin: dict[str, int]  # service -> port
    pids: dict[str, int]
    auth: dict[str, str]  # path -> Proxy-Authorization
    expected: dict[str, frozenset[str]]  # path -> the source addresses the origin may see
    origin_host: str = ORIGIN_HOST
    namespaces: dict[str, str] = field(default_factory=dict)  # path -> the client's netns

    def expected_source(self, path: str) -> frozenset[str]:
        return self.expected[path]

    def open(self, path: str, service: str) -> Conn:
        """A connection to the origin's `service`, through the path's PoP or not at all."""
        with in_namespace(self.namespaces.get(path)):
            sock = socket.socket()
        sock.settimeout(IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock)
        try:
            target = (self.origin_host, self.origin[service])
            if path == "no_proxy":
                sock.connect(target)
                return conn
            sock.connect(self.proxies[path])
            authority = f"{target[0]}:{target[1]}"
            sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                         f"Proxy-Authorization: {self.auth[path]}\r\n\r\n".encode())
            status = conn.read_until(b"\r\n\r\n").split(b"\r\n", 1)[0]
            if status.split()[1:2] != [b"200"]:
                raise ConnectionError(f"CONNECT via {path}: {status.decode(errors='replace')}")
            return conn
        except BaseException:
            conn.close()
            raise


@dataclass
class Tally:
    flows: int = 0
    ok: int = 0
    wrong: dict[str, int] = field(default_factory=dict)

    def check(self, seen: str, expected: frozenset[str]) -> None:
        self.flows += 1
        if seen in expected:
            self.ok += 1
        else:
            self.wrong[seen] = self.wrong.get(seen, 0) + 1


def upload(lab: Lab, path: str, total: int, tally: Tally, deadline: float) -> float:
    conn = lab.open(path, "sink")
    try:
        view = memoryview(ZEROS)
        started = time.perf_counter()
        sent = 0
        while sent < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"upload via {path}: {sent} of {total} bytes in the time allowed")
            step = min(CHUNK, total - sent)
            conn.sock.sendall(view[:step])
            sent += step
        conn.sock.shutdown(socket.SHUT_WR)
        seen, count = conn.read_until(b"\n").decode().split()
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    tally.check(seen, lab.expected_source(path))
    if int(count) != total:
        raise RuntimeError(f"upload via {path}: the sink got {count} of {total} bytes")
    return total / elapsed


def download(lab: Lab, path: str, total: int, tally: Tally, deadline: float) -> float:
    conn = lab.open(path, "source")
    try:
        buffer = bytearray(CHUNK)
        started = time.perf_counter()
        conn.sock.sendall(f"{total}\n".encode())
        seen = conn.read_until(b"\n").decode()
        got = len(conn.pending)
        while got < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"download via {path}: {got} of {total} bytes in the time allowed")
            received = conn.sock.recv_into(buffer)
            if not received:
                break
            got += received
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    tally.check(seen, lab.expected_source(path))
    if got != total:
        raise RuntimeError(f"download via {path}: got {got} of {total} bytes")
    return total / elapsed


def connect_rtts(lab: Lab, path: str, count: int, seconds: float, tally: Tally) -> list[float]:
    """New tunnel + a 1-byte request + its response, each timed (µs); the tunnel is closed
    after each (not timed)."""
    samples: list[float] = []
    stop = time.monotonic() + seconds
    clock = time.perf_counter_ns
    expected = lab.expected_source(path)
    for _ in range(count):
        if time.monotonic() > stop:
            break
        started = clock()
        conn = lab.open(path, "echo")
        try:
            conn.sock.sendall(b"x")
            seen = conn.read_until(b"\n").decode()
            samples.append((clock() - started) / 1000)
        finally:
            conn.close()
        tally.check(seen, expected)
    return samples


def message_rtts(lab: Lab, path: str, count: int, seconds: float, tally: Tally) -> list[float]:
    """1-byte request/response round trips (µs) on one open tunnel."""
    conn = lab.open(path, "echo")
    samples: list[float] = []
    try:
        conn.sock.sendall(b"x")
        tally.check(conn.read_until(b"\n").decode(), lab.expected_source(path))
        sock = conn.sock
        stop = time.monotonic() + seconds
        clock = time.perf_counter_ns
        for _ in range(count):
            if time.monotonic() > stop:
                break
            started = clock()
            sock.sendall(b"y")
            if sock.recv(1) != b"y":
                raise ConnectionError(f"echo via {path} broke")
            samples.append((clock() - started) / 1000)
    finally:
        conn.close()
    return samples


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


# --- the PoPs --------------------------------------------------------------------------------


def http_get(address: tuple[str, int], target: str, timeout: float = 5.0) -> dict[str, Any]:
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: pop\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
        raise ConnectionError(head[:200].decode(errors="replace"))
    return dict(json.loads(body))


@contextlib.contextmanager
def pops(tmp: Path) -> Iterator[tuple[dict[str, tuple[str, int]], dict[str, int], float]]:
    """Both PoPs started and converged: (listen addresses, pids, las's backbone RTT in ms)."""
    pki = tmp / "pki"
    ca = ensure_ca(pki)
    for code, net in POPS.items():
        ensure_server_cert(pki, f"pop-{code}", [code], [f"{net}.254"], ca, client=True)
    file = tmp / "deployment.toml"
    file.write_text(deployment())
    backbone_port = free_port([f"{net}.254" for net in POPS.values()])
    listen = {code: (f"{net}.10", free_port([f"{net}.10"])) for code, net in POPS.items()}
    children: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
    try:
        for code, (host, port) in listen.items():
            logs[code] = tmp / f"{code}.log"
            with logs[code].open("wb") as log:
                children[code] = subprocess.Popen(
                    [sys.executable, "-m", "egressd", "pop", "-d", str(file), "--pop", code,
                     "--listen", f"{host}:{port}", "--pki", str(pki),
                     "--backbone-port", str(backbone_port), "--flow-log", "off",
                     "--log-level", "warning"],
                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 30.0
        rtt = 0.0
        while True:  # healthy, and each sees the other up over the backbone
            try:
                views = {code: http_get(listen[code], "/health")["backbone"] for code in listen}
                if all(peer["up"] for view in views.values() for peer in view.values()):
                    rtt = float(views["las"]["lax"]["rtt_ms"])
                    break
            except (OSError, ValueError, KeyError):
                pass
            for code, child in children.items():
                if child.poll() is not None:
                    raise RuntimeError(f"egressd pop {code} exited: {logs[code].read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the PoPs did not converge within 30 s: "
                                   + " | ".join(log.read_text()[-1000:] for log in logs.values()))
            time.sleep(0.1)
        yield listen, {code: child.pid for code, child in children.items()}, rtt
    finally:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for code, child in children.items():
            try:
                child.wait(10.0)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5.0)
            warnings = [line for line in logs[code].read_text().splitlines() if line.strip()]
            if warnings:
                print(f"{code} logged {len(warnings)} line(s), last: {warnings[-1][:300]}",
                      file=sys.stderr)


# --- the run ---------------------------------------------------------------------------------


def run(lab: Lab, args: argparse.Namespace) -> dict[str, Any]:
    total = args.bulk_mib << 20
    tally = {path: Tally() for path in args.paths}
    per_round: dict[str, dict[str, list[float]]] = {
        path: {"upload_mb_s": [], "download_mb_s": [], "connect_p50_us": [],
               "message_p50_us": []} for path in args.paths}
    connect_all: dict[str, list[float]] = {path: [] for path in args.paths}
    message_all: dict[str, list[float]] = {path: [] for path in args.paths}
    cpu: dict[str, dict[tuple[str, str], float]] = {path: {} for path in args.paths}
    bulk_bytes = dict.fromkeys(args.paths, 0)
    who = {**lab.pids, "client": os.getpid()}

    @contextlib.contextmanager
    def charge(into: dict[tuple[str, str], float], phase: str) -> Iterator[None]:
        """Adds the CPU seconds each process used during the block to `into[phase, name]`."""
        before = {name: cpu_seconds(pid) for name, pid in who.items()}
        yield
        for name, pid in who.items():
            key = (phase, name)
            into[key] = into.get(key, 0.0) + cpu_seconds(pid) - before[name]
    started = time.monotonic()
    for round_index in range(args.rounds):
        shift = round_index % len(args.paths)
        order = list(args.paths[shift:]) + list(args.paths[:shift])
        for path in order:
            deadline = time.monotonic() + args.bulk_seconds
            with charge(cpu[path], "bulk"):
                up = upload(lab, path, total, tally[path], deadline)
                down = download(lab, path, total, tally[path], deadline + args.bulk_seconds)
            bulk_bytes[path] += 2 * total
            with charge(cpu[path], "connect"):
                connects = connect_rtts(lab, path, args.connects, args.latency_seconds, tally[path])
            with charge(cpu[path], "message"):
                messages = message_rtts(lab, path, args.messages, args.latency_seconds, tally[path])
            connect_all[path] += connects
            message_all[path] += messages
            figures = per_round[path]
            figures["upload_mb_s"].append(up / 1e6)
            figures["download_mb_s"].append(down / 1e6)
            figures["connect_p50_us"].append(statistics.median(connects))
            figures["message_p50_us"].append(statistics.median(messages))
            print(f"round {round_index + 1} {path:>8}: up {up / 1e6:7.0f} MB/s, down "
                  f"{down / 1e6:7.0f} MB/s, CONNECT+1B p50 {statistics.median(connects):6.0f} µs "
                  f"(n={len(connects)}), message p50 {statistics.median(messages):5.0f} µs "
                  f"(n={len(messages)})", file=sys.stderr)
    paths: dict[str, Any] = {}
    for path in args.paths:
        figures = per_round[path]
        gib = bulk_bytes[path] / (1 << 30)
        paths[path] = {
            "upload_mb_s": round(statistics.median(figures["upload_mb_s"]), 1),
            "download_mb_s": round(statistics.median(figures["download_mb_s"]), 1),
            "upload_mb_s_range": [round(min(figures["upload_mb_s"])), round(max(figures["upload_mb_s"]))],
            "download_mb_s_range": [round(min(figures["download_mb_s"])),
                                    round(max(figures["download_mb_s"]))],
            "connect_p50_us": round(percentile(connect_all[path], 0.5), 1),
            "connect_p99_us": round(percentile(connect_all[path], 0.99), 1),
            "connect_round_p50_us_range": [round(min(figures["connect_p50_us"])),
                                           round(max(figures["connect_p50_us"]))],
            "connect_samples": len(connect_all[path]),
            "message_p50_us": round(percentile(message_all[path], 0.5), 1),
            "message_p99_us": round(percentile(message_all[path], 0.99), 1),
            "message_round_p50_us_range": [round(min(figures["message_p50_us"])),
                                           round(max(figures["message_p50_us"]))],
            "message_samples": len(message_all[path]),
            # CPU per unit of work, per process (client = this process, origin = the sink/
            # source/echo process); a PoP at 1.0 s/GiB moves at most ~1 GiB/s on one core.
            "bulk_cpu_s_per_gib": {name: round(cpu[path][phase, name] / gib, 3)
                                   for phase, name in cpu[path] if phase == "bulk"},
            "connect_cpu_us_per_flow": {
                name: round(1e6 * cpu[path][phase, name] / max(1, len(connect_all[path])))
                for phase, name in cpu[path] if phase == "connect"},
            "message_cpu_us_per_round_trip": {
                name: round(1e6 * cpu[path][phase, name] / max(1, len(message_all[path])), 1)
                for phase, name in cpu[path] if phase == "message"},
            "flows": tally[path].flows,
            "source_ok": tally[path].ok,
        }
        if tally[path].wrong:
            paths[path]["source_wrong"] = tally[path].wrong
    ratios: dict[str, Any] = {}

    def ratio(top: str, bottom: str) -> dict[str, float]:
        out = {}
        for figure in ("upload_mb_s", "download_mb_s", "connect_p50_us", "connect_p99_us",
                       "message_p50_us", "message_p99_us"):
            if paths[bottom][figure]:
                out[figure] = round(paths[top][figure] / paths[bottom][figure], 3)
        return out

    if {"backbone", "direct"} <= set(paths):
        ratios["backbone_over_direct"] = ratio("backbone", "direct")
        ratios["backbone_added_us"] = {
            figure: round(paths["backbone"][figure] - paths["direct"][figure], 1)
            for figure in ("connect_p50_us", "connect_p99_us", "message_p50_us", "message_p99_us")}
    if {"direct", "no_proxy"} <= set(paths):
        ratios["direct_over_no_proxy"] = ratio("direct", "no_proxy")
    return {"paths": paths, "ratios": ratios, "run_s": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bulk-mib", type=int, default=256, help="MiB per upload and per download")
    parser.add_argument("--bulk-seconds", type=float, default=60.0,
                        help="time allowed for one upload (and one download)")
    parser.add_argument("--connects", type=int, default=400, help="CONNECT+1 byte samples per path and round")
    parser.add_argument("--messages", type=int, default=2000, help="round trips on one tunnel per path and round")
    parser.add_argument("--latency-seconds", type=float, default=10.0,
                        help="time allowed for each latency loop (fewer samples past it)")
    parser.add_argument("--lab", action="store_true",
                        help="run in egressd lab's namespaces with zero delay (root)")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated subset of {','.join(PATHS)} (e.g. for profiling)")
    args = parser.parse_args()
    args.paths = tuple(path for path in args.paths.split(",") if path)
    if not args.paths or set(args.paths) - set(PATHS):
        parser.error(f"--paths: choose from {', '.join(PATHS)}")
    if min(args.rounds, args.bulk_mib, args.connects, args.messages) < 1:
        parser.error("--rounds, --bulk-mib, --connects and --messages must be at least 1")
    load_before = os.getloadavg()
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    lab_name = f"bench{os.getpid() % 100000}" if args.lab else None
    if lab_name is not None:
        with tempfile.TemporaryDirectory(prefix="egressd-lab-bench-") as scratch:
            topology = Path(scratch) / "zero-delay.toml"  # `up` keeps its own copy
            topology.write_text(lab_runner_topology_zero_delay())
            lab_runner.up(lab_name, topology)
    origin_args = (theirs, LAB_ORIGIN, lab_netns.ns_name(lab_name, "inet")) if lab_name else (theirs,)
    origin = context.Process(target=origin_main, args=origin_args, daemon=True)
    origin.start()
    try:
        if not ours.poll(20.0):
            raise RuntimeError("the origin did not start")
        origin_ports = ours.recv()
        if lab_name is not None:
            results, rtt_ms = run_in_lab(lab_name, origin_ports, origin.pid or 0, args)
        else:
            with tempfile.TemporaryDirectory(prefix="egressd-backbone-bench-") as scratch, \
                    pops(Path(scratch)) as (listen, pids, rtt_ms):
                auth = "Basic " + base64.b64encode(f"{DEVICE}:{SECRET}".encode()).decode()
                lab = Lab(proxies={"direct": listen["lax"], "backbone": listen["las"]},
                          origin=origin_ports, pids={**pids, "origin": origin.pid or 0},
                          auth=dict.fromkeys(PATHS, auth),
                          expected={"no_proxy": frozenset({ORIGIN_HOST}), "direct": frozenset({EGRESS}),
                                    "backbone": frozenset({EGRESS})})
                print(f"PoPs: las pid {pids['las']} on {listen['las']}, lax pid {pids['lax']} on "
                      f"{listen['lax']}; backbone RTT (PING) {rtt_ms:.2f} ms; origin pid {origin.pid}",
                      file=sys.stderr)
                results = run(lab, args)
    finally:
        if lab_name is not None:
            lab_runner.down(lab_name)
        with contextlib.suppress(OSError):
            ours.send("done")
        origin.join(5.0)
        if origin.is_alive():
            origin.terminate()
            origin.join(5.0)
    result = {
        "benchmark": "backbone",
        "setup": ("egressd lab, seed topology with zero delay (veth links), network namespaces; client at the "
                  "las site, backbone = acme via las -> lax, direct = globex leaving las; 1 worker per PoP"
                  if args.lab else
                  "loopback, no added delay, no network namespaces; 2 PoPs (las -> lax), 1 worker each"),
        "rounds": args.rounds, "bulk_mib": args.bulk_mib, "connects": args.connects,
        "messages": args.messages, "paths": results["paths"], "ratios": results["ratios"],
        "backbone_ping_rtt_ms": round(rtt_ms, 3),
        "source_ok": sum(p["source_ok"] for p in results["paths"].values()),
        "flows": sum(p["flows"] for p in results["paths"].values()),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(), "run_s": results["run_s"],
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(result))
    paths = results["paths"]
    print("\npath      upload MB/s  download MB/s  CONNECT+1B p50/p99 µs  message p50/p99 µs  source_ok",
          file=sys.stderr)
    for path, figures in paths.items():
        print(f"{path:<9} {figures['upload_mb_s']:>11.0f}  {figures['download_mb_s']:>13.0f}  "
              f"{figures['connect_p50_us']:>10.0f} / {figures['connect_p99_us']:<8.0f}  "
              f"{figures['message_p50_us']:>8.0f} / {figures['message_p99_us']:<7.0f}  "
              f"{figures['source_ok']}/{figures['flows']}", file=sys.stderr)
    for name, figures in results["ratios"].items():
        print(f"{name}: {figures}", file=sys.stderr)


def lab_runner_topology_zero_delay() -> str:
    """The seed's lab topology with every link a plain veth (stretch 0: no added delay)."""
    from egressd.cli.lab_cmd import DEFAULT_TOPOLOGY

    text = DEFAULT_TOPOLOGY.read_text(encoding="utf-8")
    return text.replace("stretch = 1.5", "stretch = 0.0", 1)


def run_in_lab(name: str, origin_ports: dict[str, int], origin_pid: int,
               args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    lab = lab_runner.load(name)
    acme = "Basic " + base64.b64encode(b"alice-laptop:lab-alice-secret").decode()
    globex = "Basic " + base64.b64encode(b"carol-phone:lab-carol-secret").decode()
    site, las = lab.namespace("s-home"), lab.namespace("las")
    pids = {code: lab.pop_pids(code)[0] for code in ("las", "lax", "jfk")}
    health = lab_runner.pop_health(lab, "las") or {}
    rtt_ms = float(health.get("backbone", {}).get("lax", {}).get("rtt_ms") or 0.0)
    bench = Lab(proxies={"direct": LAB_LAS, "backbone": LAB_LAS}, origin=origin_ports,
                pids={**pids, "origin": origin_pid}, auth={"direct": globex, "backbone": acme},
                expected={"no_proxy": frozenset({"198.51.100.130"}),  # las's end of its Internet link
                          "direct": frozenset({"198.51.100.10", "198.51.100.11"}),
                          # with zero delay Los Angeles and New York are equally near (R6): either
                          "backbone": frozenset({"198.51.100.50", "198.51.100.60"})},
                origin_host=LAB_ORIGIN, namespaces={"no_proxy": las, "direct": site, "backbone": site})
    print(f"lab {name}: PoPs las pid {pids['las']}, lax pid {pids['lax']}, jfk pid {pids['jfk']}; backbone RTT (PING) "
          f"{rtt_ms:.2f} ms; origin pid {origin_pid} in {lab.namespace('inet')}", file=sys.stderr)
    return run(bench, args), rtt_ms


if __name__ == "__main__":
    main()
