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
    python benchmarks/paired.py --results DIR/results.jsonl  # judge a stored run again

With `--floor`, every round of the rate and latency figures also measures
`floor_proxy.py` (the least a Python proxy can do: no authentication, decision, log or
timeout), and each verdict says where the floor stands against the same peer
(`floor_median_ratio`) and egressd against the floor (`median_to_floor`): whether a goal
is within reach of any Python proxy on this machine.

It prints one JSON line per figure (its verdict) and writes `results.jsonl` (every
proxybench line, with its round) and `paired.md` (the verdicts and every round) to `--out`.
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

    @property
    def has_floor(self) -> bool:
        """Whether `--floor` measures the floor for it (the floor has no bulk figure)."""
        return self.argv[0] != "bulk"


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


def round_ratio(figure: Figure, values: dict[str, float], target: str = "egressd") -> float | None:
    """`target`'s value over the best peer's in one round (for latency, the lowest); None if
    `target` or every peer failed in it."""
    mine = values.get(target)
    theirs = [values[peer] for peer in figure.peers if values.get(peer)]
    if not mine or not theirs:
        return None
    best = min(theirs) if figure.lower_is_better else max(theirs)
    return mine / best


def floor_ratios(figure: Figure, rounds: Sequence[tuple[int, dict[str, float]]]) -> tuple[list[float], list[float]]:
    """Per round with the floor: the floor over the best peer, and egressd over the floor."""
    to_peer = [ratio for _, values in rounds if (ratio := round_ratio(figure, values, "floor")) is not None]
    egressd_to_floor = [values["egressd"] / values["floor"] for _, values in rounds
                        if values.get("egressd") and values.get("floor")]
    return to_peer, egressd_to_floor


def judge(figure: Figure, ratios: Sequence[float], floor: Sequence[float] = (),
          to_floor: Sequence[float] = ()) -> dict[str, object]:
    """The figure's verdict from its rounds' ratios: the median against the goal, the
    quartiles, and how many rounds met it on their own. `floor`: the floor's ratios to the
    same peers, `to_floor`: egressd's to the floor (both reported, neither judged)."""
    if not ratios:
        return {"figure": figure.name, "rounds": 0, "met": False}
    reference: dict[str, object] = {}
    if floor:
        reference["floor_median_ratio"] = round(statistics.median(floor), 3)
    if to_floor:
        reference["median_to_floor"] = round(statistics.median(to_floor), 3)
    def meets(ratio: float) -> bool:
        return ratio <= figure.goal if figure.lower_is_better else ratio >= figure.goal
    median = statistics.median(ratios)
    low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (median, median, median)
    return {"figure": figure.name, "against": "best of " + ",".join(figure.peers),
            "goal": f"{'<=' if figure.lower_is_better else '>='} {figure.goal}",
            "rounds": len(ratios), "median_ratio": round(median, 3),
            "quartiles": [round(low, 3), round(high, 3)],
            "rounds_met": sum(meets(ratio) for ratio in ratios), "met": meets(median),
            "ratios": [round(ratio, 3) for ratio in ratios], **reference}


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


def values_by_round(lines: Sequence[dict[str, object]],
                    figure: Figure) -> list[tuple[int, dict[str, float]]]:
    """The figure's value per target in each round, from the stored proxybench lines (a
    failed measurement, or one whose source address was wrong, has none)."""
    rounds: dict[int, dict[str, float]] = {}
    for line in lines:
        value = line.get(figure.key)
        number = line.get("round")
        if line.get("figure") != figure.name or not isinstance(number, int):
            continue
        values = rounds.setdefault(number, {})
        if line.get("ok") and isinstance(value, int | float) and isinstance(line.get("target"), str):
            values[str(line["target"])] = float(value)
    return sorted(rounds.items())


def markdown(figures: Sequence[Figure], lines: Sequence[dict[str, object]]) -> str:
    """The verdicts, then every round's values and ratio."""
    out = ["| figure | against | goal | median ratio | quartiles | rounds met | met "
           "| floor's median ratio | egressd / floor |",
           "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for figure in figures:
        verdict = verdict_of(figure, lines)
        if verdict["rounds"]:
            out.append(f"| {figure.name} | {', '.join(figure.peers)} | {verdict['goal']} | "
                       f"{verdict['median_ratio']} | {verdict['quartiles'][0]}–{verdict['quartiles'][1]} | "  # type: ignore[index]
                       f"{verdict['rounds_met']} of {verdict['rounds']} | {'yes' if verdict['met'] else '**no**'} | "
                       f"{verdict.get('floor_median_ratio', '–')} | {verdict.get('median_to_floor', '–')} |")
        rounds = values_by_round(lines, figure)
        for number, values in rounds:
            ratio = round_ratio(figure, values)
            shown = ", ".join(f"{target} {value:,.3f}" if figure.lower_is_better else f"{target} {value:,.0f}"
                              for target, value in values.items())
            rows.append(f"| {figure.name} | {number} | {shown} | {'–' if ratio is None else round(ratio, 3)} |")
    return "\n".join([*out, "", "| figure | round | values (in the order measured) | ratio |",
                      "|---|---|---|---|", *rows, ""])


def verdict_of(figure: Figure, lines: Sequence[dict[str, object]]) -> dict[str, object]:
    """The figure's verdict from the stored proxybench lines."""
    rounds = values_by_round(lines, figure)
    ratios = [ratio for _, values in rounds if (ratio := round_ratio(figure, values)) is not None]
    return judge(figure, ratios, *floor_ratios(figure, rounds))


def measure(argv: list[str], log: Path) -> dict[str, object]:
    with log.open("a") as errors:
        run = subprocess.run(argv, stdout=subprocess.PIPE, stderr=errors, text=True, timeout=120)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"ok": False, "error": f"exit {run.returncode}"}


def run(args: argparse.Namespace, figures: Sequence[Figure], results: Path) -> list[dict[str, object]]:
    """Measure every round; each proxybench line goes to `results` as it comes."""
    sys.path.insert(0, str(HARNESS))
    import run_peers  # the harness's services: peers, origin and nginx as its runs start them

    sys.path.insert(0, str(HERE))
    from proxy import egressd_command, floor_command

    lines: list[dict[str, object]] = []
    services = run_peers.Services()
    peers = {peer.name: peer for peer in run_peers.PEERS}
    with results.open("w") as stored:
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
            if args.floor:
                port = run_peers.free_port()
                pid = services.start_command("floor", floor_command(1, str(port), run_peers.SOURCE_IP),
                                             "127.0.0.1", port)
                targets["floor"] = (f"http://127.0.0.1:{port}", pid)
            for number in range(args.rounds):
                for figure in figures:
                    floor = ["floor"] if args.floor and figure.has_floor else []
                    for target in rotated(["egressd", *figure.peers, *floor], number):
                        proxy, target_pid = targets[target]
                        record = measure(proxybench_argv(figure, proxy, target_pid, target, args.duration,
                                                         args.bulk_seconds), args.out / "proxybench.log")
                        line = {"round": number, "figure": figure.name, "target": target, **record}
                        lines.append(line)
                        stored.write(json.dumps(line) + "\n")
                        stored.flush()
                        print(f"round {number} {figure.name} {target}: {record.get(figure.key)}"
                              + ("" if record.get("ok") else f" FAILED ({record.get('error') or record.get('error_samples')})"),
                              file=sys.stderr, flush=True)
        finally:
            services.stop_all()
            time.sleep(0.5)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="rounds per figure (default 10)")
    parser.add_argument("--figures", default=",".join(FIGURES),
                        help=f"comma-separated, of {', '.join(FIGURES)} (default: all)")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="seconds per rate measurement (whole seconds for http-c64)")
    parser.add_argument("--bulk-seconds", type=float, default=3.0, help="cap per bulk measurement")
    parser.add_argument("--out", type=Path, default=Path("/tmp/egressd-paired"),
                        help="where results.jsonl, paired.md and the generator's log go")
    parser.add_argument("--floor", action="store_true",
                        help="also measure floor_proxy.py (one worker) in every round of the "
                             "rate and latency figures, for reference")
    parser.add_argument("--results", type=Path, metavar="JSONL",
                        help="judge a stored results.jsonl instead of measuring")
    args = parser.parse_args()
    unknown = [name for name in args.figures.split(",") if name not in FIGURES]
    if unknown or args.rounds < 1:
        parser.error(f"unknown figures {unknown}" if unknown else "--rounds must be at least 1")
    figures = [FIGURES[name] for name in args.figures.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.results:
        lines = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    else:
        if not (HARNESS / "run_peers.py").exists() or not VENV_PYTHON.exists():
            sys.exit(f"the peer harness ({HARNESS}) or its venv ({VENV_PYTHON}) is missing: "
                     "see ../shared/bench/README.md")
        lines = run(args, figures, args.out / "results.jsonl")
    for figure in figures:
        print(json.dumps(verdict_of(figure, lines)), flush=True)
    (args.out / "paired.md").write_text(markdown(figures, lines))


if __name__ == "__main__":
    main()
