"""The PoP's DNS resolver: queries per second, cached and uncached, next to unbound (issue 6).

One upstream — the lab's DNS server (`python -m egressd.lab.dns_server`, the zone of
`egressd lab`) on 127.0.0.1 — and, asking it, each resolver under test on its own
loopback address:

- `upstream`: the lab DNS server asked directly (dnspython's wire format, no cache): the
  ceiling for uncached answers, since every miss is one upstream question;
- `egressd`: a real `egressd pop` with `--dns-listen`, forwarding to the upstream from its
  shared address (R4), flow log off (a JSON line per query otherwise);
- `unbound`: Debian's unbound forwarding to the same upstream (one thread, no DNSSEC
  validation), when installed (`apt install unbound`); skipped otherwise.

Load: a separate process keeps WINDOW queries outstanding on one UDP socket for a bounded
time and count, and times each answer. `cached`: the same 200 names over and over (after
one warm-up pass); `uncached`: a name never asked before for every query (the lab zone has
a wildcard under `echo.`), so every query is a miss. Every answer is checked (rcode
NOERROR and the id of a query in flight).

Prints one JSON line (qps, p50/p99 ms, lost per target and mode; ratios egressd/unbound and
egressd/upstream) on stdout, a summary on stderr. The load generator, the resolver and the
upstream share 2 cores: quote the ratios.

    python benchmarks/resolver.py                       # ~40 s
    python benchmarks/resolver.py --seconds 3 --window 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message

from egressd.pop.identity import hash_secret

UPSTREAM = "127.0.0.1"
EGRESSD = "127.0.0.2"  # also its shared address: the upstream sees it ask
UNBOUND = "127.0.0.3"
ZONE = "lab.egressd.test"
LOST_AFTER = 2.0


def free_port(host: str) -> int:
    """A port free for both UDP and TCP on `host`."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def deployment() -> str:
    return f"""
[[data_centers]]
code = "bench"
city = "Loopback"
country = "ZZ"
latitude = 0.0
longitude = 0.0
shared_ipv4 = ["{EGRESSD}"]

[[accounts]]
id = "bench"

  [[accounts.users]]
  name = "bench"

  [[accounts.devices]]
  id = "bench"
  user = "bench"
  secret_sha256 = "{hash_secret('bench-secret')}"
"""


def wait_answering(target: tuple[str, int], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    query = dns.message.make_query(f"ready.echo.{ZONE}", "A").to_wire()
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.3)
            try:
                sock.sendto(query, target)
                sock.recv(4096)
                return
            except OSError:
                time.sleep(0.1)
    raise RuntimeError(f"nothing answers DNS on {target}")


@contextlib.contextmanager
def started(command: list[str], log: Path, target: tuple[str, int]) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_answering(target)
        yield child
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)


# --- the load generator: its own process, a non-blocking socket, no asyncio ---------------


def load(target: tuple[str, int], names: list[str], window: int, seconds: float, count: int,
         results: Any) -> None:
    wires = [bytearray(dns.message.make_query(name, "A").to_wire()) for name in names]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(target)
    sock.setblocking(False)
    pending: dict[int, float] = {}
    latencies: list[float] = []
    errors = lost = sent = 0
    next_id = 0
    started = time.perf_counter()
    deadline = started + seconds
    clock = time.perf_counter
    while (sent < count and clock() < deadline) or pending:
        now = clock()
        if now > deadline + LOST_AFTER:
            lost += len(pending)
            break
        while len(pending) < window and sent < count and now < deadline:
            next_id = (next_id + 1) & 0xFFFF
            if next_id in pending:
                break
            wire = wires[sent % len(wires)]
            struct.pack_into("!H", wire, 0, next_id)
            try:
                sock.send(wire)
            except BlockingIOError:
                break
            pending[next_id] = clock()
            sent += 1
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            while True:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    break
                if len(data) < 4:
                    errors += 1
                    continue
                query_id = struct.unpack_from("!H", data)[0]
                sent_at = pending.pop(query_id, None)
                if sent_at is None:
                    errors += 1
                    continue
                if data[3] & 0x0F != 0:
                    errors += 1
                latencies.append((clock() - sent_at) * 1000)
        expired = [qid for qid, at in pending.items() if clock() - at > LOST_AFTER]
        for qid in expired:
            del pending[qid]
            lost += 1
    elapsed = max(1e-9, min(clock(), deadline) - started)
    sock.close()
    results.send({"answers": len(latencies), "sent": sent, "lost": lost, "errors": errors,
                  "seconds": round(elapsed, 3), "latencies": latencies})


def measure(target: tuple[str, int], names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    worker = context.Process(target=load, args=(target, names, args.window, args.seconds, args.count, theirs))
    worker.start()
    result: dict[str, Any] = ours.recv()
    worker.join(10)
    latencies = sorted(result.pop("latencies"))
    result["qps"] = round(result["answers"] / result["seconds"], 1)
    result["p50_ms"] = round(statistics.median(latencies), 3) if latencies else None
    result["p99_ms"] = round(latencies[int(0.99 * (len(latencies) - 1))], 3) if latencies else None
    return result


def unbound_config(directory: Path, port: int, upstream_port: int) -> Path:
    config = directory / "unbound.conf"
    config.write_text(f"""server:
  interface: {UNBOUND}
  port: {port}
  do-daemonize: no
  use-syslog: no
  logfile: ""
  chroot: ""
  username: ""
  pidfile: ""
  directory: "{directory}"
  num-threads: 1
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  module-config: "iterator"
  qname-minimisation: no
  local-zone: "test." nodefault   # RFC 6761: unbound answers test. itself unless told not to
  verbosity: 0
forward-zone:
  name: "."
  forward-addr: {UPSTREAM}@{upstream_port}
""")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per target and mode")
    parser.add_argument("--count", type=int, default=200_000, help="at most this many queries per run")
    parser.add_argument("--window", type=int, default=64, help="queries outstanding at once")
    args = parser.parse_args()
    load_before = os.getloadavg()
    cached_names = [f"c{i}.echo.{ZONE}" for i in range(200)]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="egressd-dns-bench-") as scratch:
        tmp = Path(scratch)
        zone = tmp / "zone.json"
        zone.write_text(json.dumps({"origin": ZONE, "records": {f"*.echo.{ZONE}": ["203.0.113.100"],
                                                                 f"echo.{ZONE}": ["203.0.113.100"]}}))
        upstream_port = free_port(UPSTREAM)
        upstream = (UPSTREAM, upstream_port)
        with started([sys.executable, "-m", "egressd.lab.dns_server", str(zone), os.devnull,
                      "--listen", UPSTREAM, "--port", str(upstream_port)], tmp / "upstream.log", upstream):
            run = 0

            def fresh(count: int) -> list[str]:
                nonlocal run
                run += 1
                return [f"u{run}x{i}.echo.{ZONE}" for i in range(count)]

            results["upstream"] = {"uncached": measure(upstream, fresh(args.count), args)}
            (tmp / "deployment.toml").write_text(deployment())
            port = free_port(EGRESSD)
            target = (EGRESSD, port)
            with socket.socket() as probe:
                probe.bind((EGRESSD, 0))
                proxy_port = probe.getsockname()[1]
            with started([sys.executable, "-m", "egressd", "pop", "-d", str(tmp / "deployment.toml"), "--pop", "bench",
                          "--listen", f"{EGRESSD}:{proxy_port}", "--flow-log", "off", "--log-level", "warning",
                          "--dns-listen", f"{EGRESSD}:{port}", "--dns-upstream", f"{UPSTREAM}:{upstream_port}"],
                         tmp / "egressd.log", target):
                measure(target, cached_names, argparse.Namespace(**{**vars(args), "count": len(cached_names)}))
                results["egressd"] = {"cached": measure(target, cached_names, args),
                                      "uncached": measure(target, fresh(args.count), args)}
            if shutil.which("unbound"):
                port = free_port(UNBOUND)
                target = (UNBOUND, port)
                with started(["unbound", "-d", "-c", str(unbound_config(tmp, port, upstream_port))],
                             tmp / "unbound.log", target):
                    measure(target, cached_names, argparse.Namespace(**{**vars(args), "count": len(cached_names)}))
                    results["unbound"] = {"cached": measure(target, cached_names, args),
                                          "uncached": measure(target, fresh(args.count), args)}
            else:
                print("unbound is not installed (apt install unbound): skipped", file=sys.stderr)
    ratios: dict[str, float] = {}
    for mode in ("cached", "uncached"):
        ours = results["egressd"][mode]["qps"]
        if "unbound" in results and results["unbound"][mode]["qps"]:
            ratios[f"egressd_over_unbound_{mode}"] = round(ours / results["unbound"][mode]["qps"], 3)
    ratios["egressd_uncached_over_upstream"] = round(
        results["egressd"]["uncached"]["qps"] / max(1e-9, results["upstream"]["uncached"]["qps"]), 3)
    print(json.dumps({"benchmark": "dns", "window": args.window, "seconds": args.seconds, "results": results,
                      "ratios": ratios, "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                      "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                      "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    print("\ntarget    mode       qps      p50 ms   p99 ms   lost  errors", file=sys.stderr)
    for name, modes in results.items():
        for mode, figures in modes.items():
            print(f"{name:<9} {mode:<9} {figures['qps']:>9,.0f}  {figures['p50_ms']!s:>7}  {figures['p99_ms']!s:>7}  "
                  f"{figures['lost']:>5}  {figures['errors']:>6}", file=sys.stderr)
    print(f"ratios: {ratios}", file=sys.stderr)


if __name__ == "__main__":
    main()
