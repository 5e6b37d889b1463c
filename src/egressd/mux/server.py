"""The listening side of mux links: accepts TLS connections, runs a handler per stream.

Every stream a peer opens with a valid extended CONNECT becomes one handler task,
``handler(stream, peer)``, owned by the server: ``close()`` waits for them (and cancels
those that outlive the grace period). When a handler returns, its stream is released:
answered 500 if the handler never answered, reset if still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from egressd.mux.core import LinkSettings
from egressd.mux.errors import MuxError
from egressd.mux.link import Link, MuxStream
from egressd.mux.tls import PeerIdentity, peer_identity

__all__ = ["Handler", "MuxServer"]

log = logging.getLogger(__name__)

Handler = Callable[[MuxStream, PeerIdentity], Awaitable[None]]


class MuxServer:
    """Listens on ``host``:``port`` (0: any free port; see ``address`` after ``start``)."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        settings: LinkSettings | None = None,
        handshake_timeout: float = 10.0,
        reuse_port: bool = False,
    ) -> None:
        self._ssl_context = ssl_context
        self._handler = handler
        self._settings = settings
        self._handshake_timeout = handshake_timeout
        self._reuse_port = reuse_port  # worker processes sharing one port (SO_REUSEPORT)
        self.address: tuple[str, int] = (host, port)
        #: TLS connections that completed the handshake, since ``start``.
        self.connections_accepted = 0
        self._server: asyncio.Server | None = None
        self._links: set[Link] = set()
        self._peers: dict[Link, PeerIdentity] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._links)

    @property
    def open_streams(self) -> int:
        """Streams the server still holds state for, over all connections."""
        return sum(link.core.stream_count for link in self._links)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._make_link,
            self.address[0],
            self.address[1],
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._handshake_timeout,
            backlog=1024,
            reuse_port=self._reuse_port or None,
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)

    async def close(self, grace: float = 1.0) -> None:
        """Stop listening, reset every stream, GOAWAY and close every connection, and
        wait for the handlers (cancelling those still running after ``grace`` seconds)."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close("server closing")
        tasks = set(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*(link.aclose() for link in list(self._links)))
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- callbacks from links -----------------------------------------------------

    def _make_link(self) -> Link:
        return Link(
            client=False,
            settings=self._settings,
            on_open=self._link_opened,
            on_request=self._stream_opened,
            on_closed=self._link_closed,
        )

    def _link_opened(self, link: Link) -> None:
        self.connections_accepted += 1
        self._links.add(link)
        self._peers[link] = peer_identity(link.peer_certificate)

    def _link_closed(self, link: Link) -> None:
        self._links.discard(link)
        self._peers.pop(link, None)

    def _stream_opened(self, link: Link, stream: MuxStream) -> None:
        peer = self._peers.get(link) or peer_identity(link.peer_certificate)
        task = asyncio.create_task(
            self._serve(stream, peer), name=f"mux {peer.common_name} stream {stream.stream_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: MuxStream, peer: PeerIdentity) -> None:
        try:
            await self._handler(stream, peer)
        except MuxError as error:
            log.debug("stream %d from %s: %s", stream.stream_id, peer.common_name, error)
        except Exception:
            log.exception(
                "mux handler failed on stream %d from %s", stream.stream_id, peer.common_name
            )
        finally:
            if not stream.answered and not stream.released:
                with contextlib.suppress(MuxError):
                    stream.refuse_now(500, "the handler did not answer")
            stream.release()
