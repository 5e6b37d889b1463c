"""Bounded atheris runs of every codec harness, one after the other.

    python fuzz/run.py --runs 1000000                 # every codec, 1,000,000 inputs each
    python fuzz/run.py --runs 200000 --codec socks5   # one codec
    python fuzz/run.py --runs 1000000 --update-corpus # and merge new coverage into the corpus

Each harness runs under libFuzzer with its seed corpus (fuzz/corpus/<codec>, read only
unless --update-corpus) plus a scratch directory for what it discovers, its dictionary,
and a per-input timeout (a slow input is a finding too). A crash, a failed property or a
timeout stops that codec with a non-zero status and leaves the input in
fuzz/corpus/<codec>/ (crash-*, timeout-*), where tests/protocols/test_fuzz_corpus.py
replays it until it is fixed. Prints one JSON line per codec (inputs, seconds, exec/s,
crashes) and a Markdown table for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CODECS = {
    "http1_request": "http1.dict",
    "http1_response": "http1.dict",
    "http1_body": "http1.dict",
    "socks5": "socks5.dict",
    "proxy_v2": "proxy_v2.dict",
    "geofeed": "geofeed.dict",
}


def run_codec(codec: str, runs: int, max_len: int, timeout: int, update_corpus: bool) -> dict[str, object]:
    corpus = HERE / "corpus" / codec
    corpus.mkdir(parents=True, exist_ok=True)
    harness = [sys.executable, str(HERE / f"{codec}.py")]
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{codec}-") as scratch:
        command = [
            *harness, f"-runs={runs}", f"-max_len={max_len}", f"-timeout={timeout}",
            "-rss_limit_mb=2048", "-print_final_stats=1", f"-dict={HERE / 'dict' / CODECS[codec]}",
            f"-artifact_prefix={corpus}/", scratch, str(corpus),
        ]
        started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, errors="replace",  # noqa: S603
                                check=False)  # our own harness and arguments
        seconds = time.monotonic() - started
        log = result.stderr
        merged = None
        if update_corpus and result.returncode == 0:
            # libFuzzer runs the merge in child processes started from argv[0]: the
            # harnesses are executable scripts for that.
            merge = [*harness, "-merge=1", f"-max_len={max_len}", str(corpus), scratch]
            output = subprocess.run(merge, capture_output=True, text=True, errors="replace",  # noqa: S603
                                    check=True).stderr
            merged = _last(output, r"MERGE-OUTER: (\d+) new files")
            if merged is None or "attempt 2" in output:
                print(f"{codec}: the corpus merge failed:\n{output[-2000:]}", file=sys.stderr)
    executed = _stat(log, "number_of_executed_units")
    figures: dict[str, object] = {
        "codec": codec, "inputs": executed, "seconds": round(seconds, 1),
        "exec_per_s": round(executed / seconds) if executed and seconds else None,
        "crashes": 0 if result.returncode == 0 else 1, "corpus_files": len(list(corpus.iterdir())),
        "merged": merged, "coverage": _last(log, r"cov: (\d+)"), "features": _last(log, r"ft: (\d+)"),
    }
    if result.returncode != 0:
        figures["returncode"] = result.returncode
        figures["log_tail"] = log[-4000:]
    return figures


def _stat(log: str, name: str) -> int | None:
    match = re.search(rf"stat::{name}:\s+(\d+)", log)
    return int(match.group(1)) if match else None


def _last(log: str, pattern: str) -> int | None:
    found = re.findall(pattern, log)
    return int(found[-1]) if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per codec (default 1,000,000)")
    parser.add_argument("--codec", action="append", choices=sorted(CODECS), help="repeatable; default all")
    parser.add_argument("--max-len", type=int, default=4096, help="longest input in bytes")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    parser.add_argument("--update-corpus", action="store_true",
                        help="merge the inputs that add coverage into fuzz/corpus/<codec>")
    args = parser.parse_args()
    results = []
    for codec in args.codec or list(CODECS):
        figures = run_codec(codec, args.runs, args.max_len, args.timeout, args.update_corpus)
        tail = figures.pop("log_tail", None)
        print(json.dumps(figures), flush=True)
        if tail:
            print(tail, file=sys.stderr)
        results.append(figures)
    print("\n| codec | inputs | seconds | exec/s | crashes | coverage (edges) |\n|---|---|---|---|---|---|")
    for figures in results:
        print(f"| {figures['codec']} | {figures['inputs']:,} | {figures['seconds']} | "
              f"{figures['exec_per_s']:,} | {figures['crashes']} | {figures['coverage']} |"
              if figures["inputs"] else f"| {figures['codec']} | failed | | | 1 | |")
    return 0 if all(figures["crashes"] == 0 for figures in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
