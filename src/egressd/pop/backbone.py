"""The backbone between PoP hosts (DESIGN §4, PoP -> PoP), over `egressd.mux`: one
mutually authenticated TLS connection per PoP pair, a multiplexed stream per flow.

- `MuxBackbone` is the connected PoP's side: the `Backbone` its runtime hands flows to
  (R7). A flow becomes an extended CONNECT whose fields carry the `FlowHeader`.
- `BackboneServer` is the egress PoP's side: it checks the requested source address is a
  local, active dedicated address of the flow's account (R13, in `PopRuntime.egress_tcp`)
  and connects from it, or refuses with the reason.
- `HealthMonitor` pings every peer over its link twice a second and keeps the PoP's health
  view (reachable peers, smoothed RTTs) that the decision uses (R6, R11): a peer that has
  not answered for 1.5 s is down for new flows.

The runtime's relays work on sockets, so a backbone flow is handed to them as one end of a
socket pair, the other end pumped into the stream: one copy more than a direct flow, and
the same relay code for both (measured in benchmarks/backbone.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from egressd.decide import HealthView
from egressd.model.snapshot import Snapshot
from egressd.mux import (
    DatagramStream,
    MuxClient,
    MuxError,
    MuxServer,
    MuxStream,
    PeerIdentity,
    StreamRefused,
    pump,
)
from egressd.mux.pump import carry
from egressd.pop.background import BackgroundTask
from egressd.pop.runtime import FlowHeader, PopRuntime, StateHolder, TunnelFlow
from egressd.pop.upstream import UpstreamError
from egressd.protocols.socks5 import ProtocolError, build_udp_datagram, parse_udp_datagram

log = logging.getLogger("egressd.pop.backbone")

PROTOCOL_TCP: Final = "egressd-tcp"
PROTOCOL_UDP: Final = "connect-udp"
PROTOCOL_TUNNEL: Final = "egressd-tunnel"  # a flow for a connector attached to the far PoP
PING_INTERVAL: Final = 0.5
DEAD_AFTER: Final = 1.5  # with the interval: a dead peer is avoided within ~2 s (R11: 3 s)
RTT_SMOOTHING: Final = 0.3


def header_fields(header: FlowHeader) -> dict[str, str]:
    fields = {
        "egressd-flow": header.flow_id,
        "egressd-account": header.account,
        "egressd-source": str(header.source_address),
        "egressd-destination": str(header.destination),
        "egressd-port": str(header.port),
        "egressd-protocol": header.protocol,
    }
    if header.hostname:
        fields["egressd-hostname"] = header.hostname
    return fields


def parse_fields(fields: Mapping[str, str]) -> FlowHeader:
    """A FlowHeader from a stream's fields; ValueError names what is missing or malformed."""
    try:
        port = int(fields["egressd-port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        return FlowHeader(
            flow_id=fields["egressd-flow"],
            account=fields["egressd-account"],
            source_address=ipaddress.ip_address(fields["egressd-source"]),
            destination=ipaddress.ip_address(fields["egressd-destination"]),
            port=port,
            protocol=fields["egressd-protocol"],
            hostname=fields.get("egressd-hostname") or None,
        )
    except KeyError as missing:
        raise ValueError(f"missing field {missing.args[0]}") from None


@dataclass(frozen=True, slots=True)
class Peer:
    code: str
    host: str
    port: int


class BackboneSocket(socket.socket):
    """The relay's end of a backbone flow: a socket pair end that also knows the source
    address and port the egress PoP used (for the flow log)."""

    egress_local: str | None = None


class MuxBackbone:
    """The connected PoP's side of the backbone: implements `runtime.Backbone`."""

    def __init__(self, code: str, peers: Mapping[str, Peer], context: ssl.SSLContext,
                 port: int = 7443) -> None:
        self.code = code
        self.port = port
        self.peers = dict(peers)
        self._context = context
        self.clients: dict[str, MuxClient] = {}
        self._pumps: set[asyncio.Task[None]] = set()

    def client(self, pop: str) -> MuxClient:
        client = self.clients.get(pop)
        if client is None:
            peer = self.peers.get(pop)
            if peer is None:
                raise UpstreamError(f"egress PoP {pop} has no backbone address", status=502,
                                    socks_reply=0x03)
            client = self.clients[pop] = MuxClient(peer.host, peer.port, self._context,
                                                   server_hostname=pop)
        return client

    async def open_tcp(self, egress_pop: str, header: FlowHeader) -> socket.socket:
        client = self.client(egress_pop)
        try:
            stream = await client.open(header_fields(header), protocol=PROTOCOL_TCP)
        except StreamRefused as refused:
            raise UpstreamError(f"egress PoP {egress_pop}: {refused.reason}",
                                status=403 if refused.status == 403 else 502,
                                socks_reply=0x02 if refused.status == 403 else 0x05) from None
        except (MuxError, OSError) as error:
            raise UpstreamError(f"egress PoP {egress_pop} is unreachable over the backbone "
                                f"({error})", status=502, socks_reply=0x03) from None
        pair, theirs = socket.socketpair()
        ours = BackboneSocket(pair.family, pair.type, pair.proto, fileno=pair.detach())
        ours.egress_local = stream.response_headers.get("egressd-local")
        ours.setblocking(False)
        theirs.setblocking(False)
        task = asyncio.create_task(carry(stream, theirs, what=f"flow {header.flow_id}: backbone link to {egress_pop}"))
        self._pumps.add(task)
        task.add_done_callback(self._pumps.discard)
        return ours

    async def open_tunnel(self, pop: str, connector: str, flow: TunnelFlow) -> socket.socket:
        """A flow to a private route, carried to `pop`, where `connector` is attached (R4)."""
        fields = {"egressd-flow": flow.flow_id, "egressd-account": flow.account,
                  "egressd-connector": connector, "egressd-host": flow.host,
                  "egressd-port": str(flow.port)}
        try:
            stream = await self.client(pop).open(fields, protocol=PROTOCOL_TUNNEL)
        except StreamRefused as refused:
            raise UpstreamError(f"PoP {pop}: {refused.reason}", status=refused.status,
                                socks_reply=0x02 if refused.status == 403 else 0x05) from None
        except (MuxError, OSError) as error:
            raise UpstreamError(f"PoP {pop} is unreachable over the backbone ({error})",
                                status=502, socks_reply=0x03) from None
        pair, theirs = socket.socketpair()
        ours = BackboneSocket(pair.family, pair.type, pair.proto, fileno=pair.detach())
        ours.egress_local = stream.response_headers.get("egressd-local")
        ours.setblocking(False)
        theirs.setblocking(False)
        header = FlowHeader(flow_id=flow.flow_id, account=flow.account,
                            source_address=ipaddress.IPv4Address(0),
                            destination=ipaddress.IPv4Address(0), port=flow.port, protocol="tcp")
        task = asyncio.create_task(carry(stream, theirs, what=f"flow {header.flow_id}: backbone link to {pop}"))
        self._pumps.add(task)
        task.add_done_callback(self._pumps.discard)
        return ours

    async def follow(self, snapshot: Snapshot, port: int) -> None:
        """Peers come and go with the configuration: new data centers are dialled, links to
        removed ones (or moved addresses) are closed."""
        wanted = peers_of(self.code, snapshot, port)
        if wanted == self.peers:
            return
        for code, peer in list(self.peers.items()):
            if wanted.get(code) != peer:
                client = self.clients.pop(code, None)
                if client is not None:
                    await client.close()
        added = sorted(set(wanted) - set(self.peers))
        removed = sorted(set(self.peers) - set(wanted))
        self.peers = wanted
        log.info("backbone: peers now %s (added %s, removed %s)", ", ".join(sorted(wanted)) or
                 "none", ", ".join(added) or "none", ", ".join(removed) or "none")

    async def open_udp(self, egress_pop: str, header: FlowHeader) -> DatagramChannel:
        """A UDP association's datagrams to and from its egress PoP, over one stream
        (RFC 9297 capsules, each datagram with its peer address, SOCKS5 UDP framing)."""
        client = self.client(egress_pop)
        try:
            stream = await client.open(header_fields(header), protocol=PROTOCOL_UDP)
        except StreamRefused as refused:
            raise UpstreamError(f"egress PoP {egress_pop}: {refused.reason}", status=502,
                                socks_reply=0x02) from None
        except (MuxError, OSError) as error:
            raise UpstreamError(f"egress PoP {egress_pop} is unreachable over the backbone "
                                f"({error})", status=502, socks_reply=0x03) from None
        return DatagramChannel(stream, stream.response_headers.get("egressd-local"))

    def drop(self, pop: str) -> None:
        """Close the link to `pop` (its streams fail now); the next open or ping redials."""
        client = self.clients.get(pop)
        if client is not None:
            task = asyncio.create_task(client.close(), name=f"backbone-drop-{pop}")
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def close(self) -> None:
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for client in self.clients.values():
            await client.close()


class DatagramChannel:
    """The connected PoP's end of a UDP flow over the backbone. Duck-types the parts of an
    asyncio datagram transport the UDP relay uses (`sendto`, `close`, `get_extra_info`)."""

    QUEUE = 1024  # datagrams waiting for the stream; beyond, they are dropped (it is UDP)

    def __init__(self, stream: MuxStream, local: str | None) -> None:
        self.datagrams = DatagramStream(stream)
        self.local = local
        self.on_datagram: Callable[[bytes, tuple[str, int]], None] | None = None
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue(self.QUEUE)
        self.dropped = 0
        self._tasks = [asyncio.create_task(self._send_loop()),
                       asyncio.create_task(self._receive_loop())]

    def sendto(self, payload: bytes, address: tuple[str, int]) -> None:
        try:
            self._outbox.put_nowait(build_udp_datagram(address[0], address[1], payload))
        except asyncio.QueueFull:
            self.dropped += 1

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "sockname" and self.local:
            host, _, port = self.local.rpartition(":")
            return (host, int(port))
        return default

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.datagrams.stream.reset()

    async def _send_loop(self) -> None:
        with contextlib.suppress(MuxError):
            while True:
                await self.datagrams.send(await self._outbox.get())

    async def _receive_loop(self) -> None:
        with contextlib.suppress(MuxError, EOFError):
            while True:
                data = await self.datagrams.recv()
                try:
                    datagram = parse_udp_datagram(data)
                except ProtocolError:
                    continue
                if self.on_datagram is not None:
                    self.on_datagram(datagram.payload, (datagram.host, datagram.port))


class _EgressUdp(asyncio.DatagramProtocol):
    def __init__(self, datagrams: DatagramStream) -> None:
        self.datagrams = datagrams
        self.pending: set[asyncio.Task[None]] = set()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(self.pending) >= DatagramChannel.QUEUE:
            return  # the stream is behind: drop, as a congested link would
        task = asyncio.ensure_future(self.datagrams.send(
            build_udp_datagram(str(addr[0]), int(addr[1]), data)))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)


class BackboneServer:
    """The egress PoP's side: flows arriving from other PoPs leave from here."""

    def __init__(self, runtime: PopRuntime, context: ssl.SSLContext, host: str, port: int, *,
                 reuse_port: bool = False) -> None:
        self.runtime = runtime
        self.server = MuxServer(context, self._handle, host=host, port=port, reuse_port=reuse_port)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    async def start(self) -> None:
        await self.server.start()

    async def close(self) -> None:
        await self.server.close()

    async def _handle(self, stream: MuxStream, peer: PeerIdentity) -> None:
        if stream.headers.get(":protocol") == PROTOCOL_UDP:
            await self._handle_udp(stream, peer)
            return
        if stream.headers.get(":protocol") == PROTOCOL_TUNNEL:
            await self._handle_tunnel(stream, peer)
            return
        if stream.headers.get(":protocol") != PROTOCOL_TCP:
            await stream.refuse(501, f"protocol {stream.headers.get(':protocol')!r} not carried")
            return
        try:
            header = parse_fields(stream.headers)
        except ValueError as error:
            await stream.refuse(400, f"bad flow header from {peer.common_name}: {error}")
            return
        try:
            sock = await self.runtime.egress_tcp(header)
        except UpstreamError as error:
            log.warning("flow %s from %s refused: %s", header.flow_id, peer.common_name,
                        error.reason)
            await stream.refuse(403 if error.socks_reply == 0x02 else 502, error.reason)
            return
        local = sock.getsockname()
        try:
            await stream.accept({"egressd-local": f"{local[0]}:{local[1]}"})
            await pump(stream, sock)
        except MuxError as error:
            log.info("flow %s: backbone link from %s lost: %s", header.flow_id,
                     peer.common_name, error)
        finally:
            sock.close()


    async def _handle_tunnel(self, stream: MuxStream, peer: PeerIdentity) -> None:
        """A flow for a connector attached here; the connector checks nothing of the
        account, so `PopRuntime.egress_tunnel` does (R13)."""
        fields = stream.headers
        try:
            port = int(fields.get("egressd-port", ""))
            flow = TunnelFlow(fields["egressd-flow"], fields["egressd-account"],
                              fields["egressd-host"], port)
            connector = fields["egressd-connector"]
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} out of range")
        except (KeyError, ValueError) as error:
            await stream.refuse(400, f"bad tunnel flow header from {peer.common_name}: {error}")
            return
        try:
            sock = await self.runtime.egress_tunnel(connector, flow)
        except UpstreamError as error:
            log.info("tunnel flow %s from %s: %s", flow.flow_id, peer.common_name, error.reason)
            await stream.refuse(error.status if 400 <= error.status <= 599 else 502, error.reason)
            return
        try:
            await stream.accept({"egressd-local": getattr(sock, "egress_local", None) or ""})
            await pump(stream, sock)
        except MuxError as error:
            log.info("tunnel flow %s: backbone link from %s lost: %s", flow.flow_id,
                     peer.common_name, error)
        finally:
            sock.close()

    async def _handle_udp(self, stream: MuxStream, peer: PeerIdentity) -> None:
        try:
            header = parse_fields(stream.headers)
            sock = await self.runtime.egress_udp(header)  # R13: an address of this account here
        except ValueError as error:
            await stream.refuse(400, f"bad flow header from {peer.common_name}: {error}")
            return
        except UpstreamError as error:
            await stream.refuse(403, error.reason)
            return
        datagrams = DatagramStream(stream)
        transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _EgressUdp(datagrams), sock=sock)
        local = transport.get_extra_info("sockname")
        try:
            await stream.accept({"egressd-local": f"{local[0]}:{local[1]}"})
            while True:
                try:
                    datagram = parse_udp_datagram(await datagrams.recv())
                except ProtocolError:
                    continue
                transport.sendto(datagram.payload, (datagram.host, datagram.port))
        except (EOFError, MuxError):
            pass
        finally:
            for task in list(protocol.pending):
                task.cancel()
            transport.close()


class HealthMonitor:
    """Pings every peer over its link and keeps `holder.view` (R6 RTTs, R11 liveness)."""

    def __init__(self, code: str, backbone: MuxBackbone, holder: StateHolder, *,
                 interval: float = PING_INTERVAL, dead_after: float = DEAD_AFTER) -> None:
        self.code = code
        self.backbone = backbone
        self.holder = holder
        self.interval = interval
        self.dead_after = dead_after
        self.last_answer: dict[str, float] = {}
        self.rtt_ms: dict[str, float] = {}
        self._background = BackgroundTask(self._run, "backbone-health")

    def start(self) -> None:
        self._background.start()

    async def close(self) -> None:
        await self._background.stop()

    async def probe_once(self) -> None:
        await self.backbone.follow(self.holder.snapshot, self.backbone.port)
        peers = [code for code in self.backbone.peers if code != self.code]
        results = await asyncio.gather(*(self._ping(code) for code in peers))
        now = time.monotonic()
        for code, rtt in zip(peers, results, strict=True):
            if rtt is None:
                continue
            self.last_answer[code] = now
            previous = self.rtt_ms.get(code)
            self.rtt_ms[code] = rtt if previous is None else (
                RTT_SMOOTHING * rtt + (1 - RTT_SMOOTHING) * previous)
        for gone in set(self.last_answer) - set(peers):
            self.last_answer.pop(gone, None)
            self.rtt_ms.pop(gone, None)
        up = {code for code, at in self.last_answer.items() if now - at <= self.dead_after}
        was = self.holder.view.up
        view = HealthView(up=frozenset(up | {self.code}),
                          rtt_ms={(self.code, peer): round(ms, 3) for peer, ms in self.rtt_ms.items()
                                  if peer in up})
        self.holder.view = view  # new flows avoid a lost peer from now on
        for lost in sorted((was - view.up) - {self.code}):
            log.warning("backbone: %s stopped answering; new flows avoid it, flows through "
                        "it end (R11)", lost)
            # A silent peer (no reset from its host) would hold its flows for minutes: drop
            # the link, which fails every stream on it at once. Closing a link to a frozen
            # peer waits for its TLS goodbye, so that goes on beside the probing.
            self.backbone.drop(lost)
        for found in sorted((view.up - was) - {self.code}):
            log.info("backbone: %s reachable, RTT %.1f ms", found, self.rtt_ms.get(found, 0.0))

    async def _ping(self, code: str) -> float | None:
        try:
            return 1000 * await self.backbone.client(code).ping(timeout=self.dead_after)
        except (MuxError, OSError, UpstreamError):
            return None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.probe_once()
            except Exception:  # a bug here must not stop the probing
                log.exception("backbone health probe failed")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))


def peers_of(code: str, snapshot: Snapshot, port: int) -> dict[str, Peer]:
    """The other data centers with a backbone address, at the deployment's backbone port."""
    return {dc.code: Peer(dc.code, str(dc.backbone_address), port)
            for dc in snapshot.data_centers.values()
            if dc.backbone_address is not None and dc.code != code}


class BackboneStack:
    """A PoP's whole backbone: the links to its peers, its own server, the health monitor.

    Peers and their addresses come from the snapshot (`backbone` of each data center) and
    one port for the deployment; the certificates from a PKI directory made by
    `egressd pki` (ca.crt, pop-CODE.crt/.key).
    """

    def __init__(self, code: str, peers: Mapping[str, Peer], pki: Path,
                 listen: tuple[str, int], port: int = 7443) -> None:
        from egressd.mux import client_context, server_context

        cert, key, ca = pki / f"pop-{code}.crt", pki / f"pop-{code}.key", pki / "ca.crt"
        for path in (cert, key, ca):
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing (egressd pki pop {code} --dir {pki})")
        self.code = code
        self.listen = listen
        self.backbone = MuxBackbone(code, peers, client_context(cert, key, ca), port)
        self._server_context = server_context(cert, key, ca)
        self.server: BackboneServer | None = None
        self.monitor: HealthMonitor | None = None

    @classmethod
    def for_snapshot(cls, code: str, snapshot: Snapshot, pki: Path, port: int,
                     listen: tuple[str, int] | None = None) -> BackboneStack:
        peers = peers_of(code, snapshot, port)
        own = snapshot.data_centers.get(code)
        if listen is None:
            if own is None or own.backbone_address is None:
                raise ValueError(f"data center {code} has no backbone address in the "
                                 "deployment; give --backbone-listen")
            listen = (str(own.backbone_address), port)
        return cls(code, peers, pki, listen, port)

    async def start(self, runtime: PopRuntime, holder: StateHolder, *, reuse_port: bool = False) -> None:
        """With `reuse_port` (--workers N), every worker process runs all of this: its own
        server on the shared backbone port (the kernel spreads peers' connections), its own
        link to each peer and its own health monitor — N links per PoP pair, one per worker."""
        self.server = BackboneServer(runtime, self._server_context, *self.listen, reuse_port=reuse_port)
        await self.server.start()
        self.monitor = HealthMonitor(self.code, self.backbone, holder)
        await self.monitor.probe_once()
        self.monitor.start()
        log.info("backbone: listening on %s:%d, peers %s", *self.server.address,
                 ", ".join(sorted(self.backbone.peers)) or "none")

    async def close(self) -> None:
        if self.monitor is not None:
            await self.monitor.close()
        await self.backbone.close()
        if self.server is not None:
            await self.server.close()
