"""egressd against the peers in short alternating pairs: a steadier judge of the figures
that sit near their goal.

`proxy.py` runs the whole harness: every test visits every target, so two measurements
of one figure are minutes apart, and this machine's speed drifts more than a few per cent
in minutes. Here each round measures one figure on egressd (its default of one worker)
and on the peer(s) it is judged against, seconds apart, in an order that alternates
between rounds; each round gives one ratio, and the figure is judged on the median of the
rounds' ratios (the quartiles say how far a single run could stray).

It uses the shared harness's own parts (`../shared/bench`): `run_peers.py`'s services
(the peers' configurations through `peers/start_peer.sh`, the origin and nginx) and
`proxybench.py` for every measurement, which checks the source address the origin saw.

    python benchmarks/paired.py                         # 10 rounds of 5 figures, ~10 min
    python benchmarks/paired.py --rounds 20 --figures http-c64,connect-c64
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESS = HERE.parent.parent / "shared" / "bench"
VENV_PYTHON = Path("/tmp/proxybench-venv/bin/python")
CREDENTIALS = "bench:bench-secret"


@dataclass(frozen=True)
class Figure:
    name: str
    argv: tuple[str, ...]  # proxybench's subcommand and its options (durations added)
    key: str  # the value in proxybench's JSON line
    peers: tuple[str, ...]  # judged against the best of these in the same round
    goal: float  # ratio to the best peer
    lower_is_better: bool = False


FIGURES = {
    figure.name: figure for figure in (
        Figure("http-c64", ("http-rps", "--concurrency", "64"), "req_per_s", ("haproxy",), 1.0),
        Figure("connect-c64", ("connect-rate", "--concurrency", "64"), "tunnels_per_s",
               ("haproxy",), 1.0),
        Figure("connect-c1", ("connect-rate", "--concurrency", "1"), "lat_p50_ms",
               ("haproxy",), 1.0, lower_is_better=True),
        Figure("bulk-1", ("bulk", "--streams", "1"), "mb_per_s", ("haproxy", "squid", "dante"), 1.5),
        Figure("bulk-4", ("bulk", "--streams", "4"), "mb_per_s", ("haproxy", "squid", "dante"), 1.5),
    )
}


def rotated(targets: Sequence[str], round_number: int) -> list[str]:
    """The targets in this round's order: each goes first in turn."""
    shift = round_number % len(targets)
    return [*targets[shift:], *targets[:shift]]


def round_ratio(figure: Figure, values: dict[str, float]) -> float | None:
    """egressd's value over the best peer's in one round (for latency, the lowest); None if
    egressd or every peer failed in it."""
    mine = values.get("egressd")
    theirs = [values[peer] for peer in figure.peers if values.get(peer)]
    if not mine or not theirs:
        return None
    best = min(theirs) if figure.lower_is_better else max(theirs)
    return mine / best


def judge(figure: Figure, ratios: Sequence[float]) -> dict[str, object]:
    """The figure's verdict from its rounds' ratios: the median against the goal, the
    quartiles, and how many rounds met it on their own."""
    if not ratios:
        return {"figure": figure.name, "rounds": 0, "met": False}
    def meets(ratio: float) -> bool:
        return ratio <= figure.goal if figure.lower_is_better else ratio >= figure.goal
    median = statistics.median(ratios)
    low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (median, median, median)
    return {"figure": figure.name, "against": "best of " + ",".join(figure.peers),
            "goal": f"{'<=' if figure.lower_is_better else '>='} {figure.goal}",
            "rounds": len(ratios), "median_ratio": round(median, 3),
            "quartiles": [round(low, 3), round(high, 3)],
            "rounds_met": sum(meets(ratio) for ratio in ratios), "met": meets(median),
            "ratios": [round(ratio, 3) for ratio in ratios]}


def proxybench_argv(figure: Figure, proxy: str, pid: int, label: str, duration: float,
                    bulk_seconds: float) -> list[str]:
    if figure.argv[0] == "bulk":
        timing = ["--max-seconds", str(bulk_seconds)]
    elif figure.argv[0] == "http-rps":  # wrk counts whole seconds
        timing = ["--duration", str(max(1, round(duration)))]
    else:
        timing = ["--duration", str(duration)]
    return [str(VENV_PYTHON), str(HARNESS / "proxybench.py"), *figure.argv, *timing,
            "--proxy", proxy, "--proxy-pid", str(pid), "--label", label]


def measure(argv: list[str], log: Path) -> dict[str, object]:
    with log.open("a") as errors:
        run = subprocess.run(argv, stdout=subprocess.PIPE, stderr=errors, text=True, timeout=120)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"ok": False, "error": f"exit {run.returncode}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="rounds per figure (default 10)")
    parser.add_argument("--figures", default=",".join(FIGURES),
                        help=f"comma-separated, of {', '.join(FIGURES)} (default: all)")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="seconds per rate measurement (whole seconds for http-c64)")
    parser.add_argument("--bulk-seconds", type=float, default=3.0, help="cap per bulk measurement")
    parser.add_argument("--out", type=Path, default=Path("/tmp/egressd-paired"),
                        help="where every proxybench line (results.jsonl) and the logs go")
    args = parser.parse_args()
    unknown = [name for name in args.figures.split(",") if name not in FIGURES]
    if unknown or args.rounds < 1:
        parser.error(f"unknown figures {unknown}" if unknown else "--rounds must be at least 1")
    figures = [FIGURES[name] for name in args.figures.split(",")]
    if not (HARNESS / "run_peers.py").exists() or not VENV_PYTHON.exists():
        sys.exit(f"the peer harness ({HARNESS}) or its venv ({VENV_PYTHON}) is missing: "
                 "see ../shared/bench/README.md")
    sys.path.insert(0, str(HARNESS))
    import run_peers  # the harness's services: peers, origin and nginx as its runs start them

    sys.path.insert(0, str(HERE))
    from proxy import egressd_command

    args.out.mkdir(parents=True, exist_ok=True)
    results = (args.out / "results.jsonl").open("w")
    services = run_peers.Services()
    peers = {peer.name: peer for peer in run_peers.PEERS}
    try:
        services.start("origin", run_peers.ORIGIN_PING_PORT)
        services.start("nginx-origin", run_peers.NGINX_PORT)
        targets: dict[str, tuple[str, int]] = {}
        for name in sorted({peer for figure in figures for peer in figure.peers}):
            peer = peers[name]
            targets[name] = (f"{peer.scheme}://127.0.0.1:{peer.port}", services.start(name, peer.port))
        port = run_peers.free_port()
        pid = services.start_command("egressd", egressd_command(1, str(port)), "127.0.0.1", port)
        targets["egressd"] = (f"http://{CREDENTIALS}@127.0.0.1:{port}", pid)
        ratios: dict[str, list[float]] = {figure.name: [] for figure in figures}
        for number in range(args.rounds):
            for figure in figures:
                values: dict[str, float] = {}
                for target in rotated(["egressd", *figure.peers], number):
                    proxy, target_pid = targets[target]
                    record = measure(proxybench_argv(figure, proxy, target_pid, target, args.duration,
                                                     args.bulk_seconds), args.out / "proxybench.log")
                    results.write(json.dumps({"round": number, "figure": figure.name, **record}) + "\n")
                    value = record.get(figure.key)
                    if record.get("ok") and isinstance(value, int | float):
                        values[target] = float(value)
                    else:
                        print(f"round {number} {figure.name} {target}: failed "
                              f"({record.get('error') or record.get('error_samples')})", file=sys.stderr)
                ratio = round_ratio(figure, values)
                if ratio is not None:
                    ratios[figure.name].append(ratio)
                print(f"round {number} {figure.name}: {values} ratio {ratio and round(ratio, 3)}",
                      file=sys.stderr, flush=True)
        for figure in figures:
            print(json.dumps(judge(figure, ratios[figure.name])), flush=True)
    finally:
        results.close()
        services.stop_all()
        time.sleep(0.5)


if __name__ == "__main__":
    main()
