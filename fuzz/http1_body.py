#!/usr/bin/env python3
"""atheris harness: request body framing (`BodyTracker`), chunked and Content-Length.

Properties: only `HttpError` (with the configured status) escapes; the same bytes are
taken and the same end is found in any chunking, byte by byte included; taking stops at
the end of the message. flags bit 0: Content-Length framing (length from the next flag
bits) instead of chunked; bit 1: tight line and trailer limits.

    python fuzz/http1_body.py [libFuzzer options] [corpus dirs]
"""

from __future__ import annotations

from _fuzzlib import fuzz, instrumented, unpack

with instrumented(__name__):
    from egressd.protocols.http1 import CHUNKED, BodyFraming, BodyTracker, HttpError


def run(chunks: list[bytes], framing: BodyFraming, limits: dict[str, int]) -> tuple[int, bool] | str:
    tracker, taken = BodyTracker(framing, error_status=400, **limits), 0
    try:
        for chunk in chunks:
            got = tracker.feed(chunk)
            assert 0 <= got <= len(chunk)
            if got < len(chunk):
                assert tracker.done, "bytes left over before the end of the message"
            taken += got
    except HttpError as error:
        assert error.status == 400, error
        return "error"
    return taken, tracker.done


def check(data: bytes) -> None:
    fuzz_input = unpack(data)
    flags = fuzz_input.flags
    framing = BodyFraming.content_length(flags >> 2) if flags & 1 else CHUNKED
    limits = {"max_line": 32, "max_trailer_section": 64, "max_trailer_fields": 2} if flags & 2 else {}
    whole = run([fuzz_input.payload], framing, limits)
    assert run(fuzz_input.chunks, framing, limits) == whole
    if fuzz_input.bytewise is not None:
        assert run(fuzz_input.bytewise, framing, limits) == whole


if __name__ == "__main__":
    fuzz(check)
