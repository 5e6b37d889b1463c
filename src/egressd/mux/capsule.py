"""HTTP capsules (RFC 9297) and the DATAGRAM capsule of CONNECT-UDP (RFC 9298): pure codec.

A UDP datagram travels on a stream as one DATAGRAM capsule: type 0x00, length, then the
context id 0 and the UDP payload, all lengths as QUIC variable-length integers (RFC 9000
§16). Empty datagrams are valid. ``CapsuleReader`` takes stream bytes in any slicing and
returns whole capsules; capsules of unknown types are skipped, as RFC 9297 requires.

The varint is written here (a dozen lines) rather than borrowed from aioquic's buffer,
so that the link layer does not depend on the QUIC stack.

What it does not know: streams, sockets, other capsule types' meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "DATAGRAM",
    "MAX_CAPSULE",
    "CapsuleError",
    "CapsuleReader",
    "decode_varint",
    "encode_datagram",
    "encode_varint",
]

DATAGRAM: Final = 0x00
#: Largest capsule value accepted: a maximal UDP payload plus its context id.
MAX_CAPSULE: Final = 65_535 + 8
_VARINT_LIMIT: Final = 2**62


class CapsuleError(ValueError):
    """Malformed or oversized capsule: the stream carrying it must be aborted."""


def encode_varint(value: int) -> bytes:
    if value < 0x40:
        return value.to_bytes(1, "big")
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    if value < _VARINT_LIMIT:
        return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")
    raise ValueError(f"{value} does not fit a QUIC varint")


def decode_varint(data: bytes | bytearray, offset: int = 0) -> tuple[int, int] | None:
    """(value, offset after it), or ``None`` if ``data`` ends inside it."""
    if offset >= len(data):
        return None
    length = 1 << (data[offset] >> 6)
    end = offset + length
    if end > len(data):
        return None
    value = int.from_bytes(data[offset:end], "big") & ((1 << (8 * length - 2)) - 1)
    return value, end


def encode_datagram(payload: bytes, context_id: int = 0) -> bytes:
    """One DATAGRAM capsule carrying ``payload`` (a UDP payload for context id 0)."""
    value = encode_varint(context_id) + payload
    if len(value) > MAX_CAPSULE:
        raise CapsuleError(f"datagram of {len(payload)} bytes is too large")
    return encode_varint(DATAGRAM) + encode_varint(len(value)) + value


@dataclass(frozen=True, slots=True)
class Datagram:
    context_id: int
    payload: bytes


class CapsuleReader:
    """Stream bytes in, DATAGRAM capsules out."""

    def __init__(self, max_capsule: int = MAX_CAPSULE) -> None:
        self._buffer = bytearray()
        self._max = max_capsule

    def feed(self, data: bytes) -> list[Datagram]:
        self._buffer += data
        datagrams: list[Datagram] = []
        offset = 0
        while True:
            kind = decode_varint(self._buffer, offset)
            if kind is None:
                break
            length = decode_varint(self._buffer, kind[1])
            if length is None:
                break
            if length[0] > self._max:
                raise CapsuleError(f"capsule of {length[0]} bytes exceeds {self._max}")
            end = length[1] + length[0]
            if end > len(self._buffer):
                break
            if kind[0] == DATAGRAM:
                context = decode_varint(self._buffer[length[1] : end])
                if context is None:
                    raise CapsuleError("DATAGRAM capsule without a context id")
                payload = bytes(self._buffer[length[1] + context[1] : end])
                datagrams.append(Datagram(context[0], payload))
            offset = end
        del self._buffer[:offset]
        return datagrams

    @property
    def pending(self) -> int:
        """Bytes of an incomplete capsule held back."""
        return len(self._buffer)
