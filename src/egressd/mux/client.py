"""The dialling side of a mux link: one TLS connection to a peer, (re)connected lazily.

All flows to one peer share one connection; ``open`` connects on first use and after the
connection is lost (every stream on a lost connection fails with ``MuxError``; nothing is
retried behind the caller's back except a request the peer's GOAWAY says it never
processed). Concurrent ``open`` calls share one connection attempt.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Mapping
from types import TracebackType
from typing import Final, Self

from egressd.mux.core import LinkSettings
from egressd.mux.errors import MuxError, Unprocessed
from egressd.mux.link import Link, MuxStream

__all__ = ["DEFAULT_AUTHORITY", "MuxClient", "connect_request"]

DEFAULT_AUTHORITY: Final = "egressd"
_FORBIDDEN_IN_NAMES: Final = frozenset(' "(),/;<=>?@[\\]{}\t\r\n\x00')
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_OPEN_ATTEMPTS: Final = 3


def connect_request(headers: Mapping[str, str], protocol: str) -> list[tuple[str, str]]:
    """The header list of an extended CONNECT: pseudo-headers first, names lower-cased.

    ``:authority`` and ``:path`` may come from ``headers``; ``:method``, ``:protocol``
    and ``:scheme`` may not.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    for name, value in lowered.items():
        if not name or any(c in name for c in _FORBIDDEN_IN_NAMES) or _CONTROL.search(value):
            raise ValueError(f"invalid header field {name!r}: {value!r}")
    pseudo = [
        (":method", "CONNECT"),
        (":protocol", protocol),
        (":scheme", "https"),
        (":path", lowered.get(":path", "/")),
        (":authority", lowered.get(":authority", DEFAULT_AUTHORITY)),
    ]
    regular = [(name, value) for name, value in lowered.items() if not name.startswith(":")]
    return pseudo + regular


class MuxClient:
    """Flows to one peer over one mutually authenticated TLS + HTTP/2 connection."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str,
        settings: LinkSettings | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self._settings = settings
        self._connect_timeout = connect_timeout
        self._link: Link | None = None
        self._connecting: asyncio.Task[Link] | None = None  # shared by concurrent callers
        #: Connections established so far (a reconnect adds one).
        self.connections_made = 0

    @property
    def connected(self) -> bool:
        """A connection is up and takes new streams."""
        return self._link is not None and self._link.usable

    @property
    def open_streams(self) -> int:
        """Streams of the current connection that still hold state."""
        return self._link.core.stream_count if self._link is not None else 0

    async def open(self, headers: Mapping[str, str], *, protocol: str = "egressd-tcp") -> MuxStream:
        """Open a flow: extended CONNECT with ``headers``, wait for the peer's answer.

        Raises ``StreamRefused`` on a non-2xx answer, ``MuxError`` if the peer cannot
        be reached or the connection fails first. Cancelling it resets the stream.
        """
        request = connect_request(headers, protocol)
        for attempt in range(1, _OPEN_ATTEMPTS + 1):
            link = await self._usable_link()
            try:
                return await link.open(request)
            except Unprocessed:
                if attempt == _OPEN_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def ping(self, timeout: float = 1.0) -> float:  # noqa: ASYNC109 - the API's name
        """RTT in seconds of one HTTP/2 PING; connects first if needed (not timed).

        ``MuxError`` if the peer cannot be reached or does not answer within ``timeout``.
        """
        try:
            async with asyncio.timeout(timeout):
                link = await self._usable_link()
        except TimeoutError:
            raise MuxError(f"cannot reach {self.host}:{self.port} within {timeout:g} s") from None
        return await link.ping(timeout)

    async def close(self) -> None:
        """Reset open streams, GOAWAY, close the connection. A later ``open`` reconnects."""
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
        link, self._link = self._link, None
        if link is not None:
            await link.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _usable_link(self) -> Link:
        """The current link, or the outcome of one connection attempt shared by every
        caller that arrives while it runs (so that 1,000 flows to a dead peer wait for
        one connect timeout, not 1,000 in a row)."""
        link = self._link
        if link is not None and link.usable:
            return link
        attempt = self._connecting
        if attempt is None:
            attempt = self._connecting = asyncio.create_task(self._connect(), name=f"mux connect {self.host}")
            attempt.add_done_callback(self._connected)
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # `close` abandoned the shared attempt (a peer found down, a new snapshot): for
            # the callers waiting on it that is a failed connect, not their cancellation.
            task = asyncio.current_task()
            if attempt.cancelled() and (task is None or not task.cancelling()):
                raise MuxError(f"cannot connect to {self.host}:{self.port}: the connection "
                               "attempt was abandoned (the link was closed)") from None
            raise

    def _connected(self, attempt: asyncio.Task[Link]) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if attempt.cancelled():
            return
        if attempt.exception() is None:  # also marks a failure as seen if nobody waits now
            self._link = attempt.result()

    async def _connect(self) -> Link:
        loop = asyncio.get_running_loop()
        peer = f"{self.host}:{self.port}"
        link: Link | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                _transport, link = await loop.create_connection(
                    lambda: Link(client=True, settings=self._settings),
                    self.host,
                    self.port,
                    ssl=self._ssl_context,
                    server_hostname=self._server_hostname,
                    ssl_handshake_timeout=self._connect_timeout,
                )
                # TLS 1.3: a server that rejects our certificate says so only now.
                await link.ready
        except TimeoutError:
            if link is not None and link.transport is not None:
                link.transport.abort()
            raise MuxError(
                f"cannot connect to {peer}: no answer in {self._connect_timeout:g} s"
            ) from None
        except OSError as error:  # refused, unreachable, TLS (ssl.SSLError)
            raise MuxError(f"cannot connect to {peer}: {error}") from error
        except MuxError as error:
            raise MuxError(f"cannot connect to {peer}: {error}") from error
        except BaseException:
            if link is not None and link.transport is not None:
                link.transport.abort()
            raise
        self.connections_made += 1
        return link
