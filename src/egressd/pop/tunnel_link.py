"""The PoP's side of tunnel connectors (issue 6): accepts their links, authenticates them,
keeps which connector is attached here with which routes, and carries flows to them.

A connector dials out to ``--tunnel-listen`` (TLS with the PoP's certificate; the
connector presents none) and serves HTTP/2 on that connection (`egressd.mux.reverse`).
The PoP opens the hello stream, checks the token against the snapshot's connectors (a
SHA-256 compared in constant time; failures count towards the source's authentication
throttle), checks the announced routes (`tunnel_routes`: only what the account declared
for that connector, nothing overlapping another account's routes) and writes the verdict
back. While attached, the PoP pings the link and drops it when the connector is deleted
or its token replaced.

A flow to a private route becomes one stream to the connector, which connects from its
own host: the origin sees the connector's address, never a dedicated one (R4). Like a
backbone flow, it is handed to the relay as one end of a socket pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Final

from egressd.model.addresses import IPNetwork
from egressd.model.routes import Connector
from egressd.mux import MuxError, MuxStream, StreamRefused
from egressd.mux.client import connect_request
from egressd.mux.link import Link
from egressd.mux.pump import carry
from egressd.mux.reverse import ReverseListener
from egressd.pop.runtime import PopRuntime, TunnelFlow
from egressd.pop.tunnel_routes import check_announcement
from egressd.pop.upstream import UpstreamError
from egressd.protocols.tunnel import (
    FLOW,
    HELLO,
    ROUTES_HEADER,
    TOKEN_HEADER,
    Announcement,
    Verdict,
    connector_of,
    host_matches,
    parse_routes,
    token_digest,
)

__all__ = ["TunnelServer"]

log = logging.getLogger("egressd.pop.tunnel")

PING_EVERY: Final = 2.0
MAX_LINKS: Final = 8  # links of one connector to one PoP (replicas of it, restarts)
PING_WAIT: Final = 5.0
_UNKNOWN_DIGEST: Final = "0" * 64


class TunnelSocket(socket.socket):
    """The relay's end of a tunnel flow; knows the address the connector connected from."""

    egress_local: str | None = None


@dataclass(eq=False)
class Attachment:
    """One connector link to this PoP, with the routes this PoP accepted for it."""

    connector: Connector
    link: Link
    peer: str
    networks: tuple[IPNetwork, ...]
    hostnames: tuple[str, ...]
    announced: Announcement = field(default_factory=Announcement)
    version: int = 0  # the snapshot the routes were checked against
    since: float = field(default_factory=time.time)

    def covers(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return any(host_matches(pattern, host) for pattern in self.hostnames)
        return any(address in network for network in self.networks)

    def status(self) -> dict[str, Any]:
        return {"connector": self.connector.id, "account": self.connector.account,
                "peer": self.peer, "since": round(self.since, 3),
                "routes": [str(network) for network in self.networks] + list(self.hostnames)}


class TunnelServer:
    """Connector links for one PoP runtime on ``host``:``port`` (0: any free port)."""

    def __init__(self, runtime: PopRuntime, context: ssl.SSLContext, host: str, port: int, *,
                 advertise: str | None = None) -> None:
        self.runtime = runtime
        self._advertise = advertise
        self.listener = ReverseListener(context, self._link_opened, host=host, port=port,
                                        handshake_timeout=runtime.options.handshake_timeout)
        self.attachments: dict[str, list[Attachment]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.address

    async def start(self) -> None:
        await self.listener.start()
        self.runtime.tunnels = self
        log.info("PoP %s: tunnel connectors on %s:%d", self.runtime.code, *self.address)

    async def close(self) -> None:
        if self.runtime.tunnels is self:
            self.runtime.tunnels = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.listener.close()

    @property
    def advertised(self) -> str | None:
        """Where connectors can attach, ``[NAME@]HOST:PORT`` (for the control plane's PoP
        list): as configured, else the listening address unless it is a wildcard."""
        if self._advertise is not None:
            return self._advertise
        host, port = self.address
        if ipaddress.ip_address(host).is_unspecified:
            return None
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def report(self) -> dict[str, Any]:
        """What the health report carries about connectors."""
        return {"tunnels": self.status(), "tunnel_listen": self.advertised}

    def status(self) -> list[dict[str, Any]]:
        """Who is attached here, for /health and the control plane."""
        return [attachment.status() for attachments in self.attachments.values()
                for attachment in attachments]

    # --- attaching ----------------------------------------------------------------

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _link_opened(self, link: Link) -> None:
        self._spawn(self._attach(link), "tunnel attach")

    async def _attach(self, link: Link) -> None:
        peername = link.transport.get_extra_info("peername") if link.transport else None
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        source = str(peername[0]) if peername else "?"
        runtime = self.runtime
        if runtime.auth_throttle.blocked(source):
            runtime.refuse("auth-rate")
            log.warning("tunnel: link from %s closed: too many failed attempts", peer)
            await link.aclose()
            return
        try:
            async with asyncio.timeout(runtime.options.handshake_timeout):
                await link.ready
                hello = await link.open(connect_request({}, HELLO))
        except (MuxError, TimeoutError) as error:
            log.info("tunnel: link from %s closed before its hello: %s", peer, error or "timeout")
            await link.aclose()
            return
        try:
            attachment = await self._greet(link, hello, peer, source)
            if attachment is not None:
                await self._hold(attachment, hello)
        finally:
            hello.release()
            await link.aclose()

    async def _greet(self, link: Link, hello: MuxStream, peer: str,
                     source: str) -> Attachment | None:
        """Check token and routes, write the verdict; the attachment, or None (refused)."""
        runtime = self.runtime
        token = hello.response_headers.get(TOKEN_HEADER, "")
        connector = self._authenticate(token)
        if connector is None:
            claimed = connector_of(token) or "?"
            log.warning("tunnel: link from %s refused: unknown connector or wrong token "
                        "(connector %r)", peer, claimed)
            runtime.metrics.auth_failures.labels(runtime.code, "tunnel").inc()
            runtime.auth_throttle.failed(source)
            await _send_verdict(hello, Verdict(False, runtime.code, claimed,
                                               error="unknown connector or wrong token"))
            return None
        if len(self.attachments.get(connector.id, [])) >= MAX_LINKS:
            log.warning("tunnel: connector %s from %s refused: it already has %d links here",
                        connector.id, peer, MAX_LINKS)
            await _send_verdict(hello, Verdict(False, runtime.code, connector.id,
                                               connector.account,
                                               error=f"too many links to PoP {runtime.code}"))
            return None
        try:
            announced = parse_routes(hello.response_headers.get(ROUTES_HEADER, ""))
        except ValueError as error:
            log.warning("tunnel: connector %s from %s refused: bad announcement: %s",
                        connector.id, peer, error)
            await _send_verdict(hello, Verdict(False, runtime.code, connector.id,
                                               connector.account, error=f"bad announcement: {error}"))
            return None
        checked = check_announcement(runtime.state.snapshot, connector, announced)
        for route, other in checked.conflicts:
            log.warning("tunnel: connector %s (account %s) announced %s, which overlaps private "
                        "route %s of another account: refused", connector.id,
                        connector.account, route, other)
        for route, reason in checked.refused:
            log.warning("tunnel: connector %s: route %s refused: %s", connector.id, route, reason)
        attachment = Attachment(connector, link, peer, checked.networks, checked.hostnames,
                                announced, runtime.state.snapshot.version)
        await _send_verdict(hello, Verdict(True, runtime.code, connector.id, connector.account,
                                           checked.accepted, checked.refused))
        self.attachments.setdefault(connector.id, []).append(attachment)
        log.info("tunnel: connector %s (account %s) attached from %s, routes %s", connector.id,
                 connector.account, peer, ", ".join(checked.accepted) or "none")
        return attachment

    def _authenticate(self, token: str) -> Connector | None:
        connector_id = connector_of(token)
        connector = self.runtime.state.snapshot.connectors.get(connector_id or "")
        expected = connector.token_sha256 if connector is not None else _UNKNOWN_DIGEST
        if not hmac.compare_digest(token_digest(token), expected) or connector is None:
            return None
        return connector

    async def _hold(self, attachment: Attachment, hello: MuxStream) -> None:
        """Until the link ends: ping it, and drop it once the connector is gone from the
        configuration (deleted, or its token replaced)."""
        connector = attachment.connector
        try:
            while not attachment.link.closed.done():
                current = self.runtime.state.snapshot.connectors.get(connector.id)
                if current != connector:
                    log.warning("tunnel: connector %s was deleted or its token replaced: "
                                "link from %s closed", connector.id, attachment.peer)
                    with contextlib.suppress(MuxError):
                        await _send_verdict(hello, Verdict(
                            False, self.runtime.code, connector.id, connector.account,
                            error="the connector was deleted or its token replaced"))
                    return
                await self._recheck(attachment, hello)
                try:
                    await attachment.link.ping(PING_WAIT)
                except MuxError as error:
                    log.warning("tunnel: connector %s from %s stopped answering: %s",
                                connector.id, attachment.peer, error)
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PING_EVERY):
                        await asyncio.shield(attachment.link.closed)
        finally:
            attachments = self.attachments.get(connector.id, [])
            if attachment in attachments:
                attachments.remove(attachment)
            if not attachments:
                self.attachments.pop(connector.id, None)
            log.info("tunnel: connector %s from %s detached", connector.id, attachment.peer)

    async def _recheck(self, attachment: Attachment, hello: MuxStream) -> None:
        """Routes follow the configuration: a route removed, or now overlapping another
        account's, stops being carried; one declared since is carried. The connector is
        told with a new verdict."""
        snapshot = self.runtime.state.snapshot
        if snapshot.version == attachment.version:
            return
        checked = check_announcement(snapshot, attachment.connector, attachment.announced)
        attachment.version = snapshot.version
        if (checked.networks, checked.hostnames) != (attachment.networks, attachment.hostnames):
            attachment.networks, attachment.hostnames = checked.networks, checked.hostnames
            log.info("tunnel: connector %s from %s: routes now %s (snapshot %d)",
                     attachment.connector.id, attachment.peer,
                     ", ".join(checked.accepted) or "none", snapshot.version)
            connector = attachment.connector
            await _send_verdict(hello, Verdict(True, self.runtime.code, connector.id,
                                               connector.account, checked.accepted,
                                               checked.refused))

    # --- flows ----------------------------------------------------------------------

    def attached(self, connector: str, host: str) -> bool:
        return self._pick(connector, host) is not None

    def _pick(self, connector: str, host: str) -> Attachment | None:
        """The newest usable link of ``connector`` that announced ``host``."""
        for attachment in reversed(self.attachments.get(connector, [])):
            if attachment.link.usable and attachment.covers(host):
                return attachment
        return None

    async def open_tcp(self, connector: str, flow: TunnelFlow) -> socket.socket:
        """A stream to the connector, which connects to ``flow.host`` from its own host."""
        attachment = self._pick(connector, flow.host)
        if attachment is None:
            raise UpstreamError(f"connector {connector!r} is not attached to PoP "
                                f"{self.runtime.code} with a route to {flow.host}", status=502,
                                socks_reply=0x03)
        if attachment.connector.account != flow.account:  # R13, whoever asks
            raise UpstreamError(f"connector {connector!r} does not belong to account "
                                f"{flow.account!r}", status=403, socks_reply=0x02)
        fields = {"egressd-flow": flow.flow_id, "egressd-host": flow.host,
                  "egressd-port": str(flow.port)}
        try:
            stream = await attachment.link.open(connect_request(fields, FLOW))
        except StreamRefused as refused:
            raise UpstreamError(f"connector {connector}: {refused.reason}", status=502,
                                socks_reply=0x05) from None
        except MuxError as error:
            raise UpstreamError(f"connector {connector} is unreachable ({error})", status=502,
                                socks_reply=0x03) from None
        pair, theirs = socket.socketpair()
        ours = TunnelSocket(pair.family, pair.type, pair.proto, fileno=pair.detach())
        ours.egress_local = stream.response_headers.get("egressd-local")
        ours.setblocking(False)
        theirs.setblocking(False)
        self._spawn(carry(stream, theirs, what=f"flow {flow.flow_id}: link to connector {connector}"),
                    f"tunnel flow {flow.flow_id}")
        return ours

async def _send_verdict(hello: MuxStream, verdict: Verdict) -> None:
    """Write the verdict; a refusal also ends the stream and gives the connector a moment
    to read it and hang up (the link is closed after it either way)."""
    with contextlib.suppress(MuxError):
        await hello.write(verdict.encode())
        if not verdict.accepted:
            await hello.write_eof()
            with contextlib.suppress(TimeoutError, MuxError):
                async with asyncio.timeout(2.0):
                    await hello.read()
