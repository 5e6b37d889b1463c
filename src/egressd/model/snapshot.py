"""The config snapshot: a validated, versioned, immutable view indexed for per-flow lookups.

`build_snapshot` is the only way to make one; it checks every rule of DESIGN §2 that is a
property of configuration (R2, R3, R13 ownership) and reports all problems at once, each
with the path of the offending field. A snapshot never changes; a new configuration is a
new snapshot with a higher version, swapped in atomically by its holder.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from egressd.model.accounts import Account, DedicatedLocation, Device, LocationState, Plan
from egressd.model.addresses import IPAddress, IPNetwork
from egressd.model.errors import ValidationError, ValidationIssue
from egressd.model.lookup import CidrTable, HostTable, normalise_hostname
from egressd.model.policy import PROTOCOLS, SHARED_SECONDARY, DedicatedAction
from egressd.model.policy_index import PolicyIndex
from egressd.model.routes import Connector, InNetworkOrigin, PrivateRoute
from egressd.model.topology import DataCenter

# Each PoP gets its own sub-range of every location's IPv6 range (R9): prefix + 16 bits.
IPV6_SUBRANGE_BITS = 16
MAX_LOCATION_IPV6_PREFIXLEN = 128 - 16 - IPV6_SUBRANGE_BITS

# Destinations a PoP refuses unless the deployment allows them explicitly (R13, no SSRF).
# `allow_destinations` can re-allow these (a lab's echo on loopback); never the PoPs' own
# addresses, the dedicated addresses or the control plane.
ALWAYS_FORBIDDEN: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "an unspecified address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("224.0.0.0/4", "a multicast address"),
    ("255.255.255.255/32", "the broadcast address"),
    ("::/128", "the unspecified address"),
    ("::1/128", "the loopback address"),
    ("fe80::/10", "a link-local address"),
    ("ff00::/8", "a multicast address"),
    ("::ffff:0:0/96", "an IPv4-mapped address"),
    ("::/96", "an IPv4-compatible address"),
)


@dataclass(frozen=True, slots=True)
class Quarantine:
    """A released address that no other account may receive before `until` (R2)."""

    address: IPAddress | IPNetwork
    released_by: str
    until: datetime


@dataclass(frozen=True, slots=True)
class DeploymentSettings:
    quarantine_days: int = 30
    # Destinations inside forbidden ranges that this deployment allows (e.g. a lab's echo).
    allow_destinations: tuple[IPNetwork, ...] = ()
    # Addresses of the control plane and other infrastructure the PoPs must never reach.
    control_addresses: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class AccountIndex:
    """Per-account lookups built once per snapshot."""

    account: Account
    dedicated_active: bool
    locations: Mapping[str, DedicatedLocation]
    active_locations: tuple[DedicatedLocation, ...]
    policies: PolicyIndex
    route_cidrs: CidrTable[PrivateRoute]
    route_hosts: HostTable[PrivateRoute]
    # Copies of hot fields, so a decision touches fewer objects (cache misses dominate
    # with thousands of accounts; bools are shared singletons).
    proxy_tcp: bool = True
    proxy_udp: bool = False
    has_route_cidrs: bool = False
    has_route_hosts: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    version: int
    data_centers: Mapping[str, DataCenter]
    accounts: Mapping[str, AccountIndex]
    devices: Mapping[str, tuple[str, Device]]  # device id -> (account id, device)
    origins: tuple[InNetworkOrigin, ...]
    routes: tuple[PrivateRoute, ...]
    quarantine: tuple[Quarantine, ...]
    settings: DeploymentSettings
    ipv4_owner: Mapping[ipaddress.IPv4Address, str]
    ipv6_owner: CidrTable[str]
    shared_addresses: frozenset[IPAddress]
    forbidden: CidrTable[str]  # special-purpose ranges; `allowed` can lift these
    infrastructure: CidrTable[str]  # the gateway's own addresses; never lifted
    allowed: CidrTable[bool]
    origin_cidrs: CidrTable[InNetworkOrigin]
    origin_hosts: HostTable[InNetworkOrigin]
    # Every account's private-route CIDRs: another account's flow must not reach them (R13).
    private_cidrs: CidrTable[PrivateRoute] = field(default_factory=CidrTable)
    # Tunnel connectors by id (deployment-wide ids): who may attach and for which account.
    connectors: Mapping[str, Connector] = field(default_factory=dict)
    extra: Mapping[str, object] = field(default_factory=dict)

    def account(self, account_id: str) -> AccountIndex | None:
        return self.accounts.get(account_id)

    def owner_of(self, address: IPAddress) -> str | None:
        """The account a dedicated address or range belongs to, if any."""
        if isinstance(address, ipaddress.IPv4Address):
            return self.ipv4_owner.get(address)
        return self.ipv6_owner.longest(address)


def dedicated_is_active(account: Account, data_centers: Mapping[str, DataCenter]) -> bool:
    """R2: enterprise, and active locations in at least two different cities."""
    if account.plan is not Plan.ENTERPRISE:
        return False
    cities = {
        (dc.city, dc.country)
        for loc in account.active_locations()
        if (dc := data_centers.get(loc.home_pop)) is not None
    }
    return len(cities) >= 2


def build_snapshot(
    *,
    version: int,
    data_centers: Sequence[DataCenter],
    accounts: Sequence[Account],
    routes: Sequence[PrivateRoute] = (),
    connectors: Sequence[Connector] = (),
    origins: Sequence[InNetworkOrigin] = (),
    quarantine: Sequence[Quarantine] = (),
    settings: DeploymentSettings = DeploymentSettings(),
    now: datetime | None = None,
) -> Snapshot:
    """Validate everything and index it. Raises ValidationError listing every issue."""
    issues: list[ValidationIssue] = []
    dcs = _check_data_centers(data_centers, issues)
    shared = _shared_addresses(dcs.values())
    ipv4_owner: dict[ipaddress.IPv4Address, str] = {}
    ipv6_owner: CidrTable[str] = CidrTable()
    ipv6_claims: list[tuple[ipaddress.IPv6Network, str, str]] = [
        (
            dc.shared_ipv6,
            f"the shared range of PoP {dc.code}",
            f"data_centers[{dc.code}].shared_ipv6",
        )
        for dc in dcs.values()
        if dc.shared_ipv6 is not None
    ]
    account_ids: set[str] = set()
    devices: dict[str, tuple[str, Device]] = {}
    for account in accounts:
        where = f"accounts[{account.id}]"
        if account.id in account_ids:
            issues.append(ValidationIssue(where, "duplicate account id"))
        account_ids.add(account.id)
        _check_account(account, dcs, issues)
        for loc in account.locations:
            lwhere = f"{where}.locations[{loc.id}]"
            if loc.ipv4 in shared:
                issues.append(
                    ValidationIssue(
                        f"{lwhere}.ipv4",
                        f"{loc.ipv4} is a shared address of a PoP; shared addresses are never dedicated",
                        "R2",
                    )
                )
            previous = ipv4_owner.get(loc.ipv4)
            if previous is not None:
                issues.append(
                    ValidationIssue(
                        f"{lwhere}.ipv4",
                        f"{loc.ipv4} already belongs to account {previous!r}; an address has one owner",
                        "R2",
                    )
                )
            ipv4_owner.setdefault(loc.ipv4, account.id)
            if loc.ipv6 is not None:
                ipv6_claims.append((loc.ipv6, f"account {account.id!r}", f"{lwhere}.ipv6"))
                ipv6_owner.add(loc.ipv6, account.id)
            _check_quarantine(loc, account.id, quarantine, now, lwhere, issues)
        for device in account.devices:
            if device.id in devices:
                issues.append(
                    ValidationIssue(
                        f"{where}.devices[{device.id}]",
                        f"device id already used by account {devices[device.id][0]!r}; device ids are deployment-wide",
                    )
                )
            devices.setdefault(device.id, (account.id, device))
    _check_ipv6_overlaps(ipv6_claims, issues)
    for index, route in enumerate(routes):
        if route.account not in account_ids:
            issues.append(
                ValidationIssue(
                    f"private_routes[{route.id or index}].account",
                    f"unknown account {route.account!r}",
                )
            )
        if not route.networks and not route.hostnames:
            issues.append(
                ValidationIssue(
                    f"private_routes[{route.id or index}]", "a route needs at least one destination"
                )
            )
    connector_index = _check_connectors(connectors, account_ids, issues)
    if issues:
        raise ValidationError(issues)

    forbidden: CidrTable[str] = CidrTable()
    for cidr, reason in ALWAYS_FORBIDDEN:
        forbidden.add(ipaddress.ip_network(cidr), reason)
    infrastructure: CidrTable[str] = CidrTable()
    for dc in dcs.values():
        if dc.backbone_address is not None:
            infrastructure.add(
                ipaddress.ip_network(dc.backbone_address), f"the backbone address of PoP {dc.code}"
            )
        for address in dc.shared_ipv4:
            infrastructure.add(ipaddress.ip_network(address), f"a shared address of PoP {dc.code}")
        if dc.shared_ipv6 is not None:
            infrastructure.add(dc.shared_ipv6, f"in the shared IPv6 range of PoP {dc.code}")
    for address, owner in ipv4_owner.items():
        infrastructure.add(
            ipaddress.ip_network(address), f"a dedicated egress address of account {owner}"
        )
    for prefix, owner, _path in ipv6_claims:
        infrastructure.add(prefix, f"in a dedicated or shared egress range ({owner})")
    for network in settings.control_addresses:
        infrastructure.add(network, "a control-plane address")
    allowed: CidrTable[bool] = CidrTable()
    for network in settings.allow_destinations:
        allowed.add(network, True)
    origin_cidrs: CidrTable[InNetworkOrigin] = CidrTable()
    origin_hosts: HostTable[InNetworkOrigin] = HostTable()
    for origin in origins:
        for network in origin.networks:
            origin_cidrs.add(network, origin)
        for pattern in origin.hostnames:
            origin_hosts.add(pattern, origin)
    routes_by_account: dict[str, list[PrivateRoute]] = {}
    private_cidrs: CidrTable[PrivateRoute] = CidrTable()
    for route in routes:
        routes_by_account.setdefault(route.account, []).append(route)
        for network in route.networks:
            private_cidrs.add(network, route)
    indexed = {
        account.id: _index_account(account, dcs, routes_by_account.get(account.id, ()))
        for account in accounts
    }
    return Snapshot(
        version=version,
        data_centers=dcs,
        accounts=indexed,
        devices=devices,
        origins=tuple(origins),
        routes=tuple(routes),
        quarantine=tuple(quarantine),
        settings=settings,
        ipv4_owner=ipv4_owner,
        ipv6_owner=ipv6_owner,
        shared_addresses=frozenset(shared),
        forbidden=forbidden,
        infrastructure=infrastructure,
        allowed=allowed,
        origin_cidrs=origin_cidrs,
        origin_hosts=origin_hosts,
        private_cidrs=private_cidrs,
        connectors=connector_index,
    )


def _check_connectors(connectors: Sequence[Connector], account_ids: set[str],
                      issues: list[ValidationIssue]) -> dict[str, Connector]:
    index: dict[str, Connector] = {}
    for connector in connectors:
        where = f"accounts[{connector.account}].connectors[{connector.id}]"
        if connector.account not in account_ids:
            issues.append(ValidationIssue(f"{where}.account", f"unknown account {connector.account!r}"))
        if not _is_sha256_hex(connector.token_sha256):
            issues.append(ValidationIssue(f"{where}.token_sha256", "must be 64 hex digits"))
        previous = index.get(connector.id)
        if previous is not None:
            issues.append(ValidationIssue(
                where, f"connector id already used by account {previous.account!r}; "
                       "connector ids are deployment-wide"))
            continue
        index[connector.id] = connector
    return index


def _check_ipv6_overlaps(
    claims: list[tuple[ipaddress.IPv6Network, str, str]], issues: list[ValidationIssue]
) -> None:
    """R2: IPv6 ranges have one owner. Prefixes nest or are disjoint, so one sorted sweep finds
    every overlap in O(n log n) instead of comparing all pairs."""
    ordered = sorted(claims, key=lambda claim: (int(claim[0].network_address), claim[0].prefixlen))
    widest: tuple[ipaddress.IPv6Network, str, str] | None = None
    for claim in ordered:
        prefix = claim[0]
        if widest is not None and int(prefix.network_address) <= int(widest[0].broadcast_address):
            # Report on a location when one is involved: that is what an operator edits.
            here, other = (
                (claim, widest)
                if claim[2].startswith("accounts") or not widest[2].startswith("accounts")
                else (widest, claim)
            )
            issues.append(
                ValidationIssue(here[2], f"{here[0]} overlaps {other[0]} of {other[1]}", "R2")
            )
            if int(prefix.broadcast_address) <= int(widest[0].broadcast_address):
                continue
        widest = claim


def _shared_addresses(dcs: Iterable[DataCenter]) -> set[IPAddress]:
    return {address for dc in dcs for address in dc.shared_ipv4}


def _check_data_centers(
    data_centers: Sequence[DataCenter], issues: list[ValidationIssue]
) -> dict[str, DataCenter]:
    dcs: dict[str, DataCenter] = {}
    slots: dict[int, str] = {}
    seen_v4: dict[IPAddress, str] = {}
    for dc in data_centers:
        where = f"data_centers[{dc.code}]"
        if not dc.code:
            issues.append(ValidationIssue(where, "a data center needs a code"))
        if dc.code in dcs:
            issues.append(ValidationIssue(where, "duplicate data center code"))
        if dc.slot in slots:
            issues.append(
                ValidationIssue(
                    f"{where}.slot", f"slot {dc.slot} is also used by {slots[dc.slot]!r}"
                )
            )
        if not 0 <= dc.slot < (1 << IPV6_SUBRANGE_BITS):
            issues.append(
                ValidationIssue(
                    f"{where}.slot", f"slot must be in 0..{(1 << IPV6_SUBRANGE_BITS) - 1}"
                )
            )
        if not -90 <= dc.latitude <= 90 or not -180 <= dc.longitude <= 180:
            issues.append(ValidationIssue(where, "coordinates out of range"))
        # The city goes into the geofeed (R10): one line per prefix, no room for more.
        if dc.city != dc.city.strip() or any(not char.isprintable() for char in dc.city):
            issues.append(ValidationIssue(f"{where}.city", "a city name is printable text "
                                          "without control characters or surrounding spaces",
                                          "R10"))
        if not re.fullmatch(r"[A-Z]{2}", dc.country):
            issues.append(ValidationIssue(f"{where}.country", "expected an ISO 3166-1 "
                                          "alpha-2 code like US", "R10"))
        if dc.region and not re.fullmatch(rf"{re.escape(dc.country)}-[A-Z0-9]{{1,3}}", dc.region):
            issues.append(ValidationIssue(f"{where}.region", f"expected an ISO 3166-2 code "
                                          f"of {dc.country}, like {dc.country}-CA", "R10"))
        if not dc.shared_ipv4:
            issues.append(
                ValidationIssue(
                    f"{where}.shared_ipv4", "a PoP needs at least one shared IPv4 address", "R1"
                )
            )
        for address in dc.shared_ipv4:
            if address in seen_v4:
                issues.append(
                    ValidationIssue(
                        f"{where}.shared_ipv4",
                        f"{address} is also a shared address of {seen_v4[address]!r}",
                    )
                )
            seen_v4[address] = dc.code
        slots.setdefault(dc.slot, dc.code)
        dcs.setdefault(dc.code, dc)
    return dcs


def _check_account(
    account: Account, dcs: Mapping[str, DataCenter], issues: list[ValidationIssue]
) -> None:
    where = f"accounts[{account.id}]"
    if account.settings.proxy_udp and not account.settings.proxy_tcp:
        issues.append(
            ValidationIssue(f"{where}.network.proxy_udp", "proxy.udp requires proxy.tcp", "R3")
        )
    if account.locations and account.plan is not Plan.ENTERPRISE:
        issues.append(
            ValidationIssue(
                f"{where}.locations",
                f"dedicated egress is enterprise-only; plan is {account.plan.value!r}",
                "R2",
            )
        )
    location_ids: set[str] = set()
    for loc in account.locations:
        lwhere = f"{where}.locations[{loc.id}]"
        if loc.id in location_ids:
            issues.append(ValidationIssue(lwhere, "duplicate location id"))
        location_ids.add(loc.id)
        if loc.home_pop not in dcs:
            issues.append(ValidationIssue(f"{lwhere}.pop", f"unknown data center {loc.home_pop!r}"))
        if loc.ipv6 is not None and loc.ipv6.prefixlen > MAX_LOCATION_IPV6_PREFIXLEN:
            issues.append(
                ValidationIssue(
                    f"{lwhere}.ipv6",
                    f"an IPv6 location range must be /{MAX_LOCATION_IPV6_PREFIXLEN} or larger, to hold a /{loc.ipv6.prefixlen + IPV6_SUBRANGE_BITS} per PoP",
                    "R9",
                )
            )
    users = {user.name for user in account.users}
    if len(users) != len(account.users):
        issues.append(ValidationIssue(f"{where}.users", "duplicate user name"))
    device_ids = {device.id for device in account.devices}
    for device in account.devices:
        if device.user not in users:
            issues.append(
                ValidationIssue(
                    f"{where}.devices[{device.id}].user", f"unknown user {device.user!r}"
                )
            )
        if len(device.secret_sha256) != 64:
            issues.append(
                ValidationIssue(
                    f"{where}.devices[{device.id}]", "secret_sha256 must be 64 hex digits"
                )
            )
    policy_ids: set[str] = set()
    for policy in account.policies:
        pwhere = f"{where}.policies[{policy.id}]"
        if policy.id in policy_ids:
            issues.append(ValidationIssue(pwhere, "duplicate policy id"))
        policy_ids.add(policy.id)
        selector = policy.selector
        for name in sorted(selector.users - users):
            issues.append(ValidationIssue(f"{pwhere}.users", f"unknown user {name!r}"))
        for name in sorted(selector.devices - device_ids):
            issues.append(ValidationIssue(f"{pwhere}.devices", f"unknown device {name!r}"))
        for name in sorted(selector.connected_pops - dcs.keys()):
            issues.append(
                ValidationIssue(f"{pwhere}.connected_pops", f"unknown data center {name!r}")
            )
        if "dns" in selector.protocols:
            issues.append(
                ValidationIssue(
                    f"{pwhere}.protocols",
                    "DNS queries resolved by the gateway always use shared addresses (R4); a policy cannot select them",
                    "R4",
                )
            )
        for name in sorted(selector.protocols - PROTOCOLS):
            issues.append(
                ValidationIssue(f"{pwhere}.protocols", f"unknown protocol {name!r} (tcp, udp, dns)")
            )
        for low, high in selector.ports:
            if not 1 <= low <= high <= 65535:
                issues.append(
                    ValidationIssue(
                        f"{pwhere}.ports",
                        f"bad port range {low}-{high}: need 1 <= low <= high <= 65535",
                    )
                )
        if isinstance(policy.action, DedicatedAction):
            _check_dedicated_action(account, policy.action, pwhere, issues)


def _is_sha256_hex(text: str) -> bool:
    return len(text) == 64 and all(char in "0123456789abcdef" for char in text)


def _check_dedicated_action(
    account: Account, action: DedicatedAction, where: str, issues: list[ValidationIssue]
) -> None:
    own = {loc.id: loc for loc in account.locations}
    if account.plan is not Plan.ENTERPRISE:
        issues.append(
            ValidationIssue(f"{where}.action", "action 'dedicated' needs an enterprise plan", "R2")
        )
    if action.primary not in own:
        issues.append(
            ValidationIssue(
                f"{where}.primary", f"{action.primary!r} is not a location of this account", "R6"
            )
        )
    if action.secondary != SHARED_SECONDARY:
        if action.secondary not in own:
            issues.append(
                ValidationIssue(
                    f"{where}.secondary",
                    f"{action.secondary!r} is not a location of this account (or 'shared')",
                    "R6",
                )
            )
        elif action.secondary == action.primary:
            issues.append(
                ValidationIssue(
                    f"{where}.secondary", "the secondary must differ from the primary", "R6"
                )
            )
    v6 = own.get(action.ipv6)
    if v6 is None:
        issues.append(
            ValidationIssue(
                f"{where}.ipv6", f"{action.ipv6!r} is not a location of this account", "R6"
            )
        )
    elif v6.ipv6 is None:
        issues.append(
            ValidationIssue(f"{where}.ipv6", f"location {action.ipv6!r} has no IPv6 range", "R9")
        )


def _check_quarantine(
    loc: DedicatedLocation,
    account_id: str,
    quarantine: Sequence[Quarantine],
    now: datetime | None,
    where: str,
    issues: list[ValidationIssue],
) -> None:
    if now is None:
        return
    for entry in quarantine:
        if entry.released_by == account_id or now >= entry.until:
            continue
        hit = (
            loc.ipv4 in entry.address
            if isinstance(entry.address, ipaddress.IPv4Network)
            else loc.ipv4 == entry.address
        )
        if not hit and loc.ipv6 is not None:
            hit = (
                isinstance(entry.address, ipaddress.IPv6Network)
                and entry.address.overlaps(loc.ipv6)
            ) or (isinstance(entry.address, ipaddress.IPv6Address) and entry.address in loc.ipv6)
        if hit:
            issues.append(
                ValidationIssue(
                    where,
                    f"{entry.address} was released by account {entry.released_by!r} and is quarantined until {entry.until.isoformat()}",
                    "R2",
                )
            )


def _index_account(
    account: Account, dcs: Mapping[str, DataCenter], routes: Iterable[PrivateRoute]
) -> AccountIndex:
    route_cidrs: CidrTable[PrivateRoute] = CidrTable()
    route_hosts: HostTable[PrivateRoute] = HostTable()
    for route in routes:
        for network in route.networks:
            route_cidrs.add(network, route)
        for pattern in route.hostnames:
            route_hosts.add(normalise_hostname(pattern), route)
    groups_of = {user.name: user.groups for user in account.users}
    active = tuple(
        loc
        for loc in account.active_locations()
        if loc.home_pop in dcs and account.plan is Plan.ENTERPRISE
    )
    return AccountIndex(
        account=account,
        dedicated_active=dedicated_is_active(account, dcs),
        locations={loc.id: loc for loc in account.locations},
        active_locations=active,
        policies=PolicyIndex(account.policies, groups_of),
        route_cidrs=route_cidrs,
        route_hosts=route_hosts,
        proxy_tcp=account.settings.proxy_tcp,
        proxy_udp=account.settings.proxy_udp,
        has_route_cidrs=bool(route_cidrs),
        has_route_hosts=bool(route_hosts),
    )


__all__ = [
    "AccountIndex",
    "DeploymentSettings",
    "LocationState",
    "Quarantine",
    "Snapshot",
    "build_snapshot",
    "dedicated_is_active",
]
