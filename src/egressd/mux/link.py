"""The asyncio shell around ``LinkCore``: one TLS connection, its streams and their waiters.

``Link`` is the ``asyncio.Protocol`` of one connection: it feeds received bytes to the
core, writes what the core wants sent, and turns the core's events into wake-ups of the
tasks waiting in ``MuxStream.read``/``write``, in ``open`` (for a response or a free
stream slot) and in ``ping``. Every decision (flow control, half-close, reset, which
requests are valid) is the core's; this module only waits and wakes.

A ``MuxStream`` is one flow, the same object on both sides. It is released (its state
dropped, the stream reset if still open) by ``release()``, by leaving ``async with``, by
the server when the handler returns, or by itself once both directions have ended and
the reader has seen the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Self, cast

from h2.errors import ErrorCodes

from egressd.mux.core import (
    REASON_HEADER,
    LinkClosed,
    LinkCore,
    LinkSettings,
    PeerReady,
    PingAcknowledged,
    Readable,
    RequestReceived,
    ResponseReceived,
    SlotFreed,
    StreamFailed,
    Writable,
    safe_header_value,
)
from egressd.mux.errors import MuxError, StreamRefused, Unprocessed

__all__ = ["Link", "MuxStream"]

ALPN: Final = "h2"


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class MuxStream:
    """One flow (one HTTP/2 stream). Reads and writes may run in two tasks at once."""

    def __init__(self, link: Link, stream_id: int, headers: dict[str, str]) -> None:
        self._link = link
        self.stream_id = stream_id
        #: The request: what the client sent, pseudo-headers included.
        self.headers = headers
        #: Client side: the response's headers (without ``:status``), once ``open`` returns.
        self.response_headers: dict[str, str] = {}
        self._response: asyncio.Future[tuple[int, dict[str, str]]] | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._write_lock = asyncio.Lock()
        self._error: MuxError | None = None  # the stream failed: writes raise this
        self._read_final: MuxError | None = None  # reads raise this once the core has said so
        self._read_eof = False
        self._eof_sent = False
        self._failure: asyncio.Event | None = None  # made on demand by wait_failed
        self.answered = False
        self.released = False

    def __repr__(self) -> str:
        return f"<MuxStream {self.stream_id} {self.headers.get(':protocol', '')}>"

    @property
    def peer_address(self) -> tuple[str, int] | None:
        """The far end's (host, port) of the connection carrying this stream: a device
        link authenticates and throttles per source address."""
        transport = self._link.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return (str(peer[0]), int(peer[1])) if peer else None

    # --- reading ------------------------------------------------------------------

    async def read(self) -> bytes:
        """The next data (everything buffered), ``b""`` at the peer's END_STREAM.

        Raises ``MuxError`` (``StreamReset`` for a reset) if the stream failed before the
        peer ended it. Reading returns flow-control credit to the peer.
        """
        while True:
            if self._read_final is not None:
                raise self._read_final
            if self._read_eof:
                return b""
            if self.released:
                raise MuxError(f"stream {self.stream_id} has been released")
            try:
                data = self._link.core.read(self.stream_id)
            except MuxError as error:
                self._read_final = error
                self._link.process()
                self._link.tidy(self)
                raise
            if data is None:
                waiter = self._read_waiter = self._link.loop.create_future()
                try:
                    await waiter
                finally:
                    self._read_waiter = None
                continue
            self._link.process()
            if not data:
                self._read_eof = True
                self._link.tidy(self)
            return data

    # --- writing ------------------------------------------------------------------

    @property
    def send_window(self) -> int:
        """Bytes ``write`` could send now without waiting for the peer."""
        return 0 if self._error or self.released else self._link.core.send_window(self.stream_id)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``; waits while the peer's flow-control window (or the socket) is full."""
        view = memoryview(data).cast("B")
        if not view:
            return
        async with self._write_lock:
            while True:
                self._check_writable()
                taken = self._link.core.send(self.stream_id, view)
                self._link.process()
                view = view[taken:]
                if not view:
                    break
                waiter = self._write_waiter = self._link.loop.create_future()
                try:
                    await waiter
                finally:
                    self._write_waiter = None
            await self._link.drain()

    async def write_eof(self) -> None:
        """Half-close our direction (END_STREAM); the peer's read returns ``b""``."""
        if self._eof_sent:
            return
        async with self._write_lock:
            self._check_writable()
            self._link.core.end_stream(self.stream_id)
            self._eof_sent = True
            self._link.process()
            self._link.tidy(self)

    def reset(self, error_code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM: abort both directions and release the stream (no-op once released).

        Pending and later reads and writes raise ``StreamReset``.
        """
        if self.released:
            return
        self._link.core.reset(self.stream_id, error_code)
        self._link.process()  # StreamFailed: sets _error, wakes both directions
        if self._error is not None and not self._read_eof and self._read_final is None:
            self._read_final = self._error
        self.release()

    def _check_writable(self) -> None:
        if self._error is not None:
            raise self._error
        if self.released:
            raise MuxError(f"stream {self.stream_id} has been released")
        if self._eof_sent:
            raise MuxError(f"stream {self.stream_id}: write after write_eof")

    # --- server side --------------------------------------------------------------

    async def accept(self, headers: dict[str, str] | None = None) -> None:
        """Server side: answer 200, the flow is open."""
        self._respond(200, headers or {}, end_stream=False)
        await self._link.drain()

    async def refuse(self, status: int, reason: str) -> None:
        """Server side: answer ``status`` with an ``egressd-reason`` header, and end the stream."""
        self.refuse_now(status, reason)
        await self._link.drain()

    def refuse_now(self, status: int, reason: str) -> None:
        """``refuse`` without waiting for the socket (for cleanup paths)."""
        if not 400 <= status <= 599:
            raise ValueError(f"refuse needs a 4xx or 5xx status, not {status}")
        self._respond(status, {REASON_HEADER: safe_header_value(reason)}, end_stream=True)
        self._eof_sent = True

    def _respond(self, status: int, headers: dict[str, str], *, end_stream: bool) -> None:
        self._check_writable()
        self._link.core.respond(self.stream_id, status, headers, end_stream=end_stream)
        self.answered = True
        self._link.process()

    # --- lifetime -----------------------------------------------------------------

    def release(self) -> None:
        """Done with the stream: reset it if a direction is still open, drop its state."""
        if not self.released:
            self.released = True
            self._link.core.release(self.stream_id)
            self._link.process()
            self._link.forget(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def wait_failed(self) -> MuxError:
        """Wait until the stream fails (reset by either side, link lost); the error.

        Never returns for a stream that ends cleanly. For relays that are blocked on
        something else (a socket) when the peer aborts the flow.
        """
        while self._error is None:
            if self._failure is None:
                self._failure = asyncio.Event()
            await self._failure.wait()
        return self._error

    # --- called by Link -----------------------------------------------------------

    def _failed(self, error: MuxError) -> None:
        if self._error is None:
            self._error = error
        if self._failure is not None:
            self._failure.set()
        _wake(self._read_waiter)
        _wake(self._write_waiter)
        if self._response is not None and not self._response.done():
            self._response.set_exception(error)


class Link(asyncio.Protocol):
    """One TLS connection carrying mux streams; client or server side."""

    def __init__(
        self,
        *,
        client: bool,
        settings: LinkSettings | None = None,
        on_open: Callable[[Link], None] | None = None,
        on_request: Callable[[Link, MuxStream], None] | None = None,
        on_closed: Callable[[Link], None] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.core = LinkCore(client=client, settings=settings)
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.peer_certificate: dict[str, Any] = {}
        self._on_open = on_open
        self._on_request = on_request
        self._on_closed = on_closed
        self._streams: dict[int, MuxStream] = {}
        self._slot_waiters: list[asyncio.Future[None]] = []
        self._pings: dict[bytes, asyncio.Future[float]] = {}
        self._ping_ids = itertools.count(1)
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closing = False
        self.draining = False  # no new streams: used up its ids
        self.ready: asyncio.Future[None] = self.loop.create_future()  # client: peer SETTINGS seen
        self.closed: asyncio.Future[None] = self.loop.create_future()

    @property
    def usable(self) -> bool:
        """Open, ready and accepting new streams."""
        return (
            self.ready.done()
            and not self.ready.cancelled()
            and self.ready.exception() is None
            and not self.core.closed
            and not self.draining
        )

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its interface.
        self.transport = transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = (
            ssl_object.selected_alpn_protocol() if isinstance(ssl_object, ssl.SSLObject) else None
        )
        if alpn != ALPN:
            self.core.connection_lost(f"peer did not negotiate ALPN {ALPN!r} (got {alpn!r})")
            self._fail_ready(MuxError(self.core.closed_reason or "ALPN"))
            transport.abort()
            return
        self.peer_certificate = transport.get_extra_info("peercert") or {}
        self.core.start()
        self.process()
        if self._on_open is not None:
            self._on_open(self)

    def data_received(self, data: bytes) -> None:
        self.core.receive(data)
        self.process()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            reason = f"connection lost: {exc}"
        elif self.client and not self.ready.done():
            # TLS 1.3: the server checks our certificate after we think the handshake is done.
            reason = (
                "the peer closed the connection after the TLS handshake (our certificate refused?)"
            )
        else:
            reason = "connection closed by the peer"
        self.core.connection_lost(reason)
        self.process()
        self._fail_ready(MuxError(self.core.closed_reason or reason))
        for waiter in self._drain_waiters:
            _wake(waiter)
        if not self.closed.done():
            self.closed.set_result(None)
        if self._on_closed is not None:
            self._on_closed(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            _wake(waiter)
        self._drain_waiters.clear()

    # --- the pump between core and transport --------------------------------------

    def process(self) -> None:
        """Act on the core's events, then send what it queued."""
        for event in self.core.take_events():
            self._dispatch(event)
        data = self.core.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
        if self.draining and self.core.stream_count == 0:
            self._closing = True
        if self._closing and self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _dispatch(self, event: object) -> None:
        if isinstance(event, Readable):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                _wake(stream._read_waiter)
        elif isinstance(event, Writable):
            if event.stream_id is None:
                for stream in self._streams.values():
                    _wake(stream._write_waiter)
            elif (stream := self._streams.get(event.stream_id)) is not None:
                _wake(stream._write_waiter)
        elif isinstance(event, StreamFailed):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream._failed(event.error)
                self.tidy(stream)
        elif isinstance(event, ResponseReceived):
            stream = self._streams.get(event.stream_id)
            response = stream._response if stream is not None else None
            if response is not None and not response.done():
                response.set_result((event.status, event.headers))
        elif isinstance(event, RequestReceived):
            stream = MuxStream(self, event.stream_id, event.headers)
            self._streams[event.stream_id] = stream
            if self._on_request is not None:
                self._on_request(self, stream)
            else:  # pragma: no cover - a client link never receives requests
                stream.release()
        elif isinstance(event, SlotFreed):
            for waiter in self._slot_waiters:
                _wake(waiter)
        elif isinstance(event, PingAcknowledged):
            ping = self._pings.pop(event.payload, None)
            if ping is not None and not ping.done():
                ping.set_result(time.perf_counter())
        elif isinstance(event, PeerReady):
            if event.connect_protocol or not self.client:
                if not self.ready.done():
                    self.ready.set_result(None)
            else:
                self._fail_ready(MuxError("the peer does not accept extended CONNECT (RFC 8441)"))
                self.core.close(ErrorCodes.PROTOCOL_ERROR, "peer lacks extended CONNECT")
        elif isinstance(event, LinkClosed):
            self._closing = True
            self._fail_ready(MuxError(f"link closed: {event.reason}"))
            for waiter in self._slot_waiters:
                _wake(waiter)
            for ping in self._pings.values():
                if not ping.done():
                    ping.set_exception(MuxError(f"link closed: {event.reason}"))
            self._pings.clear()

    def _fail_ready(self, error: MuxError) -> None:
        if not self.ready.done():
            if self.client:
                self.ready.set_exception(error)
                self.ready.exception()  # retrieved: connect may have failed before awaiting it
            else:
                self.ready.cancel()  # nobody waits on a server link's readiness

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self._paused and not self.core.closed:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def tidy(self, stream: MuxStream) -> None:
        """Forget a stream the core has forgotten (both directions over)."""
        if not self.core.has_stream(stream.stream_id):
            self._streams.pop(stream.stream_id, None)

    def forget(self, stream: MuxStream) -> None:
        self._streams.pop(stream.stream_id, None)

    # --- commands -----------------------------------------------------------------

    async def open(self, request: list[tuple[str, str]]) -> MuxStream:
        """Send an extended CONNECT and wait for a 2xx response (client side)."""
        while True:
            try:
                stream_id = self.core.open_stream(request)
            except Unprocessed:
                self.draining = True
                raise
            if stream_id is not None:
                break
            waiter = self.loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            finally:
                self._slot_waiters.remove(waiter)
        stream = MuxStream(self, stream_id, dict(request))
        stream._response = self.loop.create_future()
        self._streams[stream_id] = stream
        self.process()
        try:
            status, headers = await stream._response
        except BaseException:
            stream.release()
            raise
        stream.response_headers = headers
        if not 200 <= status < 300:
            stream.release()
            raise StreamRefused(status, headers.get(REASON_HEADER, ""))
        return stream

    async def ping(self, wait: float) -> float:
        """Round-trip time of one PING, in seconds; ``MuxError`` after ``wait`` seconds."""
        payload = next(self._ping_ids).to_bytes(8, "big")
        answered: asyncio.Future[float] = self.loop.create_future()
        self._pings[payload] = answered
        sent = time.perf_counter()  # not loop.time(): uvloop's has millisecond resolution
        try:
            self.core.ping(payload)
            self.process()
            async with asyncio.timeout(wait):
                received = await answered
        except TimeoutError:
            raise MuxError(f"no PING answer within {wait:g} s") from None
        finally:
            self._pings.pop(payload, None)
        return max(received - sent, 1e-9)

    def close(self, reason: str = "closed locally") -> None:
        """Reset every stream, send GOAWAY and close the connection."""
        self.core.close(reason=reason)
        self._closing = True
        self.process()

    async def aclose(self, grace: float = 2.0) -> None:
        """``close`` and wait (up to ``grace`` seconds) for the connection to be gone."""
        self.close()
        if self.transport is None:
            return
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self.transport.abort()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.shield(self.closed)
