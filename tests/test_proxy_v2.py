"""PROXY protocol v2 codec: round trips, every malformed case, incremental parsing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.protocols.proxy_v2 import (
    MAX_HEADER_LENGTH,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    SIGNATURE,
    Command,
    Family,
    ProxyV2Error,
    ProxyV2Header,
    ProxyV2Reader,
    Transport,
    crc32c,
    encode_proxy_v2,
    encode_proxy_v2_local,
    looks_like_proxy_v2,
    parse_proxy_v2,
)


def raw_header(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    """A header built by hand, so malformed ones can be written."""
    return (
        SIGNATURE
        + struct.pack("!BBH", ver_cmd, fam, len(body) if length is None else length)
        + body
    )


def parsed(data: bytes) -> ProxyV2Header:
    header = parse_proxy_v2(data)
    assert header is not None
    return header


# --- encoding and round trips ---------------------------------------------------------


def test_ipv4_tcp_matches_the_spec_layout() -> None:
    data = encode_proxy_v2(("192.0.2.1", 51234), ("198.51.100.7", 443))
    expected = (
        b"\r\n\r\n\x00\r\nQUIT\n"  # signature
        + b"\x21"  # version 2, PROXY
        + b"\x11"  # AF_INET, STREAM
        + b"\x00\x0c"  # 12 bytes of addresses
        + bytes([192, 0, 2, 1, 198, 51, 100, 7])
        + struct.pack("!HH", 51234, 443)
    )
    assert data == expected


def test_ipv4_round_trip() -> None:
    data = encode_proxy_v2(("192.0.2.1", 51234), ("198.51.100.7", 443))
    header = parsed(data + b"GET / HTTP/1.1\r\n")
    assert header.consumed == len(data) == 28
    assert header.command is Command.PROXY
    assert header.family is Family.INET
    assert header.transport is Transport.STREAM
    assert header.source == ("192.0.2.1", 51234)
    assert header.destination == ("198.51.100.7", 443)
    assert header.tlvs == ()


def test_ipv6_udp_round_trip() -> None:
    data = encode_proxy_v2(("2001:db8::1", 5353), ("2001:db8:ffff::53", 53), transport="udp")
    assert data[13] == 0x22  # AF_INET6, DGRAM
    header = parsed(data)
    assert header.consumed == 16 + 36
    assert header.family is Family.INET6
    assert header.transport is Transport.DGRAM
    assert header.source == ("2001:db8::1", 5353)
    assert header.destination == ("2001:db8:ffff::53", 53)


def test_tlvs_round_trip_in_order() -> None:
    tlvs = [
        (PP2_TYPE_ALPN, b"h2"),
        (PP2_TYPE_AUTHORITY, b"example.com"),
        (0xE0, b""),
        (0xE1, b"x" * 300),
    ]
    data = encode_proxy_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=tlvs)
    header = parsed(data)
    assert header.tlvs == tuple(tlvs)
    assert header.tlv(PP2_TYPE_AUTHORITY) == b"example.com"
    assert header.tlv(PP2_TYPE_NOOP) is None


def test_checksum_is_appended_and_verified() -> None:
    data = encode_proxy_v2(
        ("2001:db8::1", 1), ("2001:db8::2", 2), tlvs=[(PP2_TYPE_ALPN, b"h3")], checksum=True
    )
    header = parsed(data)
    assert header.tlvs[0] == (PP2_TYPE_ALPN, b"h3")
    assert header.tlvs[1][0] == PP2_TYPE_CRC32C
    zeroed = data[:-4] + b"\x00" * 4
    assert struct.unpack("!I", header.tlvs[1][1])[0] == crc32c(zeroed)


def test_crc32c_known_vector() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_local_header() -> None:
    data = encode_proxy_v2_local()
    assert data == SIGNATURE + b"\x20\x00\x00\x00"
    header = parsed(data)
    assert header.command is Command.LOCAL
    assert header.family is Family.UNSPEC
    assert header.source is None and header.destination is None
    assert header.consumed == 16


def test_ipv4_mapped_addresses_are_carried_as_ipv4() -> None:
    header = parsed(encode_proxy_v2(("::ffff:192.0.2.1", 1), ("192.0.2.2", 2)))
    assert header.family is Family.INET
    assert header.source == ("192.0.2.1", 1)


@pytest.mark.parametrize(
    ("source", "destination", "message"),
    [
        (("192.0.2.1", 1), ("2001:db8::1", 2), "same family"),
        (("2001:db8::1", 1), ("192.0.2.1", 2), "same family"),
        (("example.com", 1), ("192.0.2.1", 2), "not an IP address"),
        (("192.0.2.1", 65536), ("192.0.2.2", 2), "out of range"),
        (("192.0.2.1", 1), ("192.0.2.2", -1), "out of range"),
    ],
)
def test_encode_rejects_bad_endpoints(
    source: tuple[str, int], destination: tuple[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        encode_proxy_v2(source, destination)


def test_encode_rejects_bad_transport_and_tlvs() -> None:
    endpoints = (("192.0.2.1", 1), ("192.0.2.2", 2))
    with pytest.raises(ValueError, match="transport"):
        encode_proxy_v2(*endpoints, transport="sctp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="TLV type"):
        encode_proxy_v2(*endpoints, tlvs=[(256, b"")])
    with pytest.raises(ValueError, match="max 65535"):
        encode_proxy_v2(*endpoints, tlvs=[(0xE0, b"x" * 65536)])
    with pytest.raises(ValueError, match="header would be"):
        encode_proxy_v2(*endpoints, tlvs=[(0xE0, b"x" * 65000), (0xE1, b"x" * 600)])


@given(
    family=st.sampled_from([4, 6]),
    source_port=st.integers(0, 65535),
    destination_port=st.integers(0, 65535),
    transport=st.sampled_from(["tcp", "udp"]),
    tlvs=st.lists(st.tuples(st.integers(0xE0, 0xEF), st.binary(max_size=40)), max_size=4),
    checksum=st.booleans(),
    source_bits=st.integers(0, 2**128 - 1),
)
def test_round_trip_property(
    family: int,
    source_port: int,
    destination_port: int,
    transport: str,
    tlvs: list[tuple[int, bytes]],
    checksum: bool,
    source_bits: int,
) -> None:
    import ipaddress

    if family == 4:
        source = str(ipaddress.IPv4Address(source_bits >> 96))
        destination = "198.51.100.1"
    else:
        source = str(ipaddress.IPv6Address(source_bits))
        if ipaddress.IPv6Address(source_bits).ipv4_mapped is not None:
            return  # carried as IPv4, covered above
        destination = "2001:db8::1"
    data = encode_proxy_v2(
        (source, source_port),
        (destination, destination_port),
        transport=transport,  # type: ignore[arg-type]
        tlvs=tlvs,
        checksum=checksum,
    )
    header = parsed(data + b"payload")
    assert header.consumed == len(data)
    assert header.source == (source, source_port)
    assert header.destination == (destination, destination_port)
    assert list(header.tlvs[: len(tlvs)]) == tlvs


# --- sniffing ----------------------------------------------------------------------------


def test_looks_like_proxy_v2() -> None:
    assert looks_like_proxy_v2(b"")  # need more
    for end in range(1, len(SIGNATURE) + 1):
        assert looks_like_proxy_v2(SIGNATURE[:end])
    assert looks_like_proxy_v2(SIGNATURE + b"\x21\x11")
    assert not looks_like_proxy_v2(b"G")
    assert not looks_like_proxy_v2(b"GET / HTTP/1.1\r\n")
    assert not looks_like_proxy_v2(b"PROXY TCP4 ")  # version 1 is not version 2
    assert not looks_like_proxy_v2(b"\r\n\r\n\x00\r\nQUIX")
    assert not looks_like_proxy_v2(b"\x16\x03\x01")  # a TLS ClientHello


# --- malformed input ----------------------------------------------------------------------

V4_BODY = bytes(12)


@pytest.mark.parametrize("position", range(len(SIGNATURE)))
def test_bad_signature_is_rejected_as_soon_as_it_diverges(position: int) -> None:
    data = bytearray(SIGNATURE + b"\x21\x11\x00\x0c" + V4_BODY)
    data[position] ^= 0xFF
    with pytest.raises(ProxyV2Error, match="signature"):
        parse_proxy_v2(bytes(data[: position + 1]))
    with pytest.raises(ProxyV2Error, match="signature"):
        parse_proxy_v2(bytes(data))


@pytest.mark.parametrize(
    ("ver_cmd", "fam", "message"),
    [
        (0x11, 0x11, "version 1"),
        (0x31, 0x11, "version 3"),
        (0x01, 0x11, "version 0"),
        (0x22, 0x11, "unknown PROXY v2 command 0x2"),
        (0x2F, 0x11, "unknown PROXY v2 command 0xf"),
        (0x21, 0x41, "address family 0x4"),
        (0x21, 0xF1, "address family 0xf"),
        (0x21, 0x13, "transport protocol 0x3"),
        (0x21, 0x1F, "transport protocol 0xf"),
    ],
)
def test_bad_fixed_fields(ver_cmd: int, fam: int, message: str) -> None:
    data = raw_header(ver_cmd, fam, V4_BODY)
    with pytest.raises(ProxyV2Error, match=message):
        parse_proxy_v2(data)
    # Detected from the first 13/14 bytes, without waiting for the rest.
    with pytest.raises(ProxyV2Error, match=message):
        parse_proxy_v2(data[:14])


@pytest.mark.parametrize(
    ("fam", "length", "needed"),
    [(0x11, 11, 12), (0x11, 0, 12), (0x21, 35, 36), (0x22, 12, 36), (0x31, 215, 216)],
)
def test_length_too_short_for_the_family(fam: int, length: int, needed: int) -> None:
    data = raw_header(0x21, fam, bytes(length))
    with pytest.raises(ProxyV2Error, match=rf"too short for \w+ \(needs {needed}\)"):
        parse_proxy_v2(data)
    with pytest.raises(ProxyV2Error, match="too short"):
        parse_proxy_v2(data[:16])  # known from the length field alone


def test_local_command_ignores_a_short_address_block() -> None:
    header = parsed(raw_header(0x20, 0x11, b"\x01\x02\x03"))
    assert header.command is Command.LOCAL
    assert header.source is None and header.tlvs == ()
    assert header.consumed == 19


def test_local_command_with_addresses_does_not_expose_them() -> None:
    body = encode_proxy_v2(("192.0.2.1", 1), ("192.0.2.2", 2))[16:]
    header = parsed(raw_header(0x20, 0x11, body))
    assert header.command is Command.LOCAL
    assert header.family is Family.INET
    assert header.source is None and header.destination is None


def test_unspec_family_body_is_opaque() -> None:
    header = parsed(raw_header(0x21, 0x00, b"\xff\xff"))  # not valid TLVs: ignored
    assert header.family is Family.UNSPEC
    assert header.source is None and header.tlvs == ()


def test_unix_family_is_validated_but_not_decoded() -> None:
    body = b"/tmp/a".ljust(108, b"\x00") + b"/tmp/b".ljust(108, b"\x00") + b"\xe0\x00\x01z"
    header = parsed(raw_header(0x21, 0x31, body))
    assert header.family is Family.UNIX
    assert header.source is None
    assert header.tlvs == ((0xE0, b"z"),)


def test_over_long_header_is_rejected_from_the_length_field() -> None:
    limit_body = MAX_HEADER_LENGTH - 16
    assert MAX_HEADER_LENGTH == 65536
    fixed = SIGNATURE + struct.pack("!BBH", 0x21, 0x11, limit_body + 1)
    with pytest.raises(ProxyV2Error, match="exceeds the limit of 65536"):
        parse_proxy_v2(fixed)
    with pytest.raises(ProxyV2Error, match="exceeds"):
        parse_proxy_v2(SIGNATURE + b"\x21\x11\xff\xff")
    # Exactly at the limit is fine.
    body = V4_BODY + struct.pack("!BH", 0xE0, limit_body - 12 - 3) + bytes(limit_body - 15)
    header = parsed(raw_header(0x21, 0x11, body))
    assert header.consumed == MAX_HEADER_LENGTH


def test_a_lower_limit_can_be_configured() -> None:
    data = encode_proxy_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=[(0xE0, bytes(100))])
    with pytest.raises(ProxyV2Error, match="limit of 64"):
        parse_proxy_v2(data, max_header_length=64)
    with pytest.raises(ProxyV2Error, match="limit of 64"):
        ProxyV2Reader(max_header_length=64).feed(data[:16])
    with pytest.raises(ValueError, match="max_header_length"):
        ProxyV2Reader(max_header_length=MAX_HEADER_LENGTH + 1)
    with pytest.raises(ValueError, match="max_header_length"):
        ProxyV2Reader(max_header_length=15)


@pytest.mark.parametrize(
    ("tlv_bytes", "message"),
    [
        (b"\xe0", "truncated TLV header"),
        (b"\xe0\x00", "truncated TLV header"),
        (b"\xe0\x00\x05abc", "declares 5 bytes, only 3 left"),
        (b"\xe0\x00\x01a\xe1\x01\x00", "declares 256 bytes, only 0 left"),
        (b"\x03\x00\x02ab", "4-byte value"),
        (b"\x03\x00\x04\x00\x00\x00\x00\x03\x00\x04\x00\x00\x00\x00", "once"),
    ],
)
def test_malformed_tlvs(tlv_bytes: bytes, message: str) -> None:
    with pytest.raises(ProxyV2Error, match=message):
        parse_proxy_v2(raw_header(0x21, 0x11, V4_BODY + tlv_bytes))


def test_checksum_mismatch_is_rejected() -> None:
    data = bytearray(encode_proxy_v2(("192.0.2.1", 1), ("192.0.2.2", 2), checksum=True))
    data[16] ^= 0x01  # flip a bit of the source address
    with pytest.raises(ProxyV2Error, match="CRC32C mismatch"):
        parse_proxy_v2(bytes(data))


# --- incremental reading -------------------------------------------------------------------

HEADERS = [
    encode_proxy_v2(("192.0.2.1", 1234), ("198.51.100.1", 80)),
    encode_proxy_v2(
        ("2001:db8::7", 1), ("2001:db8::8", 443), "udp", [(PP2_TYPE_ALPN, b"h3")], checksum=True
    ),
    encode_proxy_v2_local(),
]


@pytest.mark.parametrize("data", HEADERS)
def test_every_proper_prefix_needs_more(data: bytes) -> None:
    for end in range(len(data)):
        assert parse_proxy_v2(data[:end]) is None
    assert parse_proxy_v2(data) is not None


@pytest.mark.parametrize("data", HEADERS)
def test_byte_at_a_time(data: bytes) -> None:
    reader = ProxyV2Reader()
    payload = b"GET / HTTP/1.1\r\n\r\n"
    stream = data + payload
    results = [reader.feed(stream[i : i + 1]) for i in range(len(data))]
    assert all(result is None for result in results[:-1])
    assert results[-1] == parse_proxy_v2(data)
    assert reader.header == results[-1]
    assert reader.trailing_data == b""
    with pytest.raises(RuntimeError, match="already complete"):
        reader.feed(payload)


def test_reader_keeps_bytes_after_the_header() -> None:
    reader = ProxyV2Reader()
    data = HEADERS[0]
    assert reader.feed(data[:5]) is None
    assert reader.trailing_data == b""
    header = reader.feed(data[5:] + b"hello")
    assert header is not None and header.source == ("192.0.2.1", 1234)
    assert reader.trailing_data == b"hello"


def test_reader_failure_is_terminal() -> None:
    reader = ProxyV2Reader()
    assert reader.feed(SIGNATURE[:4]) is None
    with pytest.raises(ProxyV2Error, match="signature") as first:
        reader.feed(b"GET")
    with pytest.raises(ProxyV2Error) as again:
        reader.feed(SIGNATURE)
    assert again.value is first.value
    assert reader.header is None and reader.trailing_data == b""
