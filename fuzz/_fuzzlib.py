"""Shared plumbing of the atheris harnesses in this directory.

Every harness is a module with a ``check(data: bytes) -> None`` that raises on a broken
property (an ``AssertionError``) or lets an unexpected exception escape (the bug atheris
looks for). Run as a script, the harness hands ``check`` to atheris with the project's
``egressd`` package instrumented for coverage; imported (by
``tests/protocols/test_fuzz_corpus.py``), it is plain Python and replays the corpus.

An input is laid out as ``[flags][n][n cut bytes][payload]``: ``flags`` selects variants
(method, limits, framing), the cut bytes say where the payload is split into the chunks
fed to the codec. That way the fuzzer explores chunk boundaries too, and a saved input
replays exactly, without atheris.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

#: Inputs up to this size are also fed one byte at a time (quadratic in some codecs).
BYTEWISE_LIMIT = 1024


@dataclass(frozen=True)
class FuzzInput:
    flags: int
    payload: bytes
    chunks: list[bytes]

    @property
    def bytewise(self) -> list[bytes] | None:
        """The payload one byte at a time, or None when it is too long for that."""
        if len(self.payload) > BYTEWISE_LIMIT:
            return None
        return [self.payload[i : i + 1] for i in range(len(self.payload))]


def unpack(data: bytes) -> FuzzInput:
    flags = data[0] if data else 0
    count = data[1] % 8 if len(data) > 1 else 0
    cut_bytes, payload = data[2 : 2 + count], data[2 + count :]
    points = sorted({0, len(payload), *(byte * len(payload) // 255 for byte in cut_bytes)})
    chunks = [payload[a:b] for a, b in itertools.pairwise(points)]
    return FuzzInput(flags, payload, chunks)


def pack(payload: bytes, flags: int = 0, cuts: bytes = b"") -> bytes:
    """The input that unpacks to `payload` split at `cuts` (for hand-written seeds)."""
    if len(cuts) > 7:
        raise ValueError("at most 7 cut points")
    return bytes([flags, len(cuts)]) + cuts + payload


def instrumented(module_name: str) -> contextlib.AbstractContextManager[object]:
    """Instrument the egressd imports of a harness run as a script (not when imported)."""
    if module_name != "__main__":
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=["egressd"])


def fuzz(check: Callable[[bytes], None]) -> None:
    import atheris

    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


@contextlib.contextmanager
def only(*allowed: type[BaseException]) -> Iterator[list[BaseException]]:
    """Swallow the codec's own error types and record them; anything else escapes."""
    caught: list[BaseException] = []
    try:
        yield caught
    except allowed as error:
        caught.append(error)
