#!/usr/bin/env python3
"""atheris harness: PROXY protocol v2 (`parse_proxy_v2`, `ProxyV2Reader`, `encode_proxy_v2`).

Properties: only `ProxyV2Error` escapes; the incremental reader in any chunking (byte by
byte included) returns the header one parse of the whole returns, or fails too; a
PROXY header over TCP or UDP re-encodes to one that parses to the same endpoints and
TLVs. flags bit 0 prefixes the signature, so the fuzzer starts past it more often.

    python fuzz/proxy_v2.py [libFuzzer options] [corpus dirs]
"""

from __future__ import annotations

import ipaddress

from _fuzzlib import fuzz, instrumented, only, unpack

with instrumented(__name__):
    from egressd.protocols.proxy_v2 import (
        PP2_TYPE_CRC32C,
        SIGNATURE,
        Command,
        ProxyV2Error,
        ProxyV2Header,
        ProxyV2Reader,
        Transport,
        encode_proxy_v2,
        parse_proxy_v2,
    )


def incremental(chunks: list[bytes]) -> ProxyV2Header | str | None:
    reader = ProxyV2Reader()
    try:
        for chunk in chunks:
            header = reader.feed(chunk)
            if header is not None:
                return header
    except ProxyV2Error:
        return "error"
    return None


def check_round_trip(header: ProxyV2Header) -> None:
    if header.command is not Command.PROXY or header.source is None or header.destination is None:
        return
    if header.transport not in (Transport.STREAM, Transport.DGRAM):
        return
    if any(ipaddress.ip_address(host).version == 6 and ipaddress.IPv6Address(host).ipv4_mapped
           for host, _port in (header.source, header.destination)):
        return  # mapped addresses are re-encoded as IPv4: another header, by design
    tlvs = [tlv for tlv in header.tlvs if tlv[0] != PP2_TYPE_CRC32C]
    checksum = len(tlvs) != len(header.tlvs)
    encoded = encode_proxy_v2(header.source, header.destination,
                              "tcp" if header.transport is Transport.STREAM else "udp",
                              tlvs, checksum=checksum)
    again = parse_proxy_v2(encoded)
    assert again is not None
    assert (again.source, again.destination, again.transport) == (
        header.source, header.destination, header.transport)
    assert [tlv for tlv in again.tlvs if tlv[0] != PP2_TYPE_CRC32C] == tlvs


def check(data: bytes) -> None:
    fuzz_input = unpack(data)
    prefix = SIGNATURE if fuzz_input.flags & 1 else b""
    payload = prefix + fuzz_input.payload
    chunks = [prefix + fuzz_input.chunks[0], *fuzz_input.chunks[1:]] if fuzz_input.chunks else [prefix]
    whole: ProxyV2Header | str | None = "error"
    with only(ProxyV2Error):
        whole = parse_proxy_v2(payload)
    assert incremental(chunks) == whole
    if len(payload) <= 1024:
        assert incremental([payload[i : i + 1] for i in range(len(payload))]) == whole
    if isinstance(whole, ProxyV2Header):
        check_round_trip(whole)


if __name__ == "__main__":
    fuzz(check)
