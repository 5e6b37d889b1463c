"""PROXY protocol version 2 (haproxy's proxy-protocol.txt, section 2.2), sans-I/O.

A PoP prepends this binary header to a connection to an in-network origin so that the
origin sees the flow's logical source (the dedicated address, rule R8) instead of the
PoP's physical one; the echo origin reads it to show both.

Theory of operation: the header is a 16-byte fixed part (12-byte signature, version and
command, family and transport, 16-bit length) followed by ``length`` bytes holding the
addresses and then type-length-value records (TLVs). :class:`ProxyV2Reader` is a
one-shot machine with three states: it *reads* until it holds ``16 + length`` bytes,
then is *done* (the header is returned once and any bytes past it are the payload,
kept in :attr:`ProxyV2Reader.trailing_data`) or has *failed* (every later call raises
the same :class:`ProxyV2Error`). Input is rejected as early as it can be: a byte that
leaves the signature, a bad version or an unknown command, family or transport is an
error as soon as it arrives, without waiting for the rest.

What it does not know: sockets, timeouts, who is trusted to send the header, PROXY
protocol version 1 (text), the SSL sub-TLVs (returned raw) and AF_UNIX paths (the
block is validated for length but not decoded).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "MAX_HEADER_LENGTH",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "SIGNATURE",
    "Command",
    "Family",
    "ProxyV2Error",
    "ProxyV2Header",
    "ProxyV2Reader",
    "Transport",
    "crc32c",
    "encode_proxy_v2",
    "encode_proxy_v2_local",
    "looks_like_proxy_v2",
    "parse_proxy_v2",
]

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_FIXED_LENGTH: Final = 16
#: Longest header accepted or produced: 64 KiB. The 16-bit length field alone would
#: allow 16 + 65535 bytes; no sender needs that, and a bound keeps buffers small.
MAX_HEADER_LENGTH: Final = 64 * 1024
_VERSION: Final = 0x2

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_TYPE_NETNS: Final = 0x30


class ProxyV2Error(ValueError):
    """The bytes are not a valid PROXY v2 header; the connection must be dropped."""


class Command(enum.IntEnum):
    """Low nibble of byte 13: LOCAL (health check, use the real endpoints) or PROXY."""

    LOCAL = 0x0
    PROXY = 0x1


class Family(enum.IntEnum):
    """High nibble of byte 14: the address family of the carried addresses."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    """Low nibble of byte 14: the transport of the proxied connection."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


# Size of the address block per family: two addresses and, for INET/INET6, two ports.
_ADDRESS_BLOCK: Final[dict[Family, int]] = {
    Family.UNSPEC: 0,
    Family.INET: 4 + 4 + 2 + 2,
    Family.INET6: 16 + 16 + 2 + 2,
    Family.UNIX: 108 + 108,
}

_COMMANDS: Final = frozenset(int(value) for value in Command)
_FAMILIES: Final = frozenset(int(value) for value in Family)
_TRANSPORTS: Final = frozenset(int(value) for value in Transport)

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ProxyV2Header:
    """One parsed header.

    ``source``/``destination`` are set only for a PROXY command over INET or INET6;
    for LOCAL, UNSPEC and UNIX the receiver uses the real connection endpoints.
    ``consumed`` is the header's length: the payload starts at that offset.
    """

    consumed: int
    command: Command
    family: Family
    transport: Transport
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...]

    def tlv(self, tlv_type: int) -> bytes | None:
        """The value of the first TLV of ``tlv_type``, or None."""
        for found_type, value in self.tlvs:
            if found_type == tlv_type:
                return value
        return None


# --- CRC32C -------------------------------------------------------------------------
# Written by hand: the standard library has no Castagnoli CRC, headers are short, and a
# dependency for 10 lines is not worth it.


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as used by the PP2_TYPE_CRC32C TLV."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- encoding -----------------------------------------------------------------------


_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_endpoint(endpoint: Address, role: str) -> tuple[_IPAddress, int]:
    host, port = endpoint
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{role} {host!r} is not an IP address literal") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; carry them as IPv4.
        address = address.ipv4_mapped
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"{role} port {port} is out of range 0..65535")
    return address, port


def _encode_tlvs(tlvs: Sequence[tuple[int, bytes]]) -> bytes:
    parts = []
    for tlv_type, value in tlvs:
        if not 0 <= tlv_type <= 0xFF:
            raise ValueError(f"TLV type {tlv_type} is out of range 0..255")
        if len(value) > 0xFFFF:
            raise ValueError(f"TLV {tlv_type:#04x} value is {len(value)} bytes, max 65535")
        parts.append(struct.pack("!BH", tlv_type, len(value)) + bytes(value))
    return b"".join(parts)


def encode_proxy_v2(
    source: Address,
    destination: Address,
    transport: Literal["tcp", "udp"] = "tcp",
    tlvs: Sequence[tuple[int, bytes]] = (),
    *,
    checksum: bool = False,
) -> bytes:
    """A PROXY-command header saying the flow comes from ``source`` to ``destination``.

    Both must be IP literals of the same family (IPv4-mapped IPv6 counts as IPv4).
    ``checksum`` appends a PP2_TYPE_CRC32C TLV so the receiver can detect corruption.
    """
    source_ip, source_port = _parse_endpoint(source, "source")
    destination_ip, destination_port = _parse_endpoint(destination, "destination")
    if source_ip.version != destination_ip.version:
        raise ValueError(
            f"source {source_ip} and destination {destination_ip} are not the same family"
        )
    family = Family.INET if source_ip.version == 4 else Family.INET6
    if transport == "tcp":
        wire_transport = Transport.STREAM
    elif transport == "udp":
        wire_transport = Transport.DGRAM
    else:
        raise ValueError(f"transport must be 'tcp' or 'udp', not {transport!r}")
    body = (
        source_ip.packed
        + destination_ip.packed
        + struct.pack("!HH", source_port, destination_port)
        + _encode_tlvs(tlvs)
    )
    if checksum:
        body += struct.pack("!BHI", PP2_TYPE_CRC32C, 4, 0)
    if _FIXED_LENGTH + len(body) > MAX_HEADER_LENGTH:
        raise ValueError(
            f"header would be {_FIXED_LENGTH + len(body)} bytes, max {MAX_HEADER_LENGTH}"
        )
    header = (
        SIGNATURE
        + struct.pack(
            "!BBH", (_VERSION << 4) | Command.PROXY, (family << 4) | wire_transport, len(body)
        )
        + body
    )
    if checksum:
        header = header[:-4] + struct.pack("!I", crc32c(header))
    return header


def encode_proxy_v2_local() -> bytes:
    """A LOCAL-command header (health checks): the receiver uses the real endpoints."""
    return SIGNATURE + struct.pack(
        "!BBH", (_VERSION << 4) | Command.LOCAL, (Family.UNSPEC << 4) | Transport.UNSPEC, 0
    )


# --- decoding -----------------------------------------------------------------------


def looks_like_proxy_v2(prefix: bytes) -> bool:
    """Whether ``prefix`` can still be the start of a PROXY v2 header.

    False is final: this is not PROXY v2. True is final once ``len(prefix) >= 12``
    (the whole signature matched); before that it means "need more bytes". An empty
    prefix is True. Plain HTTP fails on its first byte, so sniffing costs nothing.
    """
    length = min(len(prefix), len(SIGNATURE))
    return prefix[:length] == SIGNATURE[:length]


def _check_fixed_part(data: bytes, max_header_length: int) -> int | None:
    """Validate as much of the 16-byte fixed part as is present; the total length."""
    if not looks_like_proxy_v2(data):
        raise ProxyV2Error("not a PROXY v2 header: signature mismatch")
    if len(data) > 12:
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != _VERSION:
            raise ProxyV2Error(f"unsupported PROXY protocol version {version}, expected 2")
        if command not in _COMMANDS:
            raise ProxyV2Error(f"unknown PROXY v2 command {command:#x}")
    if len(data) > 13:
        family, transport = data[13] >> 4, data[13] & 0x0F
        if family not in _FAMILIES:
            raise ProxyV2Error(f"unknown PROXY v2 address family {family:#x}")
        if transport not in _TRANSPORTS:
            raise ProxyV2Error(f"unknown PROXY v2 transport protocol {transport:#x}")
    if len(data) < _FIXED_LENGTH:
        return None
    (body_length,) = struct.unpack_from("!H", data, 14)
    total = _FIXED_LENGTH + int(body_length)
    if total > max_header_length:
        raise ProxyV2Error(
            f"PROXY v2 header of {total} bytes exceeds the limit of {max_header_length}"
        )
    command = Command(data[12] & 0x0F)
    family = Family(data[13] >> 4)
    needed = _ADDRESS_BLOCK[family]
    if command is Command.PROXY and body_length < needed:
        raise ProxyV2Error(
            f"PROXY v2 length {body_length} is too short for {family.name} (needs {needed})"
        )
    return total


def _parse_tlvs(block: bytes, offset: int) -> tuple[tuple[tuple[int, bytes], ...], int | None]:
    """The TLVs from ``offset`` on, and the block offset of a CRC32C value if any."""
    tlvs = []
    crc_offset: int | None = None
    while offset < len(block):
        if len(block) - offset < 3:
            raise ProxyV2Error(f"truncated TLV header at offset {_FIXED_LENGTH + offset}")
        tlv_type, length = struct.unpack_from("!BH", block, offset)
        offset += 3
        if len(block) - offset < length:
            raise ProxyV2Error(
                f"TLV {tlv_type:#04x} declares {length} bytes, only {len(block) - offset} left"
            )
        if tlv_type == PP2_TYPE_CRC32C:
            if crc_offset is not None or length != 4:
                raise ProxyV2Error("PP2_TYPE_CRC32C must appear once with a 4-byte value")
            crc_offset = offset
        tlvs.append((int(tlv_type), block[offset : offset + length]))
        offset += length
    return tuple(tlvs), crc_offset


def _verify_checksum(header: bytes, value_offset: int) -> None:
    """Reject a header whose PP2_TYPE_CRC32C does not match (the spec's MUST)."""
    (expected,) = struct.unpack_from("!I", header, value_offset)
    zeroed = header[:value_offset] + b"\x00" * 4 + header[value_offset + 4 :]
    if crc32c(zeroed) != expected:
        raise ProxyV2Error("PROXY v2 header CRC32C mismatch")


def _decode(header: bytes) -> ProxyV2Header:
    """Decode a complete header whose fixed part was already validated."""
    command = Command(header[12] & 0x0F)
    family = Family(header[13] >> 4)
    transport = Transport(header[13] & 0x0F)
    block = header[_FIXED_LENGTH:]
    address_length = _ADDRESS_BLOCK[family]
    source: Address | None = None
    destination: Address | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    # UNSPEC carries no address and its body is opaque; a LOCAL header may be too short
    # for its family: both are ignored per the spec (use the real endpoints).
    if family is not Family.UNSPEC and len(block) >= address_length:
        tlvs, crc_offset = _parse_tlvs(block, address_length)
        if crc_offset is not None:
            _verify_checksum(header, _FIXED_LENGTH + crc_offset)
        if command is Command.PROXY and family in (Family.INET, Family.INET6):
            size = 4 if family is Family.INET else 16
            source_ip = ipaddress.ip_address(block[:size])
            destination_ip = ipaddress.ip_address(block[size : 2 * size])
            source_port, destination_port = struct.unpack_from("!HH", block, 2 * size)
            source = (str(source_ip), int(source_port))
            destination = (str(destination_ip), int(destination_port))
    return ProxyV2Header(
        consumed=len(header),
        command=command,
        family=family,
        transport=transport,
        source=source,
        destination=destination,
        tlvs=tlvs,
    )


def parse_proxy_v2(
    data: bytes, *, max_header_length: int = MAX_HEADER_LENGTH
) -> ProxyV2Header | None:
    """Parse the header at the start of ``data``; None if more bytes are needed.

    Raises :class:`ProxyV2Error` as soon as the bytes cannot be a valid header,
    including a header longer than ``max_header_length``. Bytes after
    ``header.consumed`` are the payload and are not looked at.
    """
    total = _check_fixed_part(data, max_header_length)
    if total is None or len(data) < total:
        return None
    return _decode(bytes(data[:total]))


class _State(enum.Enum):
    READING = enum.auto()  # -> DONE on a complete header, -> FAILED on an error
    DONE = enum.auto()  # terminal: the header was returned
    FAILED = enum.auto()  # terminal: every call raises the stored error


class ProxyV2Reader:
    """Incremental reader: feed bytes as they arrive, get the header once.

    >>> reader = ProxyV2Reader()
    >>> reader.feed(chunk)          # None until complete, then the header
    >>> reader.trailing_data        # bytes received after the header (the payload)
    """

    def __init__(self, *, max_header_length: int = MAX_HEADER_LENGTH) -> None:
        if not _FIXED_LENGTH <= max_header_length <= MAX_HEADER_LENGTH:
            raise ValueError(f"max_header_length must be in {_FIXED_LENGTH}..{MAX_HEADER_LENGTH}")
        self._max_header_length = max_header_length
        self._buffer = bytearray()
        self._state = _State.READING
        self._error: ProxyV2Error | None = None
        self._header: ProxyV2Header | None = None
        self._total: int | None = None  # header length, once the fixed part is in

    @property
    def header(self) -> ProxyV2Header | None:
        """The parsed header once complete, else None."""
        return self._header

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the end of the header (empty until it is complete)."""
        if self._state is not _State.DONE:
            return b""
        return bytes(self._buffer)

    def feed(self, data: bytes) -> ProxyV2Header | None:
        """Add received bytes; the header when it is complete, else None.

        Raises :class:`ProxyV2Error` on malformed input, and again on every later call.
        Feeding after the header is complete is a usage error (``RuntimeError``): the
        payload belongs to the next protocol layer.
        """
        if self._error is not None:
            raise self._error
        if self._state is _State.DONE:
            raise RuntimeError("PROXY v2 header already complete; take trailing_data")
        self._buffer += data
        if self._total is not None and len(self._buffer) < self._total:
            return None  # length known and validated: nothing to look at until it is all here
        try:
            data_so_far = bytes(self._buffer)
            self._total = _check_fixed_part(data_so_far, self._max_header_length)
            header = parse_proxy_v2(data_so_far, max_header_length=self._max_header_length)
        except ProxyV2Error as error:
            self._state = _State.FAILED
            self._error = error
            raise
        if header is None:
            return None
        del self._buffer[: header.consumed]
        self._state = _State.DONE
        self._header = header
        return header
