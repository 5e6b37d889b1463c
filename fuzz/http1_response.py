#!/usr/bin/env python3
"""atheris harness: HTTP/1.1 response heads (`ResponseHeadReader`, `forward_response_head`)
and the body that follows them (`BodyTracker` with the head's framing).

Properties: only `HttpError` (status 502) escapes; chunked, byte-by-byte and whole
feeding agree; a forwarded head parses back with its status, reason and framing; the
body tracker takes the same bytes in any chunking. flags bits 0-1 pick the request
method (GET, HEAD, CONNECT, POST).

    python fuzz/http1_response.py [libFuzzer options] [corpus dirs]
"""

from __future__ import annotations

from _fuzzlib import fuzz, instrumented, unpack

with instrumented(__name__):
    from egressd.protocols.http1 import (
        BodyTracker,
        HttpError,
        ResponseHead,
        ResponseHeadReader,
        forward_response_head,
    )

METHODS = ("GET", "HEAD", "CONNECT", "POST")


def read(chunks: list[bytes], method: str) -> tuple[list[object], bytes]:
    """The heads (1xx, then the final one) or "error", and the bytes after the final head."""
    reader = ResponseHeadReader(method)
    heads: list[object] = []
    try:
        for index, chunk in enumerate(chunks):
            reader.feed(chunk)
            while (head := reader.next_head()) is not None:
                heads.append(head)
                if not head.is_interim:
                    return heads, reader.remainder() + b"".join(chunks[index + 1 :])
    except HttpError as error:
        assert error.status == 502, error
        heads.append("error")
    return heads, b""


def body(head: ResponseHead, chunks: list[bytes]) -> tuple[int, bool] | str:
    tracker, taken = BodyTracker(head.body, error_status=502), 0
    try:
        for chunk in chunks:
            taken += tracker.feed(chunk)
        if not tracker.done:
            tracker.eof()
    except HttpError as error:
        assert error.status == 502, error
        return "error"
    return taken, tracker.done


def check(data: bytes) -> None:
    fuzz_input = unpack(data)
    method = METHODS[fuzz_input.flags % 4]
    whole, rest = read([fuzz_input.payload], method)
    variants = [fuzz_input.chunks]
    if fuzz_input.bytewise is not None:
        variants.append(fuzz_input.bytewise)
    for chunks in variants:
        split, split_rest = read(chunks, method)
        assert ("error" in whole) == ("error" in split), (whole, split)
        if "error" not in whole:
            assert (whole, rest) == (split, split_rest), (whole, split)
    if whole and isinstance(whole[-1], ResponseHead):
        final = whole[-1]
        again_reader = ResponseHeadReader(method)
        again_reader.feed(forward_response_head(final, "egressd"))
        again = again_reader.next_head()
        assert again is not None
        assert (again.status, again.reason, again.body) == (final.status, final.reason, final.body)
        expected = body(final, [rest])
        third = max(1, len(rest) // 3)
        assert body(final, [rest[:third], rest[third : 2 * third], rest[2 * third :]]) == expected


if __name__ == "__main__":
    fuzz(check)
