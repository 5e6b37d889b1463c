"""UDP datagrams over a mux stream, as CONNECT-UDP DATAGRAM capsules (RFC 9297/9298).

Open the stream with ``protocol="connect-udp"``. Datagrams are delivered reliably and in
order (the stream is TCP underneath); ``send`` waits when the peer's window is full, so a
caller relaying from a UDP socket may prefer to drop rather than wait (see
``send_window``).
"""

from __future__ import annotations

from collections import deque

from egressd.mux.capsule import CapsuleError, CapsuleReader, encode_datagram
from egressd.mux.errors import MuxError
from egressd.mux.link import MuxStream

__all__ = ["DatagramStream"]


class DatagramStream:
    """Wraps a ``MuxStream``: ``send``/``recv`` whole datagrams (empty ones included)."""

    def __init__(self, stream: MuxStream) -> None:
        self.stream = stream
        self._reader = CapsuleReader()
        self._received: deque[bytes] = deque()

    async def send(self, payload: bytes) -> None:
        try:
            capsule = encode_datagram(payload)
        except CapsuleError as error:
            raise MuxError(str(error)) from None
        await self.stream.write(capsule)

    async def recv(self) -> bytes:
        """The next datagram's payload; ``EOFError`` once the peer ended the stream."""
        while not self._received:
            data = await self.stream.read()
            if not data:
                if self._reader.pending:
                    raise MuxError("stream ended inside a capsule")
                raise EOFError("the peer ended the datagram stream")
            try:
                datagrams = self._reader.feed(data)
            except CapsuleError as error:
                self.stream.reset()
                raise MuxError(f"bad capsule from the peer: {error}") from None
            self._received.extend(d.payload for d in datagrams if d.context_id == 0)
        return self._received.popleft()

    async def close(self) -> None:
        """No more datagrams from this side (END_STREAM)."""
        await self.stream.write_eof()
