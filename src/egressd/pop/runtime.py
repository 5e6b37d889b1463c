"""One PoP's runtime: the current snapshot and health view, and opening upstream flows.

`PopRuntime.open_tcp` is where a proxied flow meets the decision: it resolves the
destination (both families, R5), asks `decide` for each candidate address, and connects
the usable ones with Happy Eyeballs, locally or through the backbone (R7). The egress
side of a backbone flow, `egress_tcp`, re-checks that the requested source address is
one of this PoP's dedicated addresses and belongs to the flow's account (R13).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from egressd.decide import Decision, Flow, HealthView, Path, decide_private_name
from egressd.model.addresses import IPAddress, address_text
from egressd.model.snapshot import Snapshot
from egressd.pop.admission import AdmissionLimits, AuthThrottle, SourceCounter
from egressd.pop.config_status import ConfigStatus
from egressd.pop.deadlines import Deadlines
from egressd.pop.decision_memo import DecisionMemo
from egressd.pop.dns_service import DnsService
from egressd.pop.flow_metrics import FlowMetrics
from egressd.pop.flowlog import FlowLog, FlowRecord
from egressd.pop.identity import CredentialMemo, Identity
from egressd.pop.metrics import PopMetrics
from egressd.pop.poller import Poller
from egressd.pop.relay import PipePool, RelayRegistry
from egressd.pop.resolver import ResolveError, Resolver
from egressd.pop.upstream import (
    SocketOptions,
    SpareSockets,
    UpstreamError,
    connect_tcp,
    happy_eyeballs,
    interleave_families,
    make_udp_socket,
)
from egressd.protocols.http1 import RequestHeadReader
from egressd.protocols.proxy_v2 import encode_proxy_v2

log = logging.getLogger("egressd.pop")


class FlowRefused(Exception):
    """The decision refused the flow (R11, R13, ...): the client gets 403 / SOCKS5 0x02."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason)
        self.decision = decision


@dataclass(frozen=True, slots=True)
class FlowHeader:
    """What a backbone flow carries to its egress PoP (DESIGN §4, PoP -> PoP)."""

    flow_id: str
    account: str
    source_address: IPAddress
    destination: IPAddress
    port: int
    protocol: str
    hostname: str | None = None


@dataclass(frozen=True, slots=True)
class TunnelFlow:
    """What a flow to a private route carries to its tunnel connector: the connector
    connects to `host` (an address, or a name it resolves itself) from its own host."""

    flow_id: str
    account: str
    host: str
    port: int


class Tunnels(Protocol):
    """The connectors attached to this PoP (`pop/tunnel_link.py`)."""

    def attached(self, connector: str, host: str) -> bool: ...

    async def open_tcp(self, connector: str, flow: TunnelFlow) -> socket.socket: ...


class UdpChannel(Protocol):
    """A UDP flow's datagrams carried elsewhere (the backbone), addressed per datagram like
    a datagram transport; replies come to `on_datagram(payload, (host, port))`."""

    on_datagram: Callable[[bytes, tuple[str, int]], None] | None

    def sendto(self, payload: bytes, address: tuple[str, int]) -> None: ...

    def close(self) -> None: ...

    def get_extra_info(self, name: str, default: object = None) -> object: ...


class Backbone(Protocol):
    """Carries flows to their egress PoP. In-process in `egressd serve`; mTLS between hosts."""

    async def open_tcp(self, egress_pop: str, header: FlowHeader) -> socket.socket: ...

    async def open_udp(self, egress_pop: str, header: FlowHeader) -> socket.socket | UdpChannel: ...

    async def open_tunnel(self, pop: str, connector: str, flow: TunnelFlow) -> socket.socket: ...


@dataclass(frozen=True, slots=True)
class PopOptions:
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0  # a client must finish its request within this
    idle_timeout: float = 300.0  # an established tunnel with no traffic either way
    max_lifetime: float | None = None
    udp_idle_timeout: float = 60.0
    via: str = "egressd"
    sockets: SocketOptions = field(default_factory=SocketOptions)
    limits: AdmissionLimits = field(default_factory=AdmissionLimits)
    # Request heads (RFC 9112): larger ones get 414 / 431.
    max_request_line: int = 8 * 1024
    max_header_section: int = 64 * 1024
    max_header_fields: int = 100

    def head_reader(self) -> RequestHeadReader:
        return RequestHeadReader(max_request_line=self.max_request_line,
                                 max_header_section=self.max_header_section,
                                 max_fields=self.max_header_fields)


class StateHolder:
    """The snapshot and health view in force; replaced atomically, read per flow.

    `config` says where the snapshot came from (file, control plane, disk copy) for
    /health; `pop/control_link.py` swaps in its own status when it feeds this holder."""

    def __init__(self, snapshot: Snapshot, view: HealthView) -> None:
        self.snapshot = snapshot
        self.view = view
        self.applied_at = time.time()
        self.config = ConfigStatus(version=snapshot.version, applied_at=self.applied_at)

    def replace(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.applied_at = time.time()
        self.config.version = snapshot.version
        self.config.applied_at = self.applied_at


_flow_counter = itertools.count(1)

#: Bound on cached flow-counter children (rules come and go with snapshots).
_MAX_CACHED_CHILDREN: Final = 4096


_pid: tuple[int, str] = (0, "")

#: A direct connect (`PopRuntime.direct_plan`): the address, its decision, the address as
#: flow records write it, and the name the device gave (None for a literal).
DirectPlan = tuple[IPAddress, Decision, str, str | None]
#: Bound on remembered direct plans per PoP (emptied when full, as the decision memo is).
_PLANS_KEPT: Final = 4096


def new_flow_id(pop: str) -> str:
    """`<pop>-<pid>-<n>`, unique across workers. The pid is cached (getpid is a system call
    per flow otherwise) and forgotten in a forked child."""
    global _pid
    if not _pid[1]:
        _pid = (os.getpid(), f"{os.getpid():x}")
    return f"{pop}-{_pid[1]}-{next(_flow_counter):x}"


def tcp_record(pop: str, client: str, identity: Identity) -> FlowRecord:
    """The record of a TCP flow of an authenticated device (`client`: "address:port"). It
    runs per tunnel and per forwarded request: `new_flow_id` is inline, and the record is
    built positionally, in the order of its fields (matching keywords cost more than the
    rest of the call)."""
    global _pid
    if not _pid[1]:
        _pid = (os.getpid(), f"{os.getpid():x}")
    return FlowRecord(f"{pop}-{_pid[1]}-{next(_flow_counter):x}", "tcp", pop, client,
                      time.time(), time.monotonic(), identity.account, identity.user,
                      identity.device)


def _forget_pid() -> None:
    global _pid
    _pid = (0, "")


os.register_at_fork(after_in_child=_forget_pid)


class PopRuntime:
    def __init__(
        self,
        code: str,
        state: StateHolder,
        backbone: Backbone,
        resolver: Resolver,
        options: PopOptions,
        flowlog: FlowLog,
        metrics: PopMetrics,
    ) -> None:
        self.code = code
        self.state = state
        self.backbone = backbone
        self.resolver = resolver
        self.dns: DnsService | None = None  # the PoP's DNS service for devices (DoH, port 53)
        self.options = options
        self.flowlog = flowlog
        self.metrics = metrics
        self.relays = RelayRegistry(options.idle_timeout, options.max_lifetime)
        self.pipes = PipePool()
        self.spares = SpareSockets()  # the plain handshake's upstream sockets, made ahead
        self._poller: Poller | None = None
        self.deadlines = Deadlines()  # the handshake and connect timeouts of plain connections
        self.draining = False
        self.tunnels: Tunnels | None = None  # set by the tunnel server, if this PoP has one
        self._tunnel_hints: dict[str, str] = {}  # connector -> peer PoP that last had it
        self.flow_metrics = FlowMetrics(metrics, code)
        limits = options.limits
        self._credentials = CredentialMemo()
        self._decisions = DecisionMemo(code)
        # Direct plans by (id(identity), host, port), each with its identity (kept alive so
        # the id cannot be reused), for the snapshot and health view in `_plans_for`.
        self._plans: dict[tuple[int, str, int], tuple[Identity, DirectPlan | None]] = {}
        self._plans_for: tuple[Snapshot | None, HealthView | None] = (None, None)
        self.auth_throttle = AuthThrottle(limits.auth_failures_per_source, limits.auth_failure_window)
        self.flows_per_source = SourceCounter(limits.max_flows_per_source)
        self.flows_per_account = SourceCounter(limits.max_flows_per_account)
        self._refusals = metrics.admission_refused

    @property
    def poller(self) -> Poller:
        """The readiness set of plain handshakes and splice relays (made on first use, on
        the running loop)."""
        if self._poller is None:
            self._poller = Poller(asyncio.get_running_loop())
        return self._poller

    def close_poller(self) -> None:
        if self._poller is not None:
            self._poller.close()
            self._poller = None

    def refuse(self, reason: str) -> None:
        """Count an admission refusal (handshake, flow or authentication cap)."""
        self._refusals.labels(self.code, reason).inc()

    def authenticate(self, credentials: tuple[str, str] | None, peer: tuple[str, int], *,
                     count_failure: bool = True) -> Identity | None:
        """Check credentials (every connection and request, constant time), unless this
        source is past its authentication-failure limit: then refuse without checking."""
        if credentials is None:
            return None  # no credentials yet: the 407 challenge, not a failure
        source = peer[0]
        throttle = self.auth_throttle
        if source in throttle.failing and throttle.blocked(source):  # no call for most sources
            self.refuse("auth-rate")
            return None
        identity = self._credentials.authenticate(self.state.snapshot, credentials)
        if identity is None and count_failure and self.auth_throttle.failed(source):
            log.warning("authentication: %s reached %d failures in %g s; refusing its "
                        "attempts until the window ends", source, self.auth_throttle.limit,
                        self.auth_throttle.window)
        return identity

    def new_record(self, protocol: str, client: tuple[str, int] | tuple[str, int, int, int]) -> FlowRecord:
        return FlowRecord(flow_id=new_flow_id(self.code), protocol=protocol,
                          connected_pop=self.code, client=f"{client[0]}:{client[1]}")

    def admit(self, record: FlowRecord, identity: Identity) -> None:
        """Take a flow slot for the account and the source address, or raise (429)."""
        record.admitted = self.admit_slot(identity, record.client.rpartition(":")[0])

    def admit_slot(self, identity: Identity, source: str) -> tuple[str, str]:
        """A flow slot for the account and the source address (a record's `admitted`,
        released by `finish`), or UpstreamError (429) past a cap."""
        if not self.flows_per_account.try_acquire(identity.account):
            self.refuse("flows-per-account")
            raise UpstreamError(f"account {identity.account!r} has too many flows open",
                                status=429, socks_reply=0x02)
        if not self.flows_per_source.try_acquire(source):
            self.flows_per_account.release(identity.account)
            self.refuse("flows-per-source")
            raise UpstreamError(f"{source} has too many flows open", status=429,
                                socks_reply=0x02)
        return identity.account, source

    def admit_association(self, identity: Identity, source: str) -> tuple[str, str] | None:
        """A flow slot for a UDP association (SOCKS5), or None past a cap."""
        try:
            return self.admit_slot(identity, source)
        except UpstreamError:
            return None

    def release_slot(self, slot: tuple[str, str]) -> None:
        self.flows_per_account.release(slot[0])
        self.flows_per_source.release(slot[1])

    def finish(self, record: FlowRecord) -> None:
        """Write the flow's log line and count it. Called exactly once per flow."""
        if record.admitted is not None:
            account, source = record.admitted
            record.admitted = None
            self.flows_per_account.release(account)
            self.flows_per_source.release(source)
        flowlog = self.flowlog
        if flowlog.enabled or flowlog.sinks:  # what `write` checks first, inline
            flowlog.write(record)
        decision = record.decision
        # Egress is a StrEnum: the member is its value's string (`.value` is a property).
        key = (record.protocol, decision.egress if decision else "none",
               decision.rule if decision else "-", record.outcome)
        self.flow_metrics.flow_ended(key, record.bytes_up, record.bytes_down)

    def observe_connect(self, decision: Decision, seconds: float) -> None:
        self.flow_metrics.connect_observed(decision.path or "-", seconds)  # StrEnum: its string

    def decide_for(self, identity: Identity | None, protocol: str, address: IPAddress,
                   port: int, hostname: str | None) -> Decision:
        state = self.state
        return self._decisions.decide(state.snapshot, state.view, identity, protocol, address,
                                      port, hostname)

    async def resolve(self, host: str, port: int) -> tuple[IPAddress, ...]:
        try:
            return await self.resolver.resolve(host, port)
        except ResolveError as exc:
            raise UpstreamError(str(exc), status=502, socks_reply=0x04) from exc

    async def open_tcp(self, identity: Identity, host: str, port: int, record: FlowRecord) -> socket.socket:
        """Resolve, decide per candidate, connect (Happy Eyeballs). Raises FlowRefused or
        UpstreamError; fills the record's decision and addresses either way."""
        record.port = port
        if self.resolver.literal(host) is None:
            tunnelled = await self._private_name(identity, host, port, record)
            if tunnelled is not None:
                return tunnelled
        addresses = await self.resolve(host, port)
        candidates = self._candidates(identity, host, port, addresses, record)
        started = time.monotonic()
        attempts = [self._attempt(address, port, decision, record) for address, decision in candidates]
        sock, index = await happy_eyeballs(attempts, cleanup=_close_socket)
        address, decision = candidates[index]
        record.decision = decision
        record.destination = str(address)
        local = sock.getsockname()
        if isinstance(local, tuple):
            record.local_address = f"{local[0]}:{local[1]}"
        else:  # a backbone flow: the egress PoP said which address and port it used
            record.local_address = getattr(sock, "egress_local", None)
        self.observe_connect(decision, time.monotonic() - started)
        return sock

    def private_name_decision(self, identity: Identity, host: str, port: int) -> Decision | None:
        """R4 for a name one of the account's tunnel routes serves (not resolved here)."""
        flow = Flow(account=identity.account, user=identity.user, device=identity.device,
                    connected_pop=self.code, protocol="tcp", address=_ANY_V4, port=port,
                    hostname=host)
        return decide_private_name(self.state.snapshot, flow)

    async def _private_name(self, identity: Identity, host: str, port: int,
                            record: FlowRecord) -> socket.socket | None:
        """A hostname of one of the account's tunnel routes goes to the connector unresolved
        (R4); None for every other name."""
        decision = self.private_name_decision(identity, host, port)
        if decision is None or decision.route is None or decision.via is None:
            return None
        if record.admitted is None:
            self.admit(record, identity)
        record.decision, record.hostname, record.destination = decision, host, host
        started = time.monotonic()
        sock = await self._open_tunnel(decision.route, decision.via,
                                       TunnelFlow(record.flow_id, identity.account, host, port))
        record.local_address = getattr(sock, "egress_local", None)
        self.observe_connect(decision, time.monotonic() - started)
        return sock

    def direct_plan(self, identity: Identity, host: str, port: int) -> DirectPlan | None:
        """The address and decision of a connect that needs no await and no record yet:
        `host` is an address literal whose decision allows the flow and connects locally
        with nothing to send first. None for anything else (a name, a refusal, another
        PoP, a private route): `direct_candidate` or `open_tcp` serves those, with a record
        from the start. Remembered per identity and target until the snapshot or the
        health view changes (`decide` is a pure function of them): a device repeats its
        tunnels. The caller takes the flow's slot (`admit_slot`) before it connects."""
        state = self.state
        plans = self._plans
        if self._plans_for[0] is not state.snapshot or self._plans_for[1] is not state.view:
            plans.clear()
            self.spares.clear()  # bound to addresses the change may have taken away
            self._plans_for = (state.snapshot, state.view)
        key = (id(identity), host, port)
        entry = plans.get(key)
        if entry is not None and entry[0] is identity:
            return entry[1]
        plan = None
        address = self.resolver.literal(host)
        if address is not None:
            hostname = None if _is_literal(host, (address,)) else host
            decision = self.decide_for(identity, "tcp", address, port, hostname)
            if not decision.refused and _connects_here(decision, self.code):
                plan = (address, decision, address_text(address), hostname)
        if len(plans) >= _PLANS_KEPT:
            plans.clear()
        plans[key] = (identity, plan)
        return plan

    def direct_candidate(self, identity: Identity, host: str, port: int,
                         record: FlowRecord) -> tuple[IPAddress, Decision] | None:
        """The one thing to connect, when it needs no await: `host` is an address literal
        and its decision connects locally with nothing to send first. The caller connects
        it with `upstream.start_connect` and fills `record.local_address`. None: use
        `open_tcp`. Raises FlowRefused; fills the record's decision either way."""
        address = self.resolver.literal(host)
        if address is None:
            return None
        record.port = port
        candidates = self._candidates(identity, host, port, (address,), record)
        if len(candidates) != 1:
            return None
        return candidates[0] if _connects_here(candidates[0][1], self.code) else None

    def _candidates(self, identity: Identity, host: str, port: int, addresses: tuple[IPAddress, ...],
                    record: FlowRecord) -> list[tuple[IPAddress, Decision]]:
        """Decide per address (RFC 8305 order); the usable ones, or FlowRefused. Takes the
        flow's admission slot first (UpstreamError 429 past a cap)."""
        if record.admitted is None:
            self.admit(record, identity)
        hostname = None if _is_literal(host, addresses) else host
        record.hostname = hostname
        candidates: list[tuple[IPAddress, Decision]] = []
        refused: Decision | None = None
        for address in interleave_families(addresses):
            decision = self.decide_for(identity, "tcp", address, port, hostname)
            if decision.refused:
                refused = refused or decision
                record.destination = record.destination or str(address)
            else:
                candidates.append((address, decision))
        if not candidates:
            assert refused is not None
            record.decision = refused
            raise FlowRefused(refused)
        record.decision = candidates[0][1]
        record.destination = address_text(candidates[0][0])
        return candidates

    def _attempt(self, address: IPAddress, port: int, decision: Decision,
                 record: FlowRecord) -> Callable[[], asyncio.Future[socket.socket] | asyncio.Task[socket.socket]]:
        async def attempt() -> socket.socket:
            return await self._connect_one(address, port, decision, record)
        return lambda: asyncio.ensure_future(attempt())

    async def _connect_one(self, address: IPAddress, port: int, decision: Decision,
                           record: FlowRecord) -> socket.socket:
        source = decision.source_address
        assert source is not None
        connector = self.tunnel_route(decision, record.account)
        if connector is not None and decision.route is not None:
            flow = TunnelFlow(record.flow_id, record.account or "", str(address), port)
            return await self._open_tunnel(decision.route, connector, flow)
        if decision.egress_pop not in (None, self.code):
            header = FlowHeader(flow_id=record.flow_id, account=record.account or "",
                                source_address=source, destination=address, port=port,
                                protocol="tcp", hostname=record.hostname)
            try:  # a frozen egress PoP must not hold the flow longer than a connect would
                async with asyncio.timeout(self.options.connect_timeout):
                    return await self.backbone.open_tcp(decision.egress_pop or "", header)
            except TimeoutError:
                raise UpstreamError(f"egress PoP {decision.egress_pop} did not take the flow "
                                    f"within {self.options.connect_timeout:g} s", status=504,
                                    socks_reply=0x04) from None
        sock = await connect_tcp(source, address, port, self.options.sockets, self.options.connect_timeout)
        if decision.path is Path.IN_NETWORK and decision.proxy_v2_source is not None:
            # R8: the origin sees the dedicated address as the logical source.
            local_port = sock.getsockname()[1]
            header_bytes = encode_proxy_v2((str(decision.proxy_v2_source), local_port), (str(address), port))
            try:
                await asyncio.get_running_loop().sock_sendall(sock, header_bytes)
            except OSError as exc:
                sock.close()
                raise UpstreamError(f"in-network origin {address}: {exc.strerror}") from exc
        return sock

    def tunnel_route(self, decision: Decision, account: str | None) -> str | None:
        """The connector of a decision's private route, when it is a tunnel route."""
        if decision.path is not Path.PRIVATE_ROUTE or decision.route is None:
            return None
        route = next((r for r in self.state.snapshot.routes
                      if r.id == decision.route and r.account == account), None)
        return route.via if route is not None and route.kind.value == "tunnel" else None

    async def _open_tunnel(self, route: str, connector: str, flow: TunnelFlow) -> socket.socket:
        """R4: to the connector, attached here or (over the backbone) to the nearest PoP
        that has it; the connector connects from its own host."""
        errors: list[str] = []
        tunnels = self.tunnels
        if tunnels is not None and tunnels.attached(connector, flow.host):
            try:  # a frozen connector must not hold the flow longer than a connect would
                async with asyncio.timeout(self.options.connect_timeout):
                    return await tunnels.open_tcp(connector, flow)
            except TimeoutError:
                errors.append(f"connector {connector} did not answer within "
                              f"{self.options.connect_timeout:g} s")
            except UpstreamError as error:
                errors.append(error.reason)
        view = self.state.view
        hint = self._tunnel_hints.get(connector)  # the PoP that carried its last flow
        peers = sorted((pop for pop in view.up if pop != self.code),
                       key=lambda pop: (pop != hint, view.rtt(self.code, pop), pop))
        for pop in peers:
            try:
                async with asyncio.timeout(self.options.connect_timeout):
                    sock = await self.backbone.open_tunnel(pop, connector, flow)
                if len(self._tunnel_hints) >= _MAX_CACHED_CHILDREN:
                    self._tunnel_hints.clear()
                self._tunnel_hints[connector] = pop
                return sock
            except TimeoutError:
                errors.append(f"PoP {pop} did not answer within {self.options.connect_timeout:g} s")
            except UpstreamError as error:
                if error.status == 403:
                    raise
                if "not attached" not in error.reason:
                    errors.append(error.reason)
        detail = f" ({'; '.join(errors)})" if errors else ""
        raise UpstreamError(f"private route {route}: connector {connector!r} is not connected{detail}",
                            status=502, socks_reply=0x03)

    async def egress_tunnel(self, connector: str, flow: TunnelFlow) -> socket.socket:
        """A backbone flow for a connector attached here (never passed on again)."""
        tunnels = self.tunnels
        if tunnels is None or not tunnels.attached(connector, flow.host):
            raise UpstreamError(f"connector {connector!r} is not attached to PoP {self.code}",
                                status=502, socks_reply=0x03)
        return await tunnels.open_tcp(connector, flow)

    async def egress_tcp(self, header: FlowHeader) -> socket.socket:
        """The egress PoP's side of a backbone flow: check ownership (R13), then connect."""
        self._check_backbone_source(header)
        return await connect_tcp(header.source_address, header.destination, header.port,
                                 self.options.sockets, self.options.connect_timeout)

    async def egress_udp(self, header: FlowHeader) -> socket.socket:
        self._check_backbone_source(header)
        return make_udp_socket(header.source_address, self.options.sockets)

    def _check_backbone_source(self, header: FlowHeader) -> None:
        snapshot = self.state.snapshot
        owner = snapshot.owner_of(header.source_address)
        entry = snapshot.accounts.get(header.account)
        home = None
        if entry is not None:
            home = next((loc.home_pop for loc in entry.active_locations if loc.ipv4 == header.source_address), None)
        if owner != header.account or home != self.code:
            raise UpstreamError(
                f"egress PoP {self.code} refused flow {header.flow_id}: {header.source_address} is not an "
                f"active dedicated address of account {header.account!r} at this PoP", status=502, socks_reply=0x02)


_ANY_V4: Final = ipaddress.IPv4Address(0)


def _connects_here(decision: Decision, code: str) -> bool:
    """An allowed decision that this PoP connects itself, with nothing to send first
    (no backbone hand-off, private route or PROXY header): a callback can connect it."""
    return not (decision.source_address is None or decision.egress_pop not in (None, code)
                or decision.path is Path.PRIVATE_ROUTE
                or (decision.path is Path.IN_NETWORK and decision.proxy_v2_source is not None))


def _is_literal(host: str, addresses: tuple[IPAddress, ...]) -> bool:
    return len(addresses) == 1 and address_text(addresses[0]) == host.strip("[]").lower()


def _close_socket(sock: socket.socket) -> None:
    sock.close()


class InProcessBackbone:
    """The backbone inside one process (`egressd serve`): hands flows to the egress PoP's
    runtime after the simulated one-way delay. Each PoP holds its own `link(code)`, which
    implements the same `Backbone` interface as the mTLS backbone between hosts."""

    def __init__(self, rtt_ms: dict[tuple[str, str], float] | None = None) -> None:
        self.pops: dict[str, PopRuntime] = {}
        self.rtt_ms = rtt_ms or {}
        self.down: set[str] = set()

    def link(self, connected_pop: str) -> InProcessLink:
        return InProcessLink(self, connected_pop)


class InProcessLink:
    """One PoP's end of the in-process backbone."""

    def __init__(self, backbone: InProcessBackbone, connected_pop: str) -> None:
        self.backbone = backbone
        self.connected_pop = connected_pop

    async def _reach(self, egress_pop: str) -> PopRuntime:
        pop = self.backbone.pops.get(egress_pop)
        if pop is None or egress_pop in self.backbone.down:
            raise UpstreamError(f"egress PoP {egress_pop} is unreachable over the backbone",
                                status=502, socks_reply=0x03)
        rtt = self.backbone.rtt_ms.get((self.connected_pop, egress_pop), 0.0)
        if rtt:
            await asyncio.sleep(rtt / 2000)  # one way, in seconds
        return pop

    async def open_tcp(self, egress_pop: str, header: FlowHeader) -> socket.socket:
        pop = await self._reach(egress_pop)
        return await pop.egress_tcp(header)

    async def open_udp(self, egress_pop: str, header: FlowHeader) -> socket.socket:
        pop = await self._reach(egress_pop)
        return await pop.egress_udp(header)

    async def open_tunnel(self, pop: str, connector: str, flow: TunnelFlow) -> socket.socket:
        runtime = await self._reach(pop)
        return await runtime.egress_tunnel(connector, flow)


class NoBackbone:
    """A PoP without backbone links: flows that must egress elsewhere fail clearly."""

    async def open_tcp(self, egress_pop: str, header: FlowHeader) -> socket.socket:
        raise UpstreamError(f"no backbone link to egress PoP {egress_pop}", status=502, socks_reply=0x03)

    async def open_udp(self, egress_pop: str, header: FlowHeader) -> socket.socket:
        raise UpstreamError(f"no backbone link to egress PoP {egress_pop}", status=502, socks_reply=0x03)

    async def open_tunnel(self, pop: str, connector: str, flow: TunnelFlow) -> socket.socket:
        raise UpstreamError(f"connector {connector!r} is not attached to PoP {pop} (no backbone)",
                            status=502, socks_reply=0x03)
