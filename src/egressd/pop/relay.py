"""Tunnel relays: zero-copy `splice` between plain sockets, a buffered copy for TLS.

Theory of operation (splice): each direction owns a reader registration on its source
socket. When readable, it moves bytes socket -> pipe -> socket with `os.splice`, so the
payload never enters user space. A pipe is borrowed from a small pool only while bytes
are in flight and returned when it is empty, so an idle tunnel holds no pipe (a PoP with
9,000 idle tunnels would otherwise need 36,000 extra descriptors). When the destination
is full, the direction stops reading (backpressure) and waits until it is writable. EOF on
one side half-closes the other (`shutdown(SHUT_WR)`); the tunnel ends when both
directions have ended, on an error, on the idle timeout or on the lifetime limit.

There is no task per tunnel: the relay is readiness callbacks (on the PoP's `Poller`, or
on the event loop), so an established tunnel costs a few hundred bytes of Python objects
besides its two sockets.
"""

from __future__ import annotations

import _socket
import asyncio
import fcntl
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from egressd.pop.poller import Poller

_close = _socket.socket.close

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
CHUNK = 1 << 20
ROUNDS_PER_WAKEUP = 16  # bounded so that one busy tunnel cannot starve the loop
#: A read of at least this much is part of a transfer in progress: the next round follows
#: at once (see `on_readable`).
BULK_READ = 1 << 16


@dataclass(slots=True)
class RelayResult:
    bytes_up: int  # client -> upstream
    bytes_down: int  # upstream -> client
    closed_by: str  # "client", "upstream", "idle-timeout", "lifetime", "shutdown"
    error: str | None


class PipePool:
    """Empty pipes ready for reuse; bounded so a burst does not keep descriptors forever."""

    def __init__(self, keep: int = 64, pipe_size: int = 1 << 20) -> None:
        self.free: list[tuple[int, int]] = []
        self.keep = keep
        self.pipe_size = pipe_size

    def take(self) -> tuple[int, int]:
        if self.free:
            return self.free.pop()
        pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.pipe_size:
            try:  # a bigger pipe moves more per splice() call; the default is 64 KiB
                fcntl.fcntl(pipe[1], F_SETPIPE_SZ, self.pipe_size)
            except OSError:
                self.pipe_size = 0  # over the per-user pipe budget: keep the default
        return pipe

    def give(self, pipe: tuple[int, int]) -> None:
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        for read_end, write_end in self.free:
            os.close(read_end)
            os.close(write_end)
        self.free.clear()


class Readiness(Protocol):
    """Where a relay registers its readiness callbacks: the PoP's `Poller`, or an event loop
    (the same four methods)."""

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> object: ...

    def remove_reader(self, fd: int) -> bool: ...

    def add_writer(self, fd: int, callback: Callable[..., object], *args: Any) -> object: ...

    def remove_writer(self, fd: int) -> bool: ...


class _Direction:
    __slots__ = ("done", "dst", "dst_fd", "in_pipe", "pipe", "reading", "relay", "src", "src_fd",
                 "total", "writing")

    def __init__(self, relay: SpliceRelay, src: socket.socket, dst: socket.socket) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        # The numbers, read once: the sockets stay open (and theirs) until the relay closes.
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0
        self.total = 0
        self.done = False
        self.reading = False
        self.writing = False

    def on_readable(self) -> None:
        relay = self.relay
        pool = relay.pool
        src_fd = self.src_fd
        dst_fd = self.dst_fd
        try:
            for _ in range(ROUNDS_PER_WAKEUP):
                if self.pipe is None:
                    free = pool.free  # inline: one call less per message
                    self.pipe = free.pop() if free else pool.take()
                try:
                    moved = os.splice(src_fd, self.pipe[1], CHUNK, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    break
                except OSError as exc:
                    relay.fail(self, exc, reading=True)
                    return
                if moved == 0:  # EOF; the pipe is empty (each round drains it)
                    self.done = True
                    # The reader goes, unless the relay closes now and forgets it (`close`).
                    other = relay.down if self is relay.up else relay.up
                    if self.reading and (relay.forget is None or not other.done):
                        self.reading = False
                        relay.readiness.remove_reader(src_fd)
                    self._finish()
                    return
                self.total += moved
                # `_drain`, inline: once per message
                read_end = self.pipe[0]
                self.in_pipe += moved
                while self.in_pipe:
                    try:
                        self.in_pipe -= os.splice(read_end, dst_fd, self.in_pipe, flags=SPLICE_FLAGS)
                    except BlockingIOError:
                        self._pause_for_writable()
                        return  # the destination is full: on_writable goes on
                if moved < BULK_READ:
                    # A message: the socket was most likely drained, and readiness is
                    # level-triggered, so stopping here loses nothing and saves the splice
                    # that would only say EAGAIN (one system call per message). After a
                    # large read the next round goes on at once: the sender, on another
                    # core, has often refilled the socket by then, and a round that finds
                    # it is a wake-up of ours its sender does not pay for (+2-4 % bulk).
                    break
        except OSError as exc:
            relay.fail(self, exc, reading=False)
            return
        relay.last_activity = time.monotonic()
        if self.pipe is not None and self.in_pipe == 0:
            if len(pool.free) < pool.keep:  # `give`, inline: once per message
                pool.free.append(self.pipe)
            else:
                pool.give(self.pipe)
            self.pipe = None

    def _drain(self, dst_fd: int) -> bool:
        """Move what is in the pipe to the destination; False if it is full."""
        assert self.pipe is not None
        while self.in_pipe:
            try:
                self.in_pipe -= os.splice(self.pipe[0], dst_fd, self.in_pipe, flags=SPLICE_FLAGS)
            except BlockingIOError:
                self._pause_for_writable()
                return False
        return True

    def _pause_for_writable(self) -> None:
        readiness = self.relay.readiness
        if self.reading:
            readiness.remove_reader(self.src_fd)
            self.reading = False
        if not self.writing:
            readiness.add_writer(self.dst_fd, self.on_writable)
            self.writing = True

    def on_writable(self) -> None:
        try:
            if not self._drain(self.dst_fd):
                return
        except OSError as exc:
            self.relay.fail(self, exc, reading=False)
            return
        self.relay.readiness.remove_writer(self.dst_fd)
        self.writing = False
        if self.pipe is not None:
            self.relay.pool.give(self.pipe)
            self.pipe = None
        if self.done:
            self._finish()
        else:
            self.reading = True
            self.relay.readiness.add_reader(self.src_fd, self.on_readable)

    def _finish(self) -> None:
        relay = self.relay
        pipe = self.pipe
        if pipe is not None:
            self.pipe = None
            pool = relay.pool
            if len(pool.free) < pool.keep:  # `give`, inline
                pool.free.append(pipe)
            else:
                pool.give(pipe)
        other = relay.down if self is relay.up else relay.up
        if relay.ended_by is None:
            relay.ended_by = "client" if self is relay.up else "upstream"
        if other.done:  # both ended: close both sockets (close() sends the FIN)
            relay.close(relay.ended_by, None)
            return
        try:  # noqa: SIM105 (suppress() is three calls: hot path)
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self, *, unregister: bool = True) -> None:
        """`unregister` False: the relay forgets the sockets itself (`SpliceRelay.close`)."""
        readiness = self.relay.readiness
        if self.reading:
            if unregister:
                readiness.remove_reader(self.src_fd)
            self.reading = False
        if self.writing:
            if unregister:
                readiness.remove_writer(self.dst_fd)
            self.writing = False
        if self.pipe is not None:
            # A pipe with bytes still inside cannot be reused: close it.
            if self.in_pipe:
                os.close(self.pipe[0])
                os.close(self.pipe[1])
            else:
                self.relay.pool.give(self.pipe)
            self.pipe = None


class SpliceRelay:
    """Relays a client socket and an upstream socket until both directions end."""

    __slots__ = ("client", "down", "ended_by", "forget", "last_activity", "on_close", "pool",
                 "readiness", "registry", "started", "up", "upstream")

    def __init__(
        self,
        readiness: Readiness,
        pool: PipePool,
        client: socket.socket,
        upstream: socket.socket,
        on_close: Callable[[RelayResult], None],
        registry: RelayRegistry,
        *,
        sole_owner: bool = False,
    ) -> None:
        """`sole_owner`: `readiness` is a `Poller`, and no other descriptor shares either
        socket (the plain handshake's, from `accept` and `start_connect`), so closing them
        takes them out of its epoll set: the relay forgets them instead of removing them,
        one `epoll_ctl` less per socket."""
        self.readiness = readiness
        self.forget = readiness.forget if sole_owner and isinstance(readiness, Poller) else None
        self.pool = pool
        self.client = client
        self.upstream = upstream
        self.on_close: Callable[[RelayResult], None] | None = on_close
        self.registry = registry
        self.up = _Direction(self, client, upstream)
        self.down = _Direction(self, upstream, client)
        self.ended_by: str | None = None
        self.started = self.last_activity = time.monotonic()

    def start(self, *, replacing_writer: Poller | None = None) -> None:
        """Register both readers. `replacing_writer`: the upstream has a writer in this
        poller (the connect's) that the upstream's reader replaces in one change."""
        self.registry.add(self)
        up, down = self.up, self.down
        up.reading = down.reading = True
        self.readiness.add_reader(up.src_fd, up.on_readable)
        if replacing_writer is not None:
            replacing_writer.swap_to_reader(down.src_fd, down.on_readable)
        else:
            self.readiness.add_reader(down.src_fd, down.on_readable)

    def fail(self, direction: _Direction, exc: OSError, *, reading: bool) -> None:
        """An error on a socket: `reading` says it came from the direction's source."""
        source_is_client = direction is self.up
        side = "client" if source_is_client == reading else "upstream"
        self.close(side, os.strerror(exc.errno) if exc.errno else str(exc))

    def close(self, closed_by: str, error: str | None) -> None:
        if self.on_close is None:
            return
        forget = self.forget
        for direction in (self.up, self.down):
            if direction.reading or direction.writing or direction.pipe is not None:
                direction.stop(unregister=forget is None)
        if forget is not None:
            forget(self.up.src_fd)
            forget(self.down.src_fd)
        # `_socket.socket.close`: what `socket.close` ends in, minus its two Python calls
        # (they serve `makefile`, which relay sockets never have).
        _close(self.client)
        _close(self.upstream)
        self.registry.discard(self)
        callback, self.on_close = self.on_close, None
        callback(RelayResult(self.up.total, self.down.total, closed_by, error))


class BufferedRelay:
    """Copies between two asyncio streams (used when one side is TLS). Returns when done.

    The idle clock is shared: the tunnel is idle only when neither direction moved a byte.
    """

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self.bytes_up = 0
        self.bytes_down = 0
        self.closed_by = "client"
        self.error: str | None = None
        self.first_eof: str | None = None  # the side that closed first, like the splice relay
        self.last_activity = time.monotonic()

    async def run(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> RelayResult:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._copy(client[0], upstream[1], up=True, other=client[1]))
            group.create_task(self._copy(upstream[0], client[1], up=False, other=upstream[1]))
        return RelayResult(self.bytes_up, self.bytes_down, self.first_eof or self.closed_by, self.error)

    async def _read(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next bytes, b"" at EOF, or None once the whole tunnel has been idle too long."""
        while True:
            remaining = self.last_activity + self.idle_timeout - time.monotonic()
            if remaining <= 0:
                return None
            try:
                async with asyncio.timeout(remaining):
                    return await reader.read(1 << 16)
            except TimeoutError:
                continue  # the other direction may have been active meanwhile

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool,
                    other: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await self._read(reader)
                if data is None:
                    self.closed_by, self.error = "idle-timeout", None
                    writer.close()
                    other.close()
                    return
                if not data:
                    self.first_eof = self.first_eof or ("client" if up else "upstream")
                    if writer.can_write_eof():
                        writer.write_eof()
                    break
                self.last_activity = time.monotonic()
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            self.closed_by = "client" if up else "upstream"
            self.error = str(exc) or type(exc).__name__
            writer.close()


class RelayRegistry:
    """All live splice relays of a process: one sweeper enforces idle and lifetime limits
    (one timer for all tunnels instead of one per tunnel), and shutdown can end them all."""

    def __init__(self, idle_timeout: float, max_lifetime: float | None) -> None:
        self.idle_timeout = idle_timeout
        self.max_lifetime = max_lifetime
        self._relays: set[SpliceRelay] = set()

    def add(self, relay: SpliceRelay) -> None:
        self._relays.add(relay)

    def discard(self, relay: SpliceRelay) -> None:
        self._relays.discard(relay)

    def __len__(self) -> int:
        return len(self._relays)

    def sweep(self, now: float) -> int:
        """Close relays past their limits; returns how many were closed."""
        closed = 0
        for relay in list(self._relays):
            if now - relay.last_activity > self.idle_timeout:
                relay.close("idle-timeout", None)
                closed += 1
            elif self.max_lifetime is not None and now - relay.started > self.max_lifetime:
                relay.close("lifetime", None)
                closed += 1
        return closed

    def close_all(self, reason: str = "shutdown") -> None:
        for relay in list(self._relays):
            relay.close(reason, None)

    async def run_sweeper(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.sweep(time.monotonic())
