"""Mux links whose HTTP/2 roles are the reverse of their TLS roles (connector -> PoP).

A tunnel connector sits inside a private network that accepts no inbound connections, so
it dials *out* to the PoP (TLS client); yet the PoP is the one that opens flows towards
it. HTTP/2 only lets the client open streams, so over that TLS connection the PoP plays
the HTTP/2 client and the connector the HTTP/2 server. ``Link`` is role-agnostic (it is
an ``asyncio.Protocol`` given a core of either side), so this module is only the two
doors: ``ReverseListener`` (TLS server, HTTP/2 client: the PoP) and ``dial_reverse``
(TLS client, HTTP/2 server: the connector). Flow control, half-close, resets and PING
are the same code as every other link.

It does not know who is at the far end: authenticating the connector (its token) is the
PoP's job, over a first stream, once the link is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable

from egressd.mux.core import LinkSettings
from egressd.mux.errors import MuxError
from egressd.mux.link import Link, MuxStream

__all__ = ["ReverseListener", "ServedLink", "dial_reverse"]

log = logging.getLogger(__name__)

StreamHandler = Callable[[MuxStream], Awaitable[None]]


class ReverseListener:
    """Accepts TLS connections and plays the HTTP/2 client on each: ``on_link(link)`` is
    called (from the event loop) once a link is open; ``link.ready`` says when streams may
    be opened on it."""

    def __init__(self, ssl_context: ssl.SSLContext, on_link: Callable[[Link], None], *,
                 host: str = "127.0.0.1", port: int = 0, settings: LinkSettings | None = None,
                 handshake_timeout: float = 10.0) -> None:
        self._ssl_context = ssl_context
        self._on_link = on_link
        self._settings = settings
        self._handshake_timeout = handshake_timeout
        self.address: tuple[str, int] = (host, port)
        self.links: set[Link] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._make_link, self.address[0], self.address[1], ssl=self._ssl_context,
            ssl_handshake_timeout=self._handshake_timeout, backlog=256)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)

    def _make_link(self) -> Link:
        return Link(client=True, settings=self._settings, on_open=self._opened,
                    on_closed=self.links.discard)

    def _opened(self, link: Link) -> None:
        self.links.add(link)
        self._on_link(link)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(link.aclose() for link in list(self.links)))
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


class ServedLink:
    """The connector's end: a TLS client connection on which the far end opens streams,
    each served by ``handler`` in a task this object owns (``close`` waits for them)."""

    def __init__(self, handler: StreamHandler, settings: LinkSettings | None = None) -> None:
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self.link = Link(client=False, settings=settings, on_request=self._stream_opened)

    @property
    def closed(self) -> asyncio.Future[None]:
        return self.link.closed

    def _stream_opened(self, _link: Link, stream: MuxStream) -> None:
        task = asyncio.create_task(self._serve(stream), name=f"reverse stream {stream.stream_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: MuxStream) -> None:
        try:
            await self._handler(stream)
        except MuxError as error:
            log.debug("stream %d: %s", stream.stream_id, error)
        except Exception:
            log.exception("handler failed on stream %d", stream.stream_id)
        finally:
            if not stream.answered and not stream.released:
                with contextlib.suppress(MuxError):
                    stream.refuse_now(500, "the handler did not answer")
            stream.release()

    async def ping(self, wait: float) -> float:
        return await self.link.ping(wait)

    async def close(self, grace: float = 1.0) -> None:
        """Reset every stream, GOAWAY, close; wait for the handlers (cancelled after ``grace``)."""
        self.link.close("connector closing")
        tasks = set(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.link.aclose()


async def dial_reverse(host: str, port: int, ssl_context: ssl.SSLContext, handler: StreamHandler,
                       *, server_hostname: str, connect_timeout: float = 10.0,
                       settings: LinkSettings | None = None) -> ServedLink:
    """Connect over TLS to ``host``:``port`` and serve the streams the far end opens.

    Raises ``MuxError`` with the reason (refused, timeout, TLS, no ALPN h2).
    """
    loop = asyncio.get_running_loop()
    served = ServedLink(handler, settings)
    peer = f"{host}:{port}"
    try:
        async with asyncio.timeout(connect_timeout):
            await loop.create_connection(lambda: served.link, host, port, ssl=ssl_context,
                                         server_hostname=server_hostname,
                                         ssl_handshake_timeout=connect_timeout)
    except TimeoutError:
        if served.link.transport is not None:
            served.link.transport.abort()
        raise MuxError(f"cannot connect to {peer}: no answer in {connect_timeout:g} s") from None
    except OSError as error:
        raise MuxError(f"cannot connect to {peer}: {error}") from error
    if served.link.core.closed:
        raise MuxError(f"cannot connect to {peer}: {served.link.core.closed_reason}")
    return served
