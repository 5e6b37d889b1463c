"""The device-facing multiplexed listener: one TLS + HTTP/2 connection per device, one
extended CONNECT stream per flow (DESIGN §4 Device -> PoP, issue 7), so a flow costs no
handshake.

The device proves who it is with its enrollment credential in ``proxy-authorization``
(Basic device-id:secret) on every stream, checked by `PopRuntime.authenticate` like a
SOCKS5 or HTTP proxy login: the same constant-time check, the same throttle per source
address (R13: nothing is proxied for an unauthenticated client). TLS authenticates the
PoP to the device (the deployment CA); the device presents no certificate.

A ``connect-tcp`` flow then takes exactly the path of a SOCKS5 CONNECT: admission,
decision, upstream connect (locally or over the backbone), flow log and metrics. Its
answer carries what the device shows its user: the flow id, the connected and the egress
PoP (R7: both visible), the source address and port used.

A ``connect-udp`` flow (RFC 9298: one target per stream, payloads in DATAGRAM capsules
with context id 0) is a SOCKS5 UDP association with one destination: the same
`UdpAssociation` (decision per destination with protocol ``udp``, R3; upstream socket per
source address; replies only from the target; a flow slot while it lives; idle timeout),
whose client side is the stream instead of a UDP socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from pathlib import Path
from typing import Final

from egressd.mux import DatagramStream, MuxServer, MuxStream, PeerIdentity, PumpError, pump
from egressd.mux.errors import MuxError, Side
from egressd.pop.flowlog import FlowRecord
from egressd.pop.identity import Identity
from egressd.pop.runtime import FlowRefused, PopRuntime
from egressd.pop.udp_relay import UdpAssociation
from egressd.pop.upstream import UpstreamError
from egressd.protocols.masque import PROTOCOL_TCP, PROTOCOL_UDP, parse_basic, parse_target
from egressd.protocols.socks5 import ProtocolError, build_udp_datagram, parse_udp_datagram

__all__ = ["DeviceLinkServer", "device_tls_context"]

log = logging.getLogger("egressd.pop.device_link")

AUTH_REALM: Final = 'Basic realm="egressd"'


def device_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.3, ALPN h2, no client certificate: devices authenticate per stream."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(cert, key)
    return context


class DeviceLinkServer:
    """Serves device links for one PoP runtime on ``host``:``port`` (0: any free port)."""

    def __init__(self, runtime: PopRuntime, context: ssl.SSLContext, host: str, port: int, *,
                 reuse_port: bool = False) -> None:
        self.runtime = runtime
        self.server = MuxServer(context, self._handle, host=host, port=port,
                                handshake_timeout=runtime.options.handshake_timeout,
                                reuse_port=reuse_port)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    @property
    def url(self) -> str:
        host, port = self.address
        return f"https://{f'[{host}]' if ':' in host else host}:{port}"

    async def start(self) -> None:
        await self.server.start()
        log.info("PoP %s: device link on %s", self.runtime.code, self.url)

    def stop_accepting(self) -> None:
        """Drain: new flows are refused with 503; flows in progress go on."""
        self.runtime.draining = True

    async def close(self) -> None:
        await self.server.close()

    async def _handle(self, stream: MuxStream, _peer: PeerIdentity) -> None:
        runtime = self.runtime
        peer = stream.peer_address or ("?", 0)
        identity = self._identity(stream, peer)
        if identity is None:
            return
        protocol = stream.headers.get(":protocol", "")
        if protocol not in (PROTOCOL_TCP, PROTOCOL_UDP):
            await stream.refuse(501, f"protocol {protocol[:40]!r} is not carried")
            return
        try:
            host, port = parse_target(protocol, stream.headers.get(":path", ""))
        except ValueError as error:
            runtime.metrics.protocol_errors.labels(runtime.code, "device-link").inc()
            await stream.refuse(400, str(error))
            return
        if runtime.draining:
            await stream.refuse(503, f"PoP {runtime.code} is draining")
            return
        if protocol == PROTOCOL_UDP:
            await self._udp(stream, peer, identity, host, port)
        else:
            await self._tcp(stream, peer, identity, host, port)

    def _identity(self, stream: MuxStream, peer: tuple[str, int]) -> Identity | None:
        """The device behind the stream's credentials; otherwise answers 407 itself."""
        runtime = self.runtime
        credentials = parse_basic(stream.headers.get("proxy-authorization"))
        identity = runtime.authenticate(credentials, peer)
        if identity is not None:
            return identity
        reason = "device credentials required"
        if credentials is not None:
            runtime.metrics.auth_failures.labels(runtime.code, "device-link").inc()
            record = runtime.new_record("tcp", peer)
            record.outcome = "auth-failed"
            record.error = f"wrong credentials for device {credentials[0][:100]!r}"
            runtime.finish(record)
            reason = "wrong device credentials"
        with contextlib.suppress(MuxError):
            stream.refuse_now(407, reason)
        return None

    async def _tcp(self, stream: MuxStream, peer: tuple[str, int], identity: Identity,
                   host: str, port: int) -> None:
        runtime = self.runtime
        record = runtime.new_record("tcp", peer)
        record.account, record.user, record.device = identity.account, identity.user, identity.device
        record.destination = host
        try:
            upstream = await runtime.open_tcp(identity, host, port, record)
        except FlowRefused as refused:
            record.outcome, record.error = "refused", refused.decision.reason
            runtime.finish(record)
            await stream.refuse(403, refused.decision.reason)
            return
        except UpstreamError as error:
            record.outcome, record.error = "upstream-error", error.reason
            runtime.finish(record)
            await stream.refuse(error.status, error.reason)
            return
        decision = record.decision
        egress_pop = (decision.egress_pop if decision is not None else None) or runtime.code
        runtime.flow_metrics.tcp_opened()
        timer = _IdleTimer(runtime.options.idle_timeout, runtime.options.max_lifetime)
        relaying = asyncio.ensure_future(self._relay(stream, upstream, record, egress_pop, timer))
        expired: str | None = None
        try:
            expired = await timer.watch(relaying)
            if expired is not None:
                stream.reset()
        finally:
            relaying.cancel()
            [outcome] = await asyncio.gather(relaying, return_exceptions=True)
            if isinstance(outcome, Exception):
                log.error("flow %s: relay failed: %r", record.flow_id, outcome)
            if expired is not None:
                record.closed_by = expired
            upstream.close()
            runtime.flow_metrics.tcp_closed()
            runtime.finish(record)

    @staticmethod
    async def _relay(stream: MuxStream, upstream: socket.socket, record: FlowRecord,
                     egress_pop: str, timer: _IdleTimer) -> None:
        try:
            await stream.accept({"egressd-flow": record.flow_id,
                                 "egressd-connected-pop": record.connected_pop,
                                 "egressd-egress-pop": egress_pop,
                                 "egressd-local": record.local_address or ""})
            record.bytes_up, record.bytes_down = await pump(stream, upstream, timer.touch)
            record.closed_by = "client"
        except PumpError as error:
            record.bytes_up, record.bytes_down = error.to_socket, error.to_stream
            record.closed_by = "client" if error.side is Side.STREAM else "upstream"
            record.error = str(error)
        except MuxError as error:
            record.closed_by, record.error = "client", str(error)

    async def _udp(self, stream: MuxStream, peer: tuple[str, int], identity: Identity,
                   host: str, port: int) -> None:
        runtime = self.runtime
        slot = runtime.admit_association(identity, peer[0])
        if slot is None:
            await stream.refuse(429, "too many flows open")
            return
        try:
            await stream.accept({"egressd-connected-pop": runtime.code})
        except MuxError:
            runtime.release_slot(slot)
            return
        association = UdpAssociation(runtime, identity, client_host=peer[0], requested=("", 0))
        datagrams = DatagramStream(stream)
        carrier = _StreamCarrier(datagrams)
        association.attach(carrier)
        runtime.metrics.active.labels(runtime.code, "udp").inc()
        receiving = asyncio.ensure_future(self._udp_from_device(datagrams, association, peer,
                                                                host, port))
        ended = asyncio.ensure_future(association.closed.wait())
        try:
            await asyncio.wait({receiving, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiving, ended):
                task.cancel()
            await asyncio.gather(receiving, ended, return_exceptions=True)
            carrier.close()
            runtime.metrics.active.labels(runtime.code, "udp").dec()
            closed_by = association.closed_by if association.closed.is_set() else "client"
            await association.close(closed_by)
            runtime.release_slot(slot)

    @staticmethod
    async def _udp_from_device(datagrams: DatagramStream, association: UdpAssociation,
                               peer: tuple[str, int], host: str, port: int) -> None:
        """Each capsule's payload goes to the stream's one target."""
        with contextlib.suppress(EOFError, MuxError):
            while True:
                payload = await datagrams.recv()
                association.from_client(build_udp_datagram(host, port, payload), peer)


class _IdleTimer:
    """The device-link flow's idle timeout and lifetime limit (`--idle-timeout`,
    `--max-lifetime`), as for tunnels of the other listeners."""

    def __init__(self, idle: float, lifetime: float | None) -> None:
        self.idle = idle
        self.lifetime = lifetime
        self.started = self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    async def watch(self, relaying: asyncio.Future[None]) -> str | None:
        """Wait for the relay; "idle-timeout" or "lifetime" if it had to be cut short."""
        while not relaying.done():
            now = time.monotonic()
            if now - self.last > self.idle:
                return "idle-timeout"
            if self.lifetime is not None and now - self.started > self.lifetime:
                return "lifetime"
            wake = min(self.idle - (now - self.last),
                       self.lifetime - (now - self.started) if self.lifetime is not None else 5.0, 5.0)
            await asyncio.wait({relaying}, timeout=max(0.05, wake))
        return None


class _StreamCarrier:
    """The association's client side when it is a CONNECT-UDP stream: `sendto` unwraps
    the SOCKS5 UDP header the association puts on replies and sends the payload as one
    capsule; a slow stream drops datagrams rather than blocking the association."""

    QUEUE: Final = 1024

    def __init__(self, datagrams: DatagramStream) -> None:
        self.datagrams = datagrams
        self.dropped = 0
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue(self.QUEUE)
        self._sender = asyncio.ensure_future(self._send_loop())

    def sendto(self, data: bytes, _address: object = None) -> None:
        try:
            self._outbox.put_nowait(parse_udp_datagram(data).payload)
        except (ProtocolError, asyncio.QueueFull):
            self.dropped += 1

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def close(self) -> None:
        self._sender.cancel()

    async def _send_loop(self) -> None:
        with contextlib.suppress(MuxError):
            while True:
                await self.datagrams.send(await self._outbox.get())
