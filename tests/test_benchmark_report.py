"""`benchmarks/proxy.py`'s report: ratios and goals from a harness summary, with egressd's
own targets (two workers, SOCKS5, one worker) and the floor never counted as peers."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "proxy.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_proxy", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
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
