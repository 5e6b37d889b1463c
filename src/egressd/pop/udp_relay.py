"""SOCKS5 UDP ASSOCIATE: one association per control connection (RFC 1928 §7).

Datagrams are accepted only from the client's address (and port, once known or when the
request named one); fragments are dropped, as the RFC allows. Each destination is
decided once (protocol `udp`, R3) and sent from an upstream socket bound to the
decision's source address; one upstream socket per source address, never shared with
another association. Replies are accepted only from destinations the client contacted
(like a NAT), wrapped in the SOCKS5 UDP header and sent back to the client. Every
destination is one flow in the flow log, written when the association ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from typing import Any

from egressd.model.addresses import IPAddress
from egressd.pop.flowlog import FlowRecord
from egressd.pop.identity import Identity
from egressd.pop.runtime import FlowHeader, PopRuntime, UdpChannel
from egressd.pop.upstream import UpstreamError, make_udp_socket
from egressd.protocols.socks5 import ProtocolError, build_udp_datagram, parse_udp_datagram

log = logging.getLogger("egressd.pop.udp")


def _plain(host: str) -> str:
    """IPv4-mapped IPv6 (::ffff:a.b.c.d) as plain IPv4, so addresses compare equal."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class _Side(asyncio.DatagramProtocol):
    def __init__(self, deliver: Any) -> None:
        self._deliver = deliver

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._deliver(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)


class _Upstream:
    """One upstream socket (one source address); queues datagrams until it is open."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | UdpChannel | None = None
        self.pending: list[tuple[bytes, tuple[str, int]]] = []
        self.failed = False


class UdpAssociation:
    def __init__(self, runtime: PopRuntime, identity: Identity, client_host: str,
                 requested: tuple[str, int]) -> None:
        self.runtime = runtime
        self.identity = identity
        self.client_ip = _plain(client_host)
        host, port = requested
        unspecified = host in ("0.0.0.0", "::", "")
        self.client_addr: tuple[Any, ...] | None = None
        self.expected_port = port if port and not unspecified else None
        self.transport: asyncio.DatagramTransport | None = None
        self.upstreams: dict[tuple[str | None, IPAddress], _Upstream] = {}
        self.records: dict[tuple[str, int], FlowRecord] = {}
        self.closed = asyncio.Event()
        self.closed_by = "client"
        self.last_activity = time.monotonic()
        self.dropped = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def start(self, bind_host: str) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Side(self.from_client),
                                                           local_addr=(bind_host, 0))
        self.transport = transport
        self._arm_timer()
        host, port = transport.get_extra_info("sockname")[:2]
        return host, port

    def attach(self, transport: Any) -> None:
        """Serve a client reached some other way than a UDP socket (a device link's
        CONNECT-UDP stream): `transport.sendto(socks5_datagram, addr)` reaches it, and its
        datagrams come in through `from_client` in SOCKS5 UDP framing."""
        self.transport = transport
        self._arm_timer()

    def _arm_timer(self) -> None:
        timeout = self.runtime.options.udp_idle_timeout
        self._timer = asyncio.get_running_loop().call_later(min(timeout, 5.0), self._check_idle)

    def _check_idle(self) -> None:
        if time.monotonic() - self.last_activity > self.runtime.options.udp_idle_timeout:
            self.closed_by = "idle-timeout"
            self.closed.set()
        else:
            self._arm_timer()

    def from_client(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if _plain(addr[0]) != self.client_ip or (
            self.expected_port is not None and addr[1] != self.expected_port
        ):
            self.dropped += 1  # not this association's client
            return
        if self.client_addr is None:
            self.client_addr = addr
        elif addr[:2] != self.client_addr[:2]:
            self.dropped += 1
            return
        try:
            datagram = parse_udp_datagram(data)
        except ProtocolError as exc:
            self.dropped += 1
            log.debug("bad SOCKS5 UDP datagram from %s: %s", addr, exc)
            return
        if datagram.is_fragment:
            self.dropped += 1  # RFC 1928 §7: an implementation may drop fragments
            return
        self.last_activity = time.monotonic()
        try:
            address = ipaddress.ip_address(datagram.host)
        except ValueError:
            self._spawn(self._send_to_name(datagram.host, datagram.port, datagram.payload))
            return
        self._send(address, datagram.port, datagram.payload, None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_to_name(self, host: str, port: int, payload: bytes) -> None:
        try:
            addresses = await self.runtime.resolve(host, port)
        except UpstreamError as exc:
            self.dropped += 1
            log.debug("UDP destination %s: %s", host, exc.reason)
            return
        ordered = sorted(addresses, key=lambda address: address.version)  # IPv4 first for UDP
        self._send(ordered[0], port, payload, host)

    def _send(self, address: IPAddress, port: int, payload: bytes, hostname: str | None) -> None:
        key = (str(address), port)
        record = self.records.get(key)
        if record is None:
            record = self.runtime.new_record("udp", (self.client_ip, self.client_addr[1] if self.client_addr else 0))
            record.account, record.user, record.device = (
                self.identity.account, self.identity.user, self.identity.device)
            record.destination, record.port, record.hostname = str(address), port, hostname
            record.decision = self.runtime.decide_for(self.identity, "udp", address, port, hostname)
            if record.decision.refused:
                record.outcome, record.error = "refused", record.decision.reason
            self.records[key] = record
        decision = record.decision
        if decision is None or decision.refused or decision.source_address is None:
            self.dropped += 1
            return
        if self.runtime.tunnel_route(decision, self.identity.account) is not None:
            # Connectors carry TCP only: never send a tunnel route's datagrams from the PoP.
            if record.outcome == "ok":
                record.outcome = "upstream-error"
                record.error = (f"private route {decision.route}: UDP is not carried through "
                                "tunnel connectors")
            self.dropped += 1
            return
        upstream_key = (decision.egress_pop, decision.source_address)
        upstream = self.upstreams.get(upstream_key)
        if upstream is None:
            upstream = self.upstreams[upstream_key] = _Upstream()
            self._spawn(self._open_upstream(upstream, decision.egress_pop, decision.source_address,
                                            address, port, record))
        if upstream.failed:
            self.dropped += 1
            return
        record.bytes_up += len(payload)
        if upstream.transport is None:
            upstream.pending.append((payload, (str(address), port)))
        else:
            upstream.transport.sendto(payload, (str(address), port))

    async def _open_upstream(self, upstream: _Upstream, egress_pop: str | None, source: IPAddress,
                             address: IPAddress, port: int, record: FlowRecord) -> None:
        runtime = self.runtime
        try:
            if egress_pop in (None, runtime.code):
                sock = make_udp_socket(source, runtime.options.sockets)
            else:
                header = FlowHeader(flow_id=record.flow_id, account=self.identity.account,
                                    source_address=source, destination=address, port=port, protocol="udp")
                carried = await runtime.backbone.open_udp(egress_pop or "", header)
                if not isinstance(carried, socket.socket):  # a channel over the backbone
                    carried.on_datagram = self.from_upstream
                    self._attach(upstream, carried, record)
                    return
                sock = carried
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Side(lambda data, addr: self.from_upstream(data, addr)), sock=sock)
        except UpstreamError as exc:
            upstream.failed = True
            record.outcome, record.error = "upstream-error", exc.reason
            return
        self._attach(upstream, transport, record)

    def _attach(self, upstream: _Upstream, transport: Any, record: FlowRecord) -> None:
        upstream.transport = transport
        if self.closed.is_set():
            transport.close()
            return
        sockname = transport.get_extra_info("sockname")
        if sockname:
            record.local_address = f"{sockname[0]}:{sockname[1]}"
        for payload, destination in upstream.pending:
            transport.sendto(payload, destination)
        upstream.pending.clear()

    def from_upstream(self, data: bytes, addr: tuple[Any, ...]) -> None:
        host, port = _plain(addr[0]), addr[1]
        record = self.records.get((host, port))
        if record is None or self.client_addr is None or self.transport is None:
            self.dropped += 1  # unsolicited: the client never sent to this address
            return
        self.last_activity = time.monotonic()
        record.bytes_down += len(data)
        self.transport.sendto(build_udp_datagram(host, port, data), self.client_addr)

    async def close(self, closed_by: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.closed_by = closed_by
        self.closed.set()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for upstream in self.upstreams.values():
            if upstream.transport is not None:
                upstream.transport.close()
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        for record in self.records.values():
            if record.outcome == "ok":
                record.closed_by = closed_by
            self.runtime.finish(record)
        self.records.clear()
