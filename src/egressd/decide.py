"""The egress decision: (snapshot, flow, health view) -> Decision. Pure: no I/O, no clock.

Every rule of DESIGN §2 that concerns a single flow lives here, in the order in which it
applies: refuse what must never be proxied (R13), keep DNS and private routes on shared
addresses (R4), honour the account's proxy settings (R3), then the first matching policy
or the most performant dedicated location (R6), with failover (R11), and finally the
path each family takes (R7 IPv4 over the backbone, R8 in-network origins, R9 IPv6
locally). The decision names the rule that decided, so every log line can explain itself.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from egressd.model.accounts import DedicatedLocation, Fallback
from egressd.model.addresses import IPAddress, address_in_prefix, stable_hash
from egressd.model.lookup import normalise_hostname
from egressd.model.policy import SHARED_SECONDARY, DedicatedAction, EgressPolicy
from egressd.model.routes import RouteKind
from egressd.model.snapshot import IPV6_SUBRANGE_BITS, AccountIndex, Snapshot
from egressd.model.topology import DataCenter


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"
    DNS = "dns"


# Plain str constants: comparing against an enum member costs an attribute lookup per flow.
_DNS: str = Protocol.DNS.value
_UDP: str = Protocol.UDP.value


class Egress(StrEnum):
    SHARED = "shared"
    DEDICATED = "dedicated"
    REFUSED = "refused"


_SHARED = Egress.SHARED


class Path(StrEnum):
    DIRECT = "direct"  # leaves from the connected PoP
    BACKBONE = "backbone"  # carried to another PoP and leaves there (R7)
    IN_NETWORK = "in-network"  # leaves locally with a PROXY v2 logical source (R8)
    PRIVATE_ROUTE = "private-route"  # through a tunnel connector or WAN link (R4)


@dataclass(frozen=True, slots=True)
class Flow:
    """What the PoP knows about a flow when it must choose its egress.

    `address` is one resolved candidate: for a hostname the PoP decides per family (R5).
    `account` is None for an unauthenticated client.
    """

    account: str | None
    user: str
    device: str
    connected_pop: str
    protocol: str
    address: IPAddress
    port: int
    hostname: str | None = None


@dataclass(frozen=True, slots=True)
class HealthView:
    """The connected PoP's view of its peers: which are reachable, and the backbone RTTs."""

    up: frozenset[str]
    rtt_ms: Mapping[tuple[str, str], float] = field(default_factory=dict)

    def is_up(self, connected_pop: str, pop: str) -> bool:
        return pop == connected_pop or pop in self.up

    def rtt(self, source: str, target: str) -> float:
        if source == target:
            return 0.0
        return self.rtt_ms.get((source, target), math.inf)


class Decision(NamedTuple):
    """The outcome. A NamedTuple: immutable like the rest, and cheap to build per flow."""

    egress: Egress
    rule: str  # "R1".."R13" or "policy:<id>"
    connected_pop: str
    source_address: IPAddress | None = None
    egress_pop: str | None = None
    path: Path | None = None
    logical_city: str | None = None
    location: str | None = None
    proxy_v2_source: IPAddress | None = None
    route: str | None = None  # private route id
    via: str | None = None  # connector or WAN link of that route
    reason: str = ""

    @property
    def refused(self) -> bool:
        return self.egress is Egress.REFUSED


def decide(snapshot: Snapshot, flow: Flow, view: HealthView) -> Decision:
    connected = snapshot.data_centers.get(flow.connected_pop)
    if connected is None:
        return _refuse(flow, "R13", f"unknown connected PoP {flow.connected_pop!r}")
    if flow.account is None:
        return _refuse(flow, "R13", "unauthenticated client: nothing is proxied")
    entry = snapshot.accounts.get(flow.account)
    if entry is None:
        return _refuse(flow, "R13", f"unknown account {flow.account!r}")
    address = flow.address
    version = address.version
    address_int = int(address)
    own = snapshot.infrastructure.longest_int(version, address_int)
    if own is not None:  # the gateway's own addresses: no setting re-allows them
        return _refuse(flow, "R13", f"destination {address} is {own}")
    forbidden = snapshot.forbidden.longest_int(version, address_int)
    if forbidden is not None and snapshot.allowed.longest_int(version, address_int) is None:
        return _refuse(flow, "R13", f"destination {address} is {forbidden}")
    hostname = flow.hostname
    if hostname:
        hostname = normalise_hostname(hostname)

    route = entry.route_cidrs.longest_int(version, address_int) if entry.has_route_cidrs else None
    if route is None and hostname is not None and entry.has_route_hosts:
        route = entry.route_hosts.longest(hostname)
    if route is None and snapshot.private_cidrs:
        foreign = snapshot.private_cidrs.longest_int(version, address_int)
        if foreign is not None and foreign.account != flow.account:
            # A WAN route is in the PoP's routing table for everyone: only its account may use it.
            return _refuse(flow, "R13", f"destination {address} is in a private route of another account")
    if route is not None:
        return _shared(
            connected,
            flow,
            "R4",
            path=Path.PRIVATE_ROUTE,
            route=route.id,
            via=route.via,
            reason=f"private route {route.id} ({route.kind.value})",
        )
    protocol = flow.protocol
    if protocol == _DNS:
        return _shared(connected, flow, "R4", reason="DNS resolved by the gateway")
    if not entry.proxy_tcp or (protocol == _UDP and not entry.proxy_udp):
        return _shared(
            connected, flow, "R3", reason=f"{flow.protocol} is not proxied for this account"
        )

    policy = entry.policies.first_match(
        flow.user,
        flow.device,
        protocol,
        flow.connected_pop,
        version,
        address_int,
        hostname,
        flow.port,
    )
    if policy is not None:
        return _by_policy(snapshot, entry, connected, flow, policy, view)
    if not entry.dedicated_active:
        return _shared(
            connected,
            flow,
            "R1" if not entry.locations else "R2",
            reason="shared by default"
            if not entry.locations
            else "dedicated egress not active: needs active locations in two cities",
        )
    location = _most_performant(snapshot, entry, connected, flow, view)
    if location is None:
        if entry.account.settings.fallback is Fallback.SHARED:
            return _shared(
                connected, flow, "R11", reason="no dedicated location usable; fallback shared"
            )
        return _refuse(flow, "R11", "no dedicated location is usable and fallback is closed")
    return _dedicated(snapshot, connected, flow, location, "R6", hostname)


def _by_policy(
    snapshot: Snapshot,
    entry: AccountIndex,
    connected: DataCenter,
    flow: Flow,
    policy: EgressPolicy,
    view: HealthView,
) -> Decision:
    rule = f"policy:{policy.id}"
    action = policy.action
    if not isinstance(action, DedicatedAction):
        return _shared(connected, flow, rule, reason="policy action shared")
    if not entry.dedicated_active:
        return _shared(
            connected,
            flow,
            "R2",
            reason=f"policy {policy.id} asks for dedicated egress, which is not active",
        )
    hostname = normalise_hostname(flow.hostname) if flow.hostname else None
    if flow.address.version == 6:  # R9: leaves locally, so no secondary is needed
        location = entry.locations.get(action.ipv6)
        if location is not None and location in entry.active_locations and location.ipv6:
            return _dedicated(snapshot, connected, flow, location, rule, hostname)
        if action.secondary == SHARED_SECONDARY:
            return _shared(
                connected,
                flow,
                f"{rule}+R11",
                reason=f"IPv6 location {action.ipv6!r} is not active; secondary is shared",
            )
        return _refuse(
            flow, f"{rule}+R11", f"policy {policy.id}: IPv6 location {action.ipv6!r} is not active"
        )
    needs_home = not _in_network(snapshot, flow, hostname)
    for candidate in (action.primary, action.secondary):
        if candidate == SHARED_SECONDARY:
            return _shared(
                connected, flow, f"{rule}+R11", reason="primary unusable; secondary is shared"
            )
        location = entry.locations.get(candidate)
        if (
            location is not None
            and location in entry.active_locations
            and (not needs_home or view.is_up(connected.code, location.home_pop))
        ):
            failover = candidate != action.primary
            return _dedicated(
                snapshot, connected, flow, location, f"{rule}+R11" if failover else rule, hostname
            )
    return _refuse(
        flow,
        "R11",
        f"policy {policy.id}: neither primary {action.primary!r} nor "
        f"secondary {action.secondary!r} is reachable",
    )


def _in_network(snapshot: Snapshot, flow: Flow, hostname: str | None) -> bool:
    """R8: an IPv4 destination served inside the gateway's network."""
    return snapshot.origin_cidrs.longest(flow.address) is not None or (
        hostname is not None and snapshot.origin_hosts.longest(hostname) is not None
    )


def _most_performant(
    snapshot: Snapshot, entry: AccountIndex, connected: DataCenter, flow: Flow, view: HealthView
) -> DedicatedLocation | None:
    """R6: lowest backbone RTT from the connected PoP, ties broken by a stable user hash.

    IPv4 needs the home PoP reachable (R7), unless the destination is in-network (R8).
    IPv6 leaves locally (R9) but prefers the same reachable location as IPv4 would, so a
    user's two families keep one logical city; an unreachable one is used only as a last
    resort.
    """
    best: DedicatedLocation | None = None
    best_key: tuple[bool, float, int] = (True, math.inf, 0)
    ipv6 = flow.address.version == 6
    needs_home = not ipv6 and not _in_network(
        snapshot, flow, normalise_hostname(flow.hostname) if flow.hostname else None
    )
    for location in entry.active_locations:
        if ipv6 and location.ipv6 is None:
            continue
        reachable = view.is_up(connected.code, location.home_pop)
        if needs_home and not reachable:
            continue
        key = (
            not reachable,
            view.rtt(connected.code, location.home_pop),
            stable_hash(flow.user, location.id),
        )
        if best is None or key < best_key:
            best, best_key = location, key
    return best


def _dedicated(
    snapshot: Snapshot,
    connected: DataCenter,
    flow: Flow,
    location: DedicatedLocation,
    rule: str,
    hostname: str | None,
) -> Decision:
    home = snapshot.data_centers[location.home_pop]
    if flow.address.version == 6:
        assert location.ipv6 is not None
        return Decision(
            egress=Egress.DEDICATED,
            rule=rule,
            connected_pop=connected.code,
            source_address=ipv6_source(location.ipv6, connected.slot, flow.user),
            egress_pop=connected.code,
            path=Path.DIRECT,
            logical_city=home.city,
            location=location.id,
        )
    if _in_network(snapshot, flow, hostname):
        return Decision(
            egress=Egress.DEDICATED,
            rule=rule,
            connected_pop=connected.code,
            source_address=_shared_source(connected, flow),
            egress_pop=connected.code,
            path=Path.IN_NETWORK,
            logical_city=home.city,
            location=location.id,
            proxy_v2_source=location.ipv4,
        )
    return Decision(
        egress=Egress.DEDICATED,
        rule=rule,
        connected_pop=connected.code,
        source_address=location.ipv4,
        egress_pop=home.code,
        path=Path.DIRECT if home.code == connected.code else Path.BACKBONE,
        logical_city=home.city,
        location=location.id,
    )


def ipv6_source(prefix: ipaddress.IPv6Network, slot: int, user: str) -> ipaddress.IPv6Address:
    """R9: an address in the connected PoP's sub-range of a location's IPv6 range."""
    host_bits = 128 - prefix.prefixlen - IPV6_SUBRANGE_BITS
    base = int(prefix.network_address) | (slot << host_bits)
    return ipaddress.IPv6Address(base + 1 + stable_hash(user) % ((1 << min(host_bits, 16)) - 1))


def ipv6_subrange(prefix: ipaddress.IPv6Network, slot: int) -> ipaddress.IPv6Network:
    """The part of a location's range routed to the PoP with this slot."""
    host_bits = 128 - prefix.prefixlen - IPV6_SUBRANGE_BITS
    base = int(prefix.network_address) | (slot << host_bits)
    return ipaddress.IPv6Network((base, 128 - host_bits))


def _shared_source(connected: DataCenter, flow: Flow) -> IPAddress | None:
    if flow.address.version == 6:
        if connected.shared_ipv6 is None:
            return None
        return address_in_prefix(connected.shared_ipv6, stable_hash(flow.account or "", flow.user))
    shared = connected.shared_ipv4
    if len(shared) == 1:  # the common case needs no hash
        return shared[0]
    return shared[stable_hash(flow.account or "", flow.user) % len(shared)]


def decide_private_name(snapshot: Snapshot, flow: Flow) -> Decision | None:
    """R4 for a hostname that one of the account's *tunnel* routes serves, before any
    resolution: the connector resolves it inside its private network, which the PoP's
    resolver cannot see. None when no tunnel route of the account names it (then the
    flow is resolved and decided per address as usual). `flow.address` only picks the
    family of the (unused) shared source."""
    connected = snapshot.data_centers.get(flow.connected_pop)
    entry = snapshot.accounts.get(flow.account or "")
    if connected is None or entry is None or not entry.has_route_hosts or not flow.hostname:
        return None
    route = entry.route_hosts.longest(normalise_hostname(flow.hostname))
    if route is None or route.kind is not RouteKind.TUNNEL:
        return None
    return _shared(connected, flow, "R4", path=Path.PRIVATE_ROUTE, route=route.id,
                   via=route.via, reason=f"private route {route.id} ({route.kind.value})")


def _shared(
    connected: DataCenter,
    flow: Flow,
    rule: str,
    *,
    path: Path = Path.DIRECT,
    route: str | None = None,
    via: str | None = None,
    reason: str = "",
) -> Decision:
    source = _shared_source(connected, flow)
    if source is None:
        return _refuse(flow, "R5", f"PoP {connected.code} has no shared IPv6 range")
    code = connected.code
    # Positional: keyword construction of a NamedTuple costs more, on every shared flow.
    return Decision(
        _SHARED, rule, code, source, code, path, connected.city, None, None, route, via, reason
    )


def _refuse(flow: Flow, rule: str, reason: str) -> Decision:
    return Decision(
        egress=Egress.REFUSED, rule=rule, connected_pop=flow.connected_pop, reason=reason
    )
