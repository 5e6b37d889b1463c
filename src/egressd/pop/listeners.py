"""Device-facing listeners: accept, sniff the protocol, hand to the HTTP or SOCKS5 handler.

A plain listener accepts raw sockets itself (so tunnels can be spliced) and serves HTTP
proxy and SOCKS5 on one port: a first byte of 0x05 is SOCKS5, anything else HTTP. Its
connections start as callbacks (`plain_handshake`: a CONNECT to an address literal needs
no task at all) and go to the coroutine handlers below for anything else. A TLS
listener ("HTTPS proxy") serves HTTP over asyncio streams. Every connection task belongs
to its listener, which cancels and awaits them on close: nothing is left behind. A plain
connection that forwards absolute-form requests is driven by transport callbacks
(`http_forward`); its task only waits for it to end, and a drain closes it once idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from egressd.pop.admission import PeerSet, SourceCounter
from egressd.pop.client_io import ClientIO, SocketIO, StreamIO, guarded
from egressd.pop.http_forward import ForwardProxyProtocol
from egressd.pop.http_proxy import serve_http
from egressd.pop.plain_handshake import PlainHandshake
from egressd.pop.poller import Poller
from egressd.pop.runtime import PopRuntime
from egressd.pop.socks_proxy import serve_socks5
from egressd.protocols.http1 import RequestHead, RequestHeadReader

log = logging.getLogger("egressd.pop.listener")

ACCEPTS_PER_WAKEUP = 64
SOCKS_VERSION = 0x05


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    host: str
    port: int
    tls: bool = False
    socks5: bool = True  # plain listeners also speak SOCKS5 (sniffed)


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it from the listener (Linux): no setsockopt per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(4096)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{host}:{port}: {exc.strerror}") from exc
    return sock


def _close_if_cancelled(task: asyncio.Task[None], owned: tuple[socket.socket, ...]) -> None:
    if task.cancelled():
        for sock in owned:
            sock.close()


class Listener:
    def __init__(self, runtime: PopRuntime, spec: ListenerSpec, *,
                 tls_context: ssl.SSLContext | None = None, reuse_port: bool = False) -> None:
        if spec.tls and tls_context is None:
            raise ValueError("a TLS listener needs a TLS context")
        self.runtime = runtime
        self.spec = spec
        self.tls_context = tls_context
        self.reuse_port = reuse_port
        self.sock: socket.socket | None = None
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.handshakes: PeerSet[PlainHandshake] = PeerSet()
        self.tls_connections = SourceCounter(runtime.options.limits.max_connections_per_source)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.forward_connections: set[ForwardProxyProtocol] = set()
        self.address: tuple[str, int] = (spec.host, spec.port)
        self.poller: Poller | None = None  # where a plain listener waits for connections
        self.family = socket.AF_INET  # the listening socket's (read once: a Python property)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        sock = _bind(self.spec.host, self.spec.port, self.reuse_port)
        self.address = sock.getsockname()[:2]
        self.family = sock.family
        if self.spec.tls:
            self.server = await asyncio.start_server(
                self._serve_tls, sock=sock, ssl=self.tls_context,
                ssl_handshake_timeout=self.runtime.options.handshake_timeout,
            )
        else:
            self.sock = sock
            # In the PoP's poller, with the handshakes and relays: a wake-up that finds
            # connections to accept and tunnel events too is one dispatch, not two.
            self.poller = self.runtime.poller
            self.poller.add_reader(sock.fileno(), self._on_acceptable)

    @property
    def url(self) -> str:
        host = f"[{self.address[0]}]" if ":" in self.address[0] else self.address[0]
        return f"{'https' if self.spec.tls else 'http'}://{host}:{self.address[1]}"

    def _on_acceptable(self) -> None:
        listener = self.sock
        if listener is None:
            return
        sniff = self.spec.socks5
        family = self.family
        cap = self.runtime.options.limits.max_handshakes_per_source
        per_source = self.handshakes.per_source
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                # `_accept` (the C method that `socket.accept` wraps) and a socket made
                # from the number: `accept` would re-read the family and type through
                # enum conversions on every connection.
                fd, peer = listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE and friends: log, keep the listener
                log.warning("accept on %s failed: %s", self.url, exc)
                return
            try:
                conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except OSError:  # the descriptor would not make a socket: do not leak it
                os.close(fd)
                continue
            if cap and per_source.get(peer[0], 0) >= cap:
                # A source with this many unfinished requests is stalling us: close at
                # once, before the connection costs a buffer or a timer (slowloris).
                self.runtime.refuse("handshakes-per-source")
                conn.close()
                continue
            try:
                conn.setblocking(False)
            except OSError:  # the client is already gone
                conn.close()
                continue
            PlainHandshake(self, conn, peer[:2], sniff=sniff).start()

    def spawn(self, coro: Coroutine[Any, Any, None], *owned: socket.socket) -> None:
        """Run a connection's coroutine as a task this listener owns. The `owned` sockets
        are closed if the task is cancelled (even before it started: then its coroutine
        never ran to close them)."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if owned:
            task.add_done_callback(lambda done: _close_if_cancelled(done, owned))

    async def resume_http(self, io: SocketIO, reader: RequestHeadReader, head: RequestHead) -> None:
        """The coroutine path for a plain connection whose first head the handshake read."""
        await self._guard(io, serve_http(self.runtime, io, b"", self.forward_connections,
                                         reader=reader, head=head))

    async def _serve_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else "?"
        if not self.tls_connections.try_acquire(source):
            self.runtime.refuse("connections-per-source")
            writer.transport.abort()
            return
        try:
            await self._serve(StreamIO(reader, writer), sniff=False)
        finally:
            self.tls_connections.release(source)

    async def _serve(self, io: ClientIO, *, sniff: bool) -> None:
        try:
            async with asyncio.timeout(self.runtime.options.handshake_timeout):
                first = await io.recv()
        except TimeoutError:
            io.close()
            return
        except BaseException:
            io.close()
            raise
        if not first:
            io.close()
            return
        if sniff and first[0] == SOCKS_VERSION:
            await self._guard(io, serve_socks5(self.runtime, io, first))
        else:
            await self._guard(io, serve_http(self.runtime, io, first, self.forward_connections))

    async def _guard(self, io: ClientIO, serving: Coroutine[Any, Any, bool]) -> None:
        await guarded(serving, io.close, io.peer)

    def stop_accepting(self) -> None:
        if self.sock is not None:
            if self.poller is not None:
                self.poller.remove_reader(self.sock.fileno())
                self.poller = None
            self.sock.close()
            self.sock = None
        if self.server is not None:
            self.server.close()
        for connection in list(self.forward_connections):
            connection.close_when_idle()

    async def close(self) -> None:
        self.stop_accepting()
        for handshake in list(self.handshakes):
            handshake.abort()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            self.server = None
