"""`benchmarks/proxy.py`'s report: ratios and goals from a harness summary, with egressd's
own targets (two workers, SOCKS5, one worker) and the floor never counted as peers; and
`benchmarks/paired.py`'s verdicts from rounds of alternating pairs."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(script: str = "proxy") -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCHMARKS / f"{script}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _target(rate: float, p50: float, rps: float) -> dict[str, Any]:
    return {"all_ok": True, "tests": {"connect-c64": {"median": rate}, "connect-c1": {"lat_p50_ms": p50},
                                      "http-c64": {"median": rps}}}


def test_one_worker_target_is_judged_and_never_a_peer() -> None:
    report = _load().report
    summary = {"targets": {
        "direct": _target(20_000, 0.1, 150_000),
        "haproxy": _target(10_000, 0.28, 60_000),
        "egressd": _target(8_000, 0.34, 57_000),
        "egressd-1w": _target(10_500, 0.27, 55_000),
        "floor": _target(9_500, 0.27, 66_000),
    }}
    lines = {(line["test"], line["target"]): line for line in report(summary)}
    one = lines[("connect-c64", "egressd-1w")]
    assert one["ratio_to_peer"] == {"haproxy": 1.05} and one["met"] is True
    assert lines[("connect-c1", "egressd-1w")]["met"] is True
    assert lines[("http-c64", "egressd-1w")]["met"] is False
    two = lines[("connect-c64", "egressd")]
    assert set(two["ratio_to_peer"]) == {"haproxy"} and two["met"] is False
    assert two["ratio_to_floor"] == round(8_000 / 9_500, 3)


def test_repetitions_and_quick_runs_reach_the_harness(tmp_path: Path) -> None:
    module = _load()

    def argv(**given: Any) -> list[str]:
        parser_args = argparse.Namespace(**{"quick": False, "reps": None, "peers": "haproxy", "workers": 2,
                                            "one_worker": True, "floor": True, "out": tmp_path, **given})
        return list(module.harness_argv(parser_args, tmp_path / "summary.json"))

    def reps(line: list[str]) -> list[str]:
        return [line[i + 1] for i, word in enumerate(line) if word == "--reps"]

    assert reps(argv()) == []  # the harness's default
    assert reps(argv(reps=5)) == ["5"]
    assert reps(argv(quick=True, reps=5)) == ["1"]  # a quick look stays one repetition
    line = argv()
    assert "egressd-1w=http://bench:bench-secret@127.0.0.1:{port}" in line
    assert any(word.startswith("floor=") for word in line)
    assert "--workers 1 " in module.egressd_command(1) and "127.0.0.1:{port}" in module.egressd_command(1)
    assert "127.0.0.1:18101" in module.egressd_command(1, "18101")


def test_paired_rounds_alternate_and_are_judged_on_the_median_ratio() -> None:
    paired = _load("paired")
    assert paired.rotated(["egressd", "haproxy"], 0) == ["egressd", "haproxy"]
    assert paired.rotated(["egressd", "haproxy"], 1) == ["haproxy", "egressd"]
    assert paired.rotated(["egressd", "a", "b"], 2) == ["b", "egressd", "a"]

    bulk, p50 = paired.FIGURES["bulk-1"], paired.FIGURES["connect-c1"]
    # bulk: over the best peer of the round; a failed peer does not count, a failed egressd voids it
    assert paired.round_ratio(bulk, {"egressd": 3000, "haproxy": 1500, "squid": 2000}) == 1.5
    assert paired.round_ratio(bulk, {"egressd": 3000, "haproxy": 1500}) == 2.0
    assert paired.round_ratio(bulk, {"haproxy": 1500}) is None
    # latency: over the peer's, lower is better
    assert paired.round_ratio(p50, {"egressd": 0.27, "haproxy": 0.30}) == 0.27 / 0.30

    verdict = paired.judge(bulk, [1.4, 1.6, 1.55, 1.45, 1.7])
    assert verdict["median_ratio"] == 1.55 and verdict["met"] is True and verdict["rounds_met"] == 3
    low, high = verdict["quartiles"]
    assert low < 1.55 < high
    late = paired.judge(p50, [1.02, 0.98, 1.01])
    assert late["median_ratio"] == 1.01 and late["met"] is False and late["rounds_met"] == 1
    assert paired.judge(p50, [])["met"] is False


def test_paired_measurements_use_the_harness_generator_with_whole_seconds_for_wrk() -> None:
    paired = _load("paired")
    http = paired.proxybench_argv(paired.FIGURES["http-c64"], "http://h:1", 7, "egressd", 2.6, 3.0)
    assert http[1].endswith("shared/bench/proxybench.py") and http[2] == "http-rps"
    assert http[http.index("--duration") + 1] == "3" and http[http.index("--proxy-pid") + 1] == "7"
    bulk = paired.proxybench_argv(paired.FIGURES["bulk-4"], "socks5://h:1", 7, "dante", 2.6, 3.0)
    assert "--duration" not in bulk and bulk[bulk.index("--max-seconds") + 1] == "3.0"
    assert bulk[bulk.index("--streams") + 1] == "4"


def test_a_stored_paired_run_is_judged_again_from_its_lines() -> None:
    """`--results`: the verdicts and the table come from the stored proxybench lines; a
    failed measurement gives its round no value, and a round without egressd no ratio."""
    paired = _load("paired")
    figure = paired.FIGURES["connect-c64"]
    lines = [
        {"round": 0, "figure": "connect-c64", "target": "egressd", "tunnels_per_s": 9900.0, "ok": True},
        {"round": 0, "figure": "connect-c64", "target": "haproxy", "tunnels_per_s": 9000.0, "ok": True},
        {"round": 1, "figure": "connect-c64", "target": "haproxy", "tunnels_per_s": 9000.0, "ok": True},
        {"round": 1, "figure": "connect-c64", "target": "egressd", "tunnels_per_s": 1.0, "ok": False},
        {"round": 0, "figure": "http-c64", "target": "egressd", "req_per_s": 1.0, "ok": True},
    ]
    rounds = paired.values_by_round(lines, figure)
    assert rounds == [(0, {"egressd": 9900.0, "haproxy": 9000.0}), (1, {"haproxy": 9000.0})]
    table = paired.markdown([figure], lines)
    assert "| connect-c64 | haproxy | >= 1.0 | 1.1 | 1.1–1.1 | 1 of 1 | yes | – | – |" in table
    assert "| connect-c64 | 0 | egressd 9,900, haproxy 9,000 | 1.1 |" in table
    assert "| connect-c64 | 1 | haproxy 9,000 | – |" in table


def test_the_floor_is_reported_against_the_same_peer_and_never_judged() -> None:
    """`--floor`: the floor's rounds give its median ratio to the peer and egressd's to the
    floor; the verdict stays egressd's against the peer."""
    paired = _load("paired")
    figure = paired.FIGURES["connect-c64"]
    lines = [{"round": number, "figure": "connect-c64", "target": target, "tunnels_per_s": value, "ok": True}
             for number, values in enumerate([{"egressd": 9000.0, "haproxy": 10000.0, "floor": 9500.0},
                                              {"egressd": 9900.0, "haproxy": 9000.0, "floor": 11000.0},
                                              {"egressd": 9600.0, "haproxy": 10000.0}])
             for target, value in values.items()]
    verdict = paired.verdict_of(figure, lines)
    assert verdict["median_ratio"] == 0.96 and verdict["met"] is False and verdict["rounds"] == 3
    assert verdict["floor_median_ratio"] == round((0.95 + 11000 / 9000) / 2, 3)
    assert verdict["median_to_floor"] == round((9000 / 9500 + 0.9) / 2, 3)
    table = paired.markdown([figure], lines)
    assert f"| 1 of 3 | **no** | {verdict['floor_median_ratio']} | {verdict['median_to_floor']} |" in table
    # bulk has no floor: `--floor` leaves it out of those rounds
    assert figure.has_floor and not paired.FIGURES["bulk-1"].has_floor
    # a run without the floor reports neither field
    alone = paired.verdict_of(figure, [line for line in lines if line["target"] != "floor"])
    assert "floor_median_ratio" not in alone and "median_to_floor" not in alone
    assert alone["median_ratio"] == verdict["median_ratio"]
