"""The fuzzing corpus, replayed as regression tests: every input kept in fuzz/corpus/<codec>/
(hand-made seeds, inputs the fuzzer found, merged coverage) goes through its harness's
``check`` here, without atheris. A crash found by `python fuzz/run.py` lands in the
corpus and fails this test until the codec is fixed.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
CODECS = sorted(path.name for path in (FUZZ / "corpus").iterdir() if path.is_dir())


def load_check(codec: str) -> Callable[[bytes], None]:
    """The harness's ``check``, loaded under a name of its own (``socks5`` alone could
    be anything); its ``from _fuzzlib import ...`` needs fuzz/ on the path meanwhile."""
    spec = importlib.util.spec_from_file_location(f"egressd_fuzz_{codec}", FUZZ / f"{codec}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(FUZZ))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(FUZZ))
    check: Callable[[bytes], None] = module.check
    return check


def test_every_harness_has_a_corpus() -> None:
    harness_names = {path.stem for path in FUZZ.glob("*.py")} - {"_fuzzlib", "run", "seeds"}
    assert harness_names == set(CODECS)


@pytest.mark.parametrize("codec", CODECS)
def test_corpus_replays_without_a_failure(codec: str) -> None:
    check = load_check(codec)
    inputs = sorted((FUZZ / "corpus" / codec).iterdir())
    assert inputs, f"fuzz/corpus/{codec} is empty"
    for path in inputs:
        try:
            check(path.read_bytes())
        except Exception as error:
            raise AssertionError(f"fuzz/corpus/{codec}/{path.name}: {error!r}") from error
