"""egressd against the peer proxies, in one run of the shared harness (../shared/bench).

Starts `egressd pop` (HTTP CONNECT + forward proxy and SOCKS5 on one port) as the
harness's extra targets, runs every load against it, the peers and a direct connection,
then prints one JSON line per figure: egressd's median, its ratio to direct and to each
peer, the target from the issue and whether it was met. The harness checks on every
measurement that the origin saw the PoP's shared address (127.0.0.2).

Unless `--no-floor`, the run also measures `floor_proxy.py` (the least a Python proxy can
do per tunnel and per request; no authentication, validation or decision), as the target
`floor`: `ratio_to_floor` says how much of the way from Python's floor egressd is. The
floor is not a peer: no goal is judged against it.

egressd runs with `--workers 2` (`--workers N`), and unless `--no-one-worker` also on its
default of one worker, as the HTTP target `egressd-1w`: on a small machine that the load
generator and the origin share, one worker can do better than two.

    python benchmarks/proxy.py                 # full run, about 15 min on 2 cores
    python benchmarks/proxy.py --quick         # about 3 min, for a look
    python benchmarks/proxy.py --reps 5        # steadier medians, about 20 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESS = HERE.parent.parent / "shared" / "bench"
PEERS = "squid,haproxy,tinyproxy,dante,pproxy"

# (test, figure, which egressd target, the peers it is compared with, how it is judged)
TARGETS = [
    ("bulk-1", "mb_per_s", "egressd", "best", 1.5),
    ("bulk-4", "mb_per_s", "egressd", "best", 1.5),
    ("connect-c64", "tunnels_per_s", "egressd", "haproxy", 1.0),
    ("connect-c1", "lat_p50_ms", "egressd", "haproxy", None),  # no worse than haproxy's p50
    ("http-c64", "req_per_s", "egressd", "haproxy", 1.0),
    ("idle", "rss_per_tunnel_kib", "egressd", None, 5.0),  # at most 5 KiB
    ("bulk-1", "mb_per_s", "egressd-socks", "dante", 1.5),
    ("bulk-4", "mb_per_s", "egressd-socks", "dante", 1.5),
    ("connect-c64", "tunnels_per_s", "egressd-socks", "dante", 1.0),
    ("idle", "rss_per_tunnel_kib", "egressd-socks", None, 5.0),
    # egressd on its default of one worker, beside the two-worker target (HTTP only)
    ("bulk-1", "mb_per_s", "egressd-1w", "best", 1.5),
    ("bulk-4", "mb_per_s", "egressd-1w", "best", 1.5),
    ("connect-c64", "tunnels_per_s", "egressd-1w", "haproxy", 1.0),
    ("connect-c1", "lat_p50_ms", "egressd-1w", "haproxy", None),
    ("http-c64", "req_per_s", "egressd-1w", "haproxy", 1.0),
    ("idle", "rss_per_tunnel_kib", "egressd-1w", None, 5.0),
]
#: Targets of this script (the rest of a run's targets are peers, the floor and direct).
OURS = ("egressd", "egressd-socks", "egressd-1w", "floor")


def run_harness(args: argparse.Namespace, summary: Path) -> None:
    argv = harness_argv(args, summary)
    print("running:", " ".join(argv), file=sys.stderr)
    subprocess.run(argv, check=True, stdout=sys.stderr)


def egressd_command(workers: int, port: str = "{port}") -> str:
    """The shell command that runs the benchmark PoP (`port`: the harness's placeholder).

    The harness is one client address opening thousands of tunnels at once: the per-source
    caps against slowloris and floods (issue 9; the peers have none by default) are off."""
    return (f"{sys.executable} -m egressd pop -d {HERE / 'deployment.toml'} --pop bench "
            f"--listen 127.0.0.1:{port} --flow-log off --workers {workers} --log-level warning "
            "--max-handshakes-per-source 0 --max-connections-per-source 0 --max-flows-per-source 0")


def harness_argv(args: argparse.Namespace, summary: Path) -> list[str]:
    """The harness's command line for this script's arguments."""
    one_worker = []
    if args.one_worker and args.workers != 1:
        one_worker = ["--extra", f"egressd-1w={egressd_command(1)}",
                      "--extra-proxy", "egressd-1w=http://bench:bench-secret@127.0.0.1:{port}"]
    argv = [str(HARNESS / "run_peers.sh"), "--peers", args.peers,
            "--extra", f"egressd={egressd_command(args.workers)}",
            "--extra-proxy", "egressd=http://bench:bench-secret@127.0.0.1:{port}",
            "--extra", f"egressd-socks={egressd_command(args.workers)}",
            "--extra-proxy", "egressd-socks=socks5://bench:bench-secret@127.0.0.1:{port}",
            *one_worker, *floor_extra(args),
            "--json-summary", str(summary), "--out", str(args.out)]
    if args.quick:
        argv += ["--reps", "1", "--duration", "1.5", "--bulk-max-seconds", "2", "--idle-count", "2000"]
    elif args.reps:
        argv += ["--reps", str(args.reps)]
    return argv


def floor_command(workers: int, port: str = "{port}", source: str = "{source_ip}") -> str:
    """The shell command that runs `floor_proxy.py` (defaults: the harness's placeholders)."""
    return (f"{sys.executable} {HERE / 'floor_proxy.py'} --listen 127.0.0.1:{port} "
            f"--source {source} --workers {workers}")


def floor_extra(args: argparse.Namespace) -> list[str]:
    if not args.floor:
        return []
    return ["--extra", f"floor={floor_command(args.workers)}"]


def figures(summary: dict, target: str) -> dict:  # type: ignore[type-arg]
    return summary["targets"].get(target, {}).get("tests", {})


def report(summary: dict) -> list[dict]:  # type: ignore[type-arg]
    lines = []
    direct = figures(summary, "direct")
    peers = [name for name in summary["targets"] if name != "direct" and name not in OURS]
    floor = figures(summary, "floor")
    for test, figure, target, against, goal in TARGETS:
        mine = figures(summary, target).get(test, {})
        value = mine.get("median") if figure != "lat_p50_ms" else mine.get("lat_p50_ms")
        if value is None:
            continue
        line: dict = {"test": test, "target": target, "figure": figure, "value": value,  # type: ignore[type-arg]
                      "source_ok": summary["targets"][target].get("all_ok")}
        if figure == "lat_p50_ms":  # for latency the ratio is ours / theirs: lower is better
            base = direct.get(test, {}).get("lat_p50_ms")
            if base:
                line["ratio_to_direct"] = round(value / base, 3)
        elif figure != "rss_per_tunnel_kib":
            base = direct.get(test, {}).get("median")
            if base:
                line["ratio_to_direct"] = round(value / base, 3)
        ratios = {}
        for peer in peers:
            theirs = figures(summary, peer).get(test, {})
            other = theirs.get("median") if figure != "lat_p50_ms" else theirs.get("lat_p50_ms")
            # ratio_to_peer is ours / theirs for every figure (for latency and memory, lower is better)
            if other:
                ratios[peer] = round(value / other, 3)
        line["ratio_to_peer"] = ratios
        floor_figure = floor.get(test, {}).get("median" if figure != "lat_p50_ms" else "lat_p50_ms")
        if floor_figure and figure != "rss_per_tunnel_kib" and not test.startswith("bulk"):
            line["ratio_to_floor"] = round(value / floor_figure, 3)
        if figure == "rss_per_tunnel_kib":
            line["goal"], line["met"] = f"<= {goal} KiB", value <= goal  # type: ignore[operator]
        elif figure == "lat_p50_ms":
            ref = ratios.get("haproxy")
            line["goal"], line["met"] = "p50 <= haproxy's", ref is not None and ref <= 1.0
        elif against == "best":
            best = max(ratios.values()) if ratios else None
            line["goal"] = f">= {goal}x the best peer"
            line["met"] = best is not None and value >= goal * max(  # type: ignore[operator]
                figures(summary, p).get(test, {}).get("median") or 0 for p in peers)
        elif against:
            line["goal"], line["met"] = f">= {goal}x {against}", ratios.get(against, 0) >= goal  # type: ignore[operator]
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition, short loads")
    parser.add_argument("--reps", type=int, metavar="N",
                        help="repetitions of every measurement (the harness's default: 3); the "
                             "medians of more are steadier on a noisy machine, ~4 min per repetition")
    parser.add_argument("--peers", default=PEERS, help=f"comma-separated peers (default {PEERS})")
    parser.add_argument("--workers", type=int, default=2,
                        help="egressd (and floor) worker processes (default 2)")
    parser.add_argument("--no-one-worker", dest="one_worker", action="store_false",
                        help="do not also measure egressd on one worker (its default), as egressd-1w")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="do not measure floor_proxy.py, the Python floor")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "egressd-bench")
    parser.add_argument("--summary", type=Path, help="read an existing summary.json instead of running")
    args = parser.parse_args()
    if args.summary:
        summary_path = args.summary
    else:
        if not (HARNESS / "run_peers.sh").exists():
            sys.exit(f"the peer harness is not at {HARNESS}")
        os.environ.setdefault("BENCH_SOURCE_IP", "127.0.0.2")
        summary_path = args.out / "summary.json"
        args.out.mkdir(parents=True, exist_ok=True)
        run_harness(args, summary_path)
    summary = json.loads(summary_path.read_text())
    for line in report(summary):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
