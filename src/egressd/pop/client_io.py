"""The device side of a connection, as a plain socket or a TLS stream.

Handlers speak to `ClientIO` and never know which one they have. The difference shows
only in `tunnel`: a plain socket is spliced (zero-copy, no task kept per tunnel), a TLS
stream is copied through user space by a task that lives as long as the tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from egressd.pop.relay import BufferedRelay, PipePool, RelayRegistry, RelayResult, SpliceRelay

if TYPE_CHECKING:
    from egressd.pop.flowlog import FlowRecord
    from egressd.pop.runtime import PopRuntime

RECV_SIZE = 65536
log = logging.getLogger("egressd.pop")


class ClientIO(Protocol):
    peer: tuple[str, int]
    local: tuple[str, int]
    is_tls: bool

    async def recv(self) -> bytes: ...

    async def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    async def tunnel(self, upstream: socket.socket, on_close: Callable[[RelayResult], None],
                     registry: RelayRegistry, pipes: PipePool, idle_timeout: float) -> None: ...


class SocketIO:
    """A plain TCP client socket (non-blocking), driven with the loop's sock_* calls."""

    __slots__ = ("is_tls", "local", "loop", "peer", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.peer = sock.getpeername()[:2]
        self.local = sock.getsockname()[:2]
        self.is_tls = False

    async def recv(self) -> bytes:
        # Try the socket first: uvloop's sock_recv always polls (two epoll_ctl calls and a
        # loop iteration) even when the bytes are already there.
        try:
            return self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            pass
        except (ConnectionError, OSError):
            return b""
        try:
            return await self.loop.sock_recv(self.sock, RECV_SIZE)
        except (ConnectionError, OSError):
            return b""

    async def send(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            await self.loop.sock_sendall(self.sock, data[sent:])

    def close(self) -> None:
        self.sock.close()

    async def tunnel(self, upstream: socket.socket, on_close: Callable[[RelayResult], None],
                     registry: RelayRegistry, pipes: PipePool, idle_timeout: float) -> None:
        """Start a splice relay and return at once: the relay owns both sockets now."""
        SpliceRelay(self.loop, pipes, self.sock, upstream, on_close, registry).start()


class StreamIO:
    """A TLS client connection as asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = writer.get_extra_info("peername")[:2]
        self.local = writer.get_extra_info("sockname")[:2]
        self.is_tls = True

    async def recv(self) -> bytes:
        try:
            return await self.reader.read(RECV_SIZE)
        except (ConnectionError, OSError):
            return b""

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()

    async def tunnel(self, upstream: socket.socket, on_close: Callable[[RelayResult], None],
                     registry: RelayRegistry, pipes: PipePool, idle_timeout: float) -> None:
        """Copy through user space until the tunnel ends (TLS cannot be spliced)."""
        result = RelayResult(0, 0, "client", None)
        try:
            up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        except OSError as exc:
            upstream.close()
            self.close()
            on_close(RelayResult(0, 0, "upstream", str(exc)))
            return
        try:
            result = await BufferedRelay(idle_timeout).run((self.reader, self.writer), (up_reader, up_writer))
        finally:
            up_writer.close()
            self.writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()
            on_close(result)


async def start_tunnel(runtime: PopRuntime, io: ClientIO, upstream: socket.socket,
                       record: FlowRecord, reply: bytes, early_data: bytes) -> bool:
    """Answer the client (`reply`), forward bytes it sent early, and relay until the
    tunnel ends; the flow is logged when it does. Returns True if the client socket now
    belongs to a relay (plain sockets), False if it is the caller's to close."""
    try:
        await io.send(reply)
        if early_data:
            await asyncio.get_running_loop().sock_sendall(upstream, early_data)
            record.bytes_up += len(early_data)
    except (ConnectionError, OSError) as exc:
        upstream.close()
        record.outcome, record.closed_by, record.error = "client-error", "client", str(exc)
        runtime.finish(record)
        return False
    await io.tunnel(upstream, tunnel_started(runtime, record), runtime.relays, runtime.pipes,
                    runtime.options.idle_timeout)
    return not io.is_tls


def tunnel_started(runtime: PopRuntime, record: FlowRecord) -> Callable[[RelayResult], None]:
    """Count the tunnel as active; the returned callback ends its flow when the relay does."""
    flow_metrics = runtime.flow_metrics
    flow_metrics.tcp_opened()

    def on_close(result: RelayResult) -> None:
        flow_metrics.tcp_closed()
        record.bytes_up += result.bytes_up
        record.bytes_down += result.bytes_down
        record.closed_by, record.error = result.closed_by, result.error
        runtime.finish(record)

    return on_close


async def guarded(serving: Coroutine[Any, Any, bool], close: Callable[[], None],
                  peer: tuple[str, int]) -> None:
    """Await a handler; close the connection unless it was handed off. A bug costs one
    connection, never the PoP."""
    handed_off = False
    try:
        handed_off = await serving
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error serving %s:%s", peer[0], peer[1])
    finally:
        if not handed_off:
            close()
