"""Relay between a mux stream and a connected socket, both ways, with half-close.

Each direction is a task: stream -> socket ends with ``shutdown(SHUT_WR)`` when the peer
ends the stream; socket -> stream ends with ``write_eof`` at the socket's EOF. Both
directions apply backpressure: the stream's reader side returns window credit only as
bytes reach the socket, and the socket is read only as fast as the stream's window opens.

A failure in one direction stops the other: a socket error resets the stream (the peer
learns the flow broke); a stream failure (reset by the peer, link lost) ends the relay at
once, even while both directions are blocked on the socket, and leaves the socket to the
caller. ``pump`` closes neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from egressd.mux.errors import MuxError, PumpError, Side
from egressd.mux.link import MuxStream

__all__ = ["carry", "pump", "reset_close"]

log = logging.getLogger("egressd.mux")

CHUNK: Final = 256 * 1024
_T = TypeVar("_T")


async def pump(stream: MuxStream, sock: socket.socket,
               activity: Callable[[], None] | None = None) -> tuple[int, int]:
    """Relay until both directions have ended: (bytes stream->socket, bytes socket->stream).

    Raises ``PumpError`` (with both counts so far) when either side fails. ``activity``,
    if given, is called for every chunk either way (an idle timer's heartbeat).
    """
    loop = asyncio.get_running_loop()
    counts = [0, 0]  # to socket, to stream

    async def to_socket() -> None:
        while data := await _stream_side(stream.read()):
            await _socket_side(loop.sock_sendall(sock, data))
            counts[0] += len(data)
            if activity is not None:
                activity()
        with contextlib.suppress(OSError):  # the other end may be gone already
            sock.shutdown(socket.SHUT_WR)

    async def to_stream() -> None:
        while data := await _socket_side(loop.sock_recv(sock, CHUNK)):
            await _stream_side(stream.write(data))
            counts[1] += len(data)
            if activity is not None:
                activity()
        await _stream_side(stream.write_eof())

    reader = asyncio.ensure_future(to_socket())
    writer = asyncio.ensure_future(to_stream())
    watch: asyncio.Future[MuxError] = asyncio.ensure_future(stream.wait_failed())
    failure: _Failed | None = None
    try:
        running: set[asyncio.Future[Any]] = {reader, writer}
        while running and failure is None:
            waiting: set[asyncio.Future[Any]] = {*running, watch}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in (reader, writer):
                if task in done and (error := task.exception()) is not None:
                    if not isinstance(error, _Failed):
                        raise error  # a bug, not a network event
                    failure = error
                    break
            running -= done
            if watch in done and failure is None:
                if writer in running:  # our direction can no longer be delivered
                    failure = _Failed(Side.STREAM, watch.result())
                else:  # ours is done; theirs may still deliver what was buffered
                    watch = loop.create_future()
    finally:
        everything: list[asyncio.Future[Any]] = [reader, writer, watch]
        for future in everything:
            future.cancel()
        await asyncio.gather(*everything, return_exceptions=True)
    if failure is not None:
        if failure.side is Side.SOCKET:
            stream.reset()
        raise PumpError(failure.side, failure.error, counts[0], counts[1]) from failure.error
    return counts[0], counts[1]


async def carry(stream: MuxStream, sock: socket.socket, *, what: str) -> None:
    """Pump `stream` and `sock` (one end of a socket pair) until done; then release the
    stream and close the socket: cleanly after a clean end, with a reset when the link is
    lost or the flow is cancelled (the relay on the pair's other end must see an error, not
    a clean end). `what` names the flow and link in the log line."""
    try:
        await pump(stream, sock)
    except MuxError as error:
        log.info("%s lost: %s", what, error)
        reset_close(sock)
        return
    except asyncio.CancelledError:
        stream.reset()
        reset_close(sock)
        raise
    finally:
        stream.release()
    sock.close()


def reset_close(sock: socket.socket) -> None:
    """Close with a TCP-style reset where the socket type allows it (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Failed(Exception):
    def __init__(self, side: Side, error: BaseException) -> None:
        super().__init__(side, error)
        self.side = side
        self.error = error


async def _stream_side(operation: Awaitable[_T]) -> _T:
    try:
        return await operation
    except MuxError as error:
        raise _Failed(Side.STREAM, error) from error


async def _socket_side(operation: Awaitable[_T]) -> _T:
    try:
        return await operation
    except OSError as error:
        raise _Failed(Side.SOCKET, error) from error
