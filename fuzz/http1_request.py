#!/usr/bin/env python3
"""atheris harness: HTTP/1.1 request heads (`RequestHeadReader`, `forward_head`).

Properties: only `HttpError` escapes; the payload fed in chunks, one byte at a time or
at once gives the same heads and the same bytes after them (or fails in all three); a
forwarded head parses back with its method, path, Host and framing. flags bit 0 selects
tight limits (64-byte request line, 256-byte section, 8 fields) to reach the limit paths.

    python fuzz/http1_request.py [libFuzzer options] [corpus dirs]
"""

from __future__ import annotations

from _fuzzlib import FuzzInput, fuzz, instrumented, unpack

with instrumented(__name__):
    from egressd.protocols.http1 import HttpError, RequestHead, RequestHeadReader, forward_head

TIGHT = {"max_request_line": 64, "max_header_section": 256, "max_fields": 8}


def read_all(chunks: list[bytes], limits: dict[str, int]) -> list[object]:
    """The heads, then the bytes after the last one that has a body or ends the
    connection (what the proxy hands on), or "error"."""
    reader, results = RequestHeadReader(**limits), list[object]()
    rest: bytes | None = None
    try:
        for chunk in chunks:
            if rest is not None:
                rest += chunk
                continue
            reader.feed(chunk)
            while (head := reader.next_head()) is not None:
                results.append(head)
                if head.body.has_body or head.is_connect or not head.keep_alive:
                    rest = reader.remainder()
                    break
    except HttpError as error:
        if error.status not in (400, 414, 431, 501, 505):
            raise AssertionError(f"unexpected status {error.status}") from error
        results.append("error")
    return results if rest is None else [*results, rest]


def check_forwarded(head: RequestHead) -> None:
    if head.is_connect or head.is_origin_form:
        return
    reader = RequestHeadReader(max_request_line=1 << 20, max_header_section=1 << 20, max_fields=10_000)
    reader.feed(forward_head(head, "egressd"))
    again = reader.next_head()
    assert again is not None and again.is_origin_form
    assert (again.method, again.path, again.body) == (head.method, head.path, head.body)
    assert again.header("Host") == head.authority.encode()


def check(data: bytes) -> None:
    fuzz_input: FuzzInput = unpack(data)
    limits = TIGHT if fuzz_input.flags & 1 else {}
    whole = read_all([fuzz_input.payload], limits)
    variants = [fuzz_input.chunks]
    if fuzz_input.bytewise is not None:
        variants.append(fuzz_input.bytewise)
    for chunks in variants:
        split = read_all(chunks, limits)
        # A split may see a problem earlier (another status), but agrees on the verdict.
        assert ("error" in whole) == ("error" in split), (whole, split)
        if "error" not in whole:
            assert whole == split, (whole, split)
    for item in whole:
        if isinstance(item, RequestHead):
            check_forwarded(item)


if __name__ == "__main__":
    fuzz(check)
