"""The echo origin: answers a client with the address it appears to come from.

``egressd verify``, the tests and the lab use it (like icanhazip.com) to see which
source address and city a flow really left from. It speaks:

- HTTP/1.1 over TCP (h11, keep-alive). A connection may start with a PROXY protocol v2
  header, as a PoP sends to in-network origins (rule R8); it is sniffed from the first
  bytes, so plain and PROXY clients share one port. ``GET /`` returns the address,
  ``GET /trace`` ``key=value`` lines (see :func:`render_trace`).
- UDP: any datagram is answered with ``"<ip> <port>\\n"`` (a PROXY v2 DGRAM prefix,
  if present, supplies the address).
- HTTP/3 (aioquic) on UDP, same paths, ``http=3`` in the trace.

The answers are pure functions of :class:`ClientView` (:func:`respond`, in
`echo/answers.py`); this module is the I/O shell. The server trusts any client's PROXY header: it is a test origin, not an
access control point. Every connection task is owned by one ``asyncio.TaskGroup`` that
:meth:`EchoServer.close` cancels and awaits.
"""

from __future__ import annotations

import asyncio
import errno
import http
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

import h11
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, ProtocolNegotiated, QuicEvent

from egressd.echo import arrival
from egressd.echo.answers import (
    TEXT_HEADERS,
    ClientView,
    EchoResponse,
    normalize_address,
    render_trace,
    respond,
    udp_reply,
)
from egressd.protocols.geofeed import GeofeedIndex
from egressd.protocols.proxy_v2 import (
    SIGNATURE,
    ProxyV2Error,
    ProxyV2Reader,
    looks_like_proxy_v2,
)

__all__ = [
    "ClientView",
    "EchoResponse",
    "EchoServer",
    "normalize_address",
    "render_trace",
    "respond",
    "udp_reply",
]

log = logging.getLogger(__name__)

IDLE_TIMEOUT: Final = 60.0
_CLOSE_TIMEOUT: Final = 5.0
_READ_SIZE: Final = 65536
_MAX_REQUEST_BODY: Final = 64 * 1024
_BIND_ATTEMPTS: Final = 8

# --- I/O shell --------------------------------------------------------------------


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _peer_of(writer: asyncio.StreamWriter) -> tuple[str, int]:
    peername = writer.get_extra_info("peername")
    return (str(peername[0]), int(peername[1])) if peername else ("", 0)


async def _read(reader: asyncio.StreamReader, idle_seconds: float) -> bytes:
    async with asyncio.timeout(idle_seconds):
        return await reader.read(_READ_SIZE)


async def _read_proxy_header(
    reader: asyncio.StreamReader, idle_seconds: float, accept_proxy_v2: bool
) -> tuple[tuple[str, int] | None, bool, bytes] | None:
    """Sniff the connection start: (logical source, had a header, bytes after it).

    None if the peer closed first. Plain HTTP leaves the signature on its first byte;
    only a full 12-byte signature commits the connection to PROXY v2.
    """
    buffer = b""
    while True:
        chunk = await _read(reader, idle_seconds)
        if not chunk:
            return None
        buffer += chunk
        if not accept_proxy_v2 or not looks_like_proxy_v2(buffer):
            return None, False, buffer
        if len(buffer) >= len(SIGNATURE):
            break
    proxy_reader = ProxyV2Reader()
    header = proxy_reader.feed(buffer)
    while header is None:
        chunk = await _read(reader, idle_seconds)
        if not chunk:
            return None
        header = proxy_reader.feed(chunk)
    return header.source, True, proxy_reader.trailing_data


class _H3EchoProtocol(QuicConnectionProtocol):
    """One HTTP/3 connection: answers each request stream from :func:`respond`."""

    def __init__(self, *args: Any, echo: EchoServer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._echo = echo
        self._h3: H3Connection | None = None
        self._peer: tuple[str, int] = ("", 0)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        # The latest datagram's address is the peer's current one (QUIC may migrate).
        self._peer = (str(addr[0]), int(addr[1]))
        super().datagram_received(data, addr)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self._echo._h3_connections.discard(self)
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self._h3 = H3Connection(self._quic)
        if self._h3 is None:
            return
        for http_event in self._h3.handle_event(event):
            self._http_event_received(http_event)

    def _http_event_received(self, event: H3Event) -> None:
        if not isinstance(event, HeadersReceived) or self._h3 is None:
            return  # request bodies are ignored
        headers = dict(event.headers)
        if b":method" not in headers:
            return  # trailers of a request already answered
        method = headers.get(b":method", b"").decode("ascii", "replace")
        path = headers.get(b":path", b"").decode("ascii", "replace")
        client = ClientView(self._peer[0], self._peer[1], self._peer, False, "3")
        answer = respond(method, path, client, self._echo.geofeed)
        body = b"" if method == "HEAD" else answer.body
        response_headers = [(b":status", str(answer.status).encode())]
        response_headers += [(name.encode(), value.encode()) for name, value in answer.headers]
        response_headers.append((b"content-length", str(len(answer.body)).encode()))
        self._h3.send_headers(event.stream_id, response_headers, end_stream=not body)
        if body:
            self._h3.send_data(event.stream_id, body, end_stream=True)
        self.transmit()

    def cancel_timer(self) -> None:
        """Drop the retransmission timer once the socket is closed: nothing to send."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, accept_proxy_v2: bool) -> None:
        self._accept_proxy_v2 = accept_proxy_v2
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance: the selector loop's datagram transport does not subclass it.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = udp_reply(data, (str(addr[0]), int(addr[1])), self._accept_proxy_v2)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp echo: %s", exc)  # ICMP errors for earlier replies: nothing to do


@dataclass(frozen=True, slots=True)
class _Listener:
    kind: Literal["http", "udp", "h3"]
    address: tuple[str, int]
    close: Callable[[], None]


async def _bind_same_port(
    hosts: Sequence[str], port: int, bind: Callable[[str, int], Awaitable[list[_Listener]]]
) -> list[_Listener]:
    """Bind every host on one port; with port 0 the first host picks it for all."""
    for attempt in range(_BIND_ATTEMPTS):
        bound: list[_Listener] = []
        try:
            chosen = port
            for host in hosts:
                listeners = await bind(host, chosen)
                bound += listeners
                chosen = listeners[0].address[1]
            return bound
        except OSError as error:
            for listener in bound:
                listener.close()
            # An ephemeral port free on the first host may be taken on another: retry.
            if port != 0 or error.errno != errno.EADDRINUSE or attempt == _BIND_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


class EchoServer:
    """The echo origin on one or more hosts; see the module docstring.

    >>> echo = EchoServer()
    >>> await echo.start(["127.0.0.1", "::1"], http_port=0, udp_port=0)
    >>> echo.http_port, echo.http_addresses
    >>> await echo.close()
    """

    def __init__(self, *, accept_proxy_v2: bool = True, idle_timeout: float = IDLE_TIMEOUT,
                 report_link: bool = False) -> None:
        self.accept_proxy_v2 = accept_proxy_v2
        self.report_link = report_link  # add link=<arrival interface> (TCP trace, UDP reply)
        self.idle_timeout = idle_timeout
        #: Replaceable at any time (for a new feed); read per request.
        self.geofeed: GeofeedIndex | None = None
        self._listeners: list[_Listener] = []
        self._tcp_servers: list[asyncio.Server] = []
        self._h3_connections: set[_H3EchoProtocol] = set()
        self._task_group: asyncio.TaskGroup | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False

    async def __aenter__(self) -> EchoServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- addresses

    def _addresses(self, kind: str) -> tuple[tuple[str, int], ...]:
        return tuple(listener.address for listener in self._listeners if listener.kind == kind)

    @property
    def http_addresses(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every HTTP/1.1 listening socket."""
        return self._addresses("http")

    @property
    def udp_addresses(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every UDP echo socket."""
        return self._addresses("udp")

    @property
    def h3_addresses(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every HTTP/3 socket."""
        return self._addresses("h3")

    @property
    def http_port(self) -> int | None:
        """The HTTP/1.1 port (the same on every host), None if not listening."""
        return next((port for _host, port in self.http_addresses), None)

    @property
    def udp_port(self) -> int | None:
        """The UDP echo port (the same on every host), None if not listening."""
        return next((port for _host, port in self.udp_addresses), None)

    @property
    def h3_port(self) -> int | None:
        """The HTTP/3 port (the same on every host), None if not listening."""
        return next((port for _host, port in self.h3_addresses), None)

    # -- lifecycle

    async def start(
        self,
        hosts: str | Sequence[str] = "127.0.0.1",
        *,
        http_port: int | None = 0,
        udp_port: int | None = 0,
        h3_port: int | None = None,
        geofeed: GeofeedIndex | None = None,
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
    ) -> None:
        """Bind and serve. A port of 0 is ephemeral; None turns that service off.

        HTTP/3 needs ``certfile``/``keyfile`` (PEM). On any error, everything bound so
        far is closed again before the error propagates.
        """
        if self._started:
            raise RuntimeError("EchoServer.start() may be called once")
        self._started = True
        host_list = [hosts] if isinstance(hosts, str) else list(hosts)
        if not host_list:
            raise ValueError("at least one host is needed")
        quic_configuration: QuicConfiguration | None = None
        if h3_port is not None:
            if certfile is None or keyfile is None:
                raise ValueError("HTTP/3 needs certfile and keyfile")
            quic_configuration = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
            quic_configuration.load_cert_chain(certfile, keyfile)
        self.geofeed = geofeed
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.create_task(self._supervise(ready), name="echo-supervisor")
        await ready
        try:
            if http_port is not None:
                self._listeners += await _bind_same_port(host_list, http_port, self._bind_http)
            if udp_port is not None:
                self._listeners += await _bind_same_port(host_list, udp_port, self._bind_udp)
            if quic_configuration is not None and h3_port is not None:
                configuration = quic_configuration

                async def bind_h3(host: str, port: int) -> list[_Listener]:
                    return await self._bind_h3(host, port, configuration)

                self._listeners += await _bind_same_port(host_list, h3_port, bind_h3)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening, drop every connection and wait for every task. Idempotent."""
        if self._closing:
            return
        self._closing = True
        # Closing a QuicServer sends CONNECTION_CLOSE on each of its connections, which
        # re-arms their timers; the socket is gone after that, so the timers go too.
        for listener in self._listeners:
            listener.close()
        for connection in list(self._h3_connections):
            connection.cancel_timer()
        self._h3_connections.clear()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.wait([self._supervisor])
            if not self._supervisor.cancelled() and self._supervisor.exception() is not None:
                log.error("echo supervisor failed", exc_info=self._supervisor.exception())
        # After the connections: since Python 3.12 wait_closed() waits for them too.
        for server in self._tcp_servers:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await server.wait_closed()
        # Let transports closed above run their connection_lost callbacks.
        await asyncio.sleep(0)

    async def _supervise(self, ready: asyncio.Future[None]) -> None:
        """Own every connection task until close() cancels this one."""
        async with asyncio.TaskGroup() as task_group:
            self._task_group = task_group
            ready.set_result(None)
            await asyncio.Event().wait()

    # -- binding

    async def _bind_http(self, host: str, port: int) -> list[_Listener]:
        server = await asyncio.start_server(self._on_connection, host, port)
        self._tcp_servers.append(server)
        if self.report_link:
            for sock in server.sockets:
                arrival.enable(sock)
        return [
            _Listener("http", (sock.getsockname()[0], sock.getsockname()[1]), server.close)
            for sock in server.sockets
        ]

    async def _bind_udp(self, host: str, port: int) -> list[_Listener]:
        loop = asyncio.get_running_loop()
        if self.report_link:
            def answer(data: bytes, peer: tuple[str, int], link: str | None) -> bytes | None:
                return udp_reply(data, peer, self.accept_proxy_v2, link or "?")

            address, close = arrival.serve_udp_with_link(loop, host, port, answer)
            return [_Listener("udp", address, close)]
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpEcho(self.accept_proxy_v2), local_addr=(host, port)
        )
        sockname = transport.get_extra_info("sockname")
        return [_Listener("udp", (sockname[0], sockname[1]), transport.close)]

    async def _bind_h3(
        self, host: str, port: int, configuration: QuicConfiguration
    ) -> list[_Listener]:
        loop = asyncio.get_running_loop()

        def create_protocol(*args: Any, **kwargs: Any) -> _H3EchoProtocol:
            connection = _H3EchoProtocol(*args, echo=self, **kwargs)
            self._h3_connections.add(connection)
            return connection

        transport, quic_server = await loop.create_datagram_endpoint(
            lambda: QuicServer(configuration=configuration, create_protocol=create_protocol),
            local_addr=(host, port),
        )
        sockname = transport.get_extra_info("sockname")
        return [_Listener("h3", (sockname[0], sockname[1]), quic_server.close)]

    # -- HTTP/1.1

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Called by asyncio for each accepted socket: hand it to the task group."""
        if self._closing or self._task_group is None:
            writer.transport.abort()
            return
        self._task_group.create_task(self._serve_connection(reader, writer))

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = _peer_of(writer)
        try:
            await self._serve_http(reader, writer, peer)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except (ConnectionError, TimeoutError, ProxyV2Error) as error:
            log.debug("echo connection from %s ended: %r", peer, error)
        except Exception:
            log.exception("echo connection from %s failed", peer)
        finally:
            writer.close()
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await writer.wait_closed()
            except (OSError, TimeoutError):
                writer.transport.abort()

    async def _serve_http(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: tuple[str, int]
    ) -> None:
        start = await _read_proxy_header(reader, self.idle_timeout, self.accept_proxy_v2)
        if start is None:
            return
        source, had_header, initial = start
        address, port = source if source is not None else peer
        connection = h11.Connection(h11.SERVER)
        if initial:  # b"" would tell h11 that the peer closed
            connection.receive_data(initial)
        request: h11.Request | None = None
        body_size = 0
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as error:
                await self._send_error(writer, connection, error.error_status_hint)
                return
            if event is h11.NEED_DATA:
                connection.receive_data(await _read(reader, self.idle_timeout))
            elif isinstance(event, h11.Request):
                request, body_size = event, 0
            elif isinstance(event, h11.Data):
                body_size += len(event.data)
                if body_size > _MAX_REQUEST_BODY:
                    await self._send_error(writer, connection, 413)
                    return
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                version = request.http_version.decode("ascii", "replace")
                link = arrival.tcp_arrival(writer.get_extra_info("socket")) if self.report_link else None
                client = ClientView(address, port, peer, had_header, version, link)
                method = request.method.decode("ascii", "replace")
                target = request.target.decode("ascii", "replace")
                answer = respond(method, target, client, self.geofeed)
                await self._send(writer, connection, answer, with_body=method != "HEAD")
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
                request = None
            else:  # ConnectionClosed (or PAUSED, which cannot happen here)
                return

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        connection: h11.Connection,
        answer: EchoResponse,
        *,
        with_body: bool = True,
    ) -> None:
        headers = [*answer.headers, ("content-length", str(len(answer.body)))]
        response = h11.Response(
            status_code=answer.status, headers=headers, reason=_reason(answer.status)
        )
        parts = [connection.send(response)]
        if with_body:
            parts.append(connection.send(h11.Data(data=answer.body)))
        parts.append(connection.send(h11.EndOfMessage()))
        writer.write(b"".join(part for part in parts if part))
        async with asyncio.timeout(self.idle_timeout):
            await writer.drain()

    async def _send_error(
        self, writer: asyncio.StreamWriter, connection: h11.Connection, status: int
    ) -> None:
        """Answer a broken request with ``status`` and close (h11 allows it once)."""
        if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = f"{status} {_reason(status).decode().lower()}\n".encode()
            headers = (*TEXT_HEADERS, ("connection", "close"))
            await self._send(writer, connection, EchoResponse(status, body, headers))
