"""The code-quality gates are part of the suite, so CI fails when they fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    result = _run(sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks", "fuzz")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_strict_is_clean_on_src() -> None:
    result = _run(sys.executable, "-m", "mypy", "--strict", "src")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_source_file_is_unreasonably_long() -> None:
    long_files = [
        f"{path.relative_to(ROOT)}: {count} lines"
        for path in (ROOT / "src").rglob("*.py")
        if (count := len(path.read_text().splitlines())) > 700
    ]
    assert not long_files, long_files
