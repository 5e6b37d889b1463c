#!/usr/bin/env python3
"""atheris harness: RFC 8805 geofeeds (`parse_geofeed`, `format_geofeed`, `GeofeedIndex`).

Properties: a feed (the payload as UTF-8, undecodable bytes replaced) parses or raises
`GeofeedError`, nothing else; what parses formats back to text that parses to the same
entries (with LF or CRLF line ends); the index finds, for every listed network address,
the entry of the longest listed prefix holding it. And an entry built from the payload
as its city and postal code is refused (ValueError) or written as exactly one line that
reads back as itself: no text in a field can add a line to the feed.

    python fuzz/geofeed.py [libFuzzer options] [corpus dirs]
"""

from __future__ import annotations

import ipaddress

from _fuzzlib import fuzz, instrumented, only, unpack

with instrumented(__name__):
    from egressd.protocols.geofeed import (
        GeofeedEntry,
        GeofeedError,
        GeofeedIndex,
        format_geofeed,
        parse_geofeed,
    )

PREFIX = ipaddress.ip_network("192.0.2.0/24")


def check_fields(text: str) -> None:
    city, _, postal = text.partition("\x00")
    with only(ValueError) as caught:
        entry = GeofeedEntry(PREFIX, "US", "US-CA", city, postal)
    if not caught:
        assert parse_geofeed(format_geofeed([entry], header="")) == [entry]


def check(data: bytes) -> None:
    text = unpack(data).payload.decode("utf-8", "replace")
    check_fields(text)
    with only(GeofeedError) as caught:
        entries = parse_geofeed(text)
    if caught:
        return
    written = format_geofeed(entries)
    assert parse_geofeed(written) == entries
    assert parse_geofeed(written.replace("\n", "\r\n")) == entries
    index = GeofeedIndex(entries)
    for entry in entries:
        address = entry.prefix.network_address
        found = index.lookup(address)
        assert found is not None and address in found.prefix
        assert found.prefix.prefixlen == max(e.prefix.prefixlen for e in entries if address in e.prefix)


if __name__ == "__main__":
    fuzz(check)
