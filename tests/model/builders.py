"""A small world of documentation addresses for the model and decision tests.

PoPs (all US, so two different cities means two different city names):

    las  Las Vegas    slot 1  shared 198.51.100.10, .11  2001:db8:10::/48  backbone 203.0.113.1
    lax  Los Angeles  slot 2  shared 198.51.100.20       2001:db8:20::/48  backbone 203.0.113.2
    jfk  New York     slot 3  shared 198.51.100.30       2001:db8:30::/48  backbone 203.0.113.3
    bur  Los Angeles  slot 4  shared 198.51.100.40       2001:db8:40::/48  backbone 203.0.113.4
    ord  Chicago      slot 5  shared 198.51.100.45       (no shared IPv6)  backbone 203.0.113.5

Dedicated locations: acme owns 198.51.100.50/.55/.60/.65 and 2001:db8:100/500/200/600::/48,
initech owns 198.51.100.70/.80 and 2001:db8:300/400::/48. Ordinary destinations are
192.0.2.0/24 and 2001:db8:ffff::/48; the in-network origin is 203.0.113.128/25.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from egressd.decide import Flow, HealthView
from egressd.model import (
    Account,
    DataCenter,
    DedicatedAction,
    DedicatedLocation,
    Device,
    EgressPolicy,
    InNetworkOrigin,
    LocationState,
    NetworkSettings,
    Plan,
    PrivateRoute,
    Quarantine,
    RouteKind,
    Selector,
    SharedAction,
    Snapshot,
    User,
    build_snapshot,
)
from egressd.model.errors import ValidationError, ValidationIssue
from egressd.model.snapshot import DeploymentSettings

SECRET = "0" * 64
DEST4 = "192.0.2.10"
DEST6 = "2001:db8:ffff::10"


def addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def data_center(
    code: str,
    city: str,
    slot: int,
    shared_ipv4: Sequence[str],
    shared_ipv6: str | None,
    backbone: str | None,
    *,
    country: str = "US",
    latitude: float = 0.0,
    longitude: float = 0.0,
) -> DataCenter:
    return DataCenter(
        code=code,
        city=city,
        country=country,
        region="",
        latitude=latitude,
        longitude=longitude,
        shared_ipv4=tuple(ipaddress.IPv4Address(a) for a in shared_ipv4),
        shared_ipv6=ipaddress.IPv6Network(shared_ipv6) if shared_ipv6 else None,
        backbone_address=ipaddress.ip_address(backbone) if backbone else None,
        slot=slot,
    )


LAS = data_center(
    "las", "Las Vegas", 1, ["198.51.100.10", "198.51.100.11"], "2001:db8:10::/48", "203.0.113.1"
)
LAX = data_center("lax", "Los Angeles", 2, ["198.51.100.20"], "2001:db8:20::/48", "203.0.113.2")
JFK = data_center("jfk", "New York", 3, ["198.51.100.30"], "2001:db8:30::/48", "203.0.113.3")
BUR = data_center("bur", "Los Angeles", 4, ["198.51.100.40"], "2001:db8:40::/48", "203.0.113.4")
ORD = data_center("ord", "Chicago", 5, ["198.51.100.45"], None, "203.0.113.5")
DATA_CENTERS: tuple[DataCenter, ...] = (LAS, LAX, JFK, BUR, ORD)
DC = {dc.code: dc for dc in DATA_CENTERS}

# Symmetric backbone RTTs (ms). From las: lax 8 < bur 9 < ord 45 < jfk 60.
_RTT_PAIRS = {
    ("las", "lax"): 8.0,
    ("las", "bur"): 9.0,
    ("las", "jfk"): 60.0,
    ("las", "ord"): 45.0,
    ("lax", "bur"): 1.0,
    ("lax", "jfk"): 62.0,
    ("lax", "ord"): 40.0,
    ("jfk", "bur"): 63.0,
    ("jfk", "ord"): 18.0,
    ("bur", "ord"): 41.0,
}
RTT: dict[tuple[str, str], float] = {}
for (_a, _b), _ms in _RTT_PAIRS.items():
    RTT[(_a, _b)] = _ms
    RTT[(_b, _a)] = _ms


def view(
    *, down: Iterable[str] = (), rtt: Mapping[tuple[str, str], float] | None = None
) -> HealthView:
    """Every PoP up except `down`; RTTs default to the table above."""
    down = set(down)
    return HealthView(
        up=frozenset(code for code in DC if code not in down),
        rtt_ms=dict(RTT if rtt is None else rtt),
    )


ALL_UP = view()


def location(
    id: str,
    pop: str,
    ipv4: str,
    ipv6: str | None = None,
    state: LocationState = LocationState.ACTIVE,
) -> DedicatedLocation:
    return DedicatedLocation(
        id=id,
        home_pop=pop,
        ipv4=ipaddress.IPv4Address(ipv4),
        ipv6=ipaddress.IPv6Network(ipv6) if ipv6 else None,
        state=state,
    )


ACME_LAX = location("acme-lax", "lax", "198.51.100.50", "2001:db8:100::/48")
ACME_BUR = location("acme-bur", "bur", "198.51.100.55", "2001:db8:500::/48")
ACME_JFK = location("acme-jfk", "jfk", "198.51.100.60", "2001:db8:200::/48")
ACME_LAS = location("acme-las", "las", "198.51.100.65", "2001:db8:600::/48")
INI_LAX = location("ini-lax", "lax", "198.51.100.70", "2001:db8:300::/48")
INI_JFK = location("ini-jfk", "jfk", "198.51.100.80", "2001:db8:400::/48")

USERS = (
    User("alice", frozenset({"engineering"})),
    User("bob", frozenset({"finance"})),
    User("carol", frozenset()),
    User("dave", frozenset({"engineering", "finance"})),
)


def devices_for(account_id: str) -> tuple[Device, ...]:
    """Device ids are deployment-wide: `<account>:<user>-laptop`, plus bob's phone."""
    devices = [Device(f"{account_id}:{user.name}-laptop", user.name, SECRET) for user in USERS]
    devices.append(Device(f"{account_id}:bob-phone", "bob", SECRET))
    return tuple(devices)


def policy(
    id: str,
    action: SharedAction | DedicatedAction,
    *,
    users: Iterable[str] = (),
    groups: Iterable[str] = (),
    devices: Iterable[str] = (),
    destinations: Iterable[str] = (),
    ports: Iterable[tuple[int, int]] = (),
    protocols: Iterable[str] = (),
    connected_pops: Iterable[str] = (),
) -> EgressPolicy:
    """A policy; `destinations` mixes CIDRs ("192.0.2.0/25") and hostname patterns."""
    destinations = list(destinations)
    selector = Selector(
        users=frozenset(users),
        groups=frozenset(groups),
        devices=frozenset(devices),
        networks=tuple(net(d) for d in destinations if "/" in d),
        hostnames=tuple(d for d in destinations if "/" not in d),
        ports=tuple(ports),
        protocols=frozenset(protocols),
        connected_pops=frozenset(connected_pops),
    )
    return EgressPolicy(id=id, selector=selector, action=action)


def dedicated(primary: str, secondary: str, ipv6: str | None = None) -> DedicatedAction:
    return DedicatedAction(primary=primary, secondary=secondary, ipv6=ipv6 or primary)


SHARED = SharedAction()


def enterprise(
    id: str = "acme",
    locations: Sequence[DedicatedLocation] = (ACME_LAX, ACME_JFK),
    policies: Sequence[EgressPolicy] = (),
    settings: NetworkSettings | None = None,
) -> Account:
    return Account(
        id=id,
        name=id.title(),
        plan=Plan.ENTERPRISE,
        settings=settings or NetworkSettings(),
        locations=tuple(locations),
        users=USERS,
        devices=devices_for(id),
        policies=tuple(policies),
    )


def free(
    id: str = "globex",
    policies: Sequence[EgressPolicy] = (),
    settings: NetworkSettings | None = None,
) -> Account:
    return Account(
        id=id,
        name=id.title(),
        plan=Plan.FREE,
        settings=settings or NetworkSettings(),
        users=USERS,
        devices=devices_for(id),
        policies=tuple(policies),
    )


CDN = InNetworkOrigin(name="cdn", networks=(net("203.0.113.128/25"),), hostnames=("*.cdn.example",))


def route(
    id: str,
    account: str,
    destinations: Sequence[str],
    via: str = "office-connector",
    kind: RouteKind = RouteKind.TUNNEL,
) -> PrivateRoute:
    return PrivateRoute(
        id=id,
        account=account,
        kind=kind,
        networks=tuple(net(d) for d in destinations if "/" in d),
        hostnames=tuple(d for d in destinations if "/" not in d),
        via=via,
    )


def snapshot(
    *accounts: Account,
    data_centers: Sequence[DataCenter] = DATA_CENTERS,
    routes: Sequence[PrivateRoute] = (),
    origins: Sequence[InNetworkOrigin] = (),
    quarantine: Sequence[Quarantine] = (),
    settings: DeploymentSettings | None = None,
    now: datetime | None = None,
    version: int = 1,
) -> Snapshot:
    return build_snapshot(
        version=version,
        data_centers=data_centers,
        accounts=accounts,
        routes=routes,
        origins=origins,
        quarantine=quarantine,
        settings=settings or DeploymentSettings(),
        now=now,
    )


def flow(
    account: str | None = "acme",
    dst: str = DEST4,
    *,
    user: str = "alice",
    device: str | None = None,
    pop: str = "las",
    protocol: str = "tcp",
    port: int = 443,
    hostname: str | None = None,
) -> Flow:
    return Flow(
        account=account,
        user=user,
        device=device if device is not None else f"{account}:{user}-laptop",
        connected_pop=pop,
        protocol=protocol,
        address=addr(dst),
        port=port,
        hostname=hostname,
    )


def validation_issues(error: BaseException) -> tuple[ValidationIssue, ...]:
    assert isinstance(error, ValidationError)
    return error.issues


def find_issue(
    issues: Iterable[ValidationIssue], path: str, rule: str | None = None
) -> ValidationIssue:
    """The issue at exactly `path` (and with `rule`, if given); fails listing all issues."""
    issues = tuple(issues)
    for issue in issues:
        if issue.path == path and (rule is None or issue.rule == rule):
            return issue
    raise AssertionError(f"no issue at {path!r} rule {rule!r}; got: {[str(i) for i in issues]}")


def shared_sources(dc: DataCenter) -> set[ipaddress.IPv4Address]:
    return set(dc.shared_ipv4)
