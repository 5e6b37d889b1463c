"""Properties of the decision over random deployments, flows and health views (hypothesis).

A world is 2-5 PoPs, 1-4 accounts with random plans, locations (homes, states, IPv6 or not),
settings and policies, some private routes and an in-network origin. Flows pick a random
account (or none, or an unknown one), user, device, PoP, protocol, destination (ordinary,
in-network, routed, or one of the deployment's own addresses), hostname and port.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd.decide import Decision, Egress, Flow, HealthView, Path, decide
from egressd.model import (
    Account,
    DataCenter,
    DedicatedAction,
    DedicatedLocation,
    EgressPolicy,
    Fallback,
    InNetworkOrigin,
    LocationState,
    NetworkSettings,
    Plan,
    PrivateRoute,
    RouteKind,
    Selector,
    SharedAction,
    Snapshot,
    ValidationError,
    build_snapshot,
)
from egressd.model.snapshot import DeploymentSettings

from .builders import CDN, DATA_CENTERS, USERS, devices_for, net

T = TypeVar("T")

FAST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HOSTNAMES = [
    "www.example.com",
    "api.partner.example",
    "partner.example",
    "a.b.partner.example",
    "wiki.corp.example",
    "img.cdn.example",
    "dl.updates.example",
]
SELECTOR_NETWORKS = ("192.0.2.0/24", "192.0.2.0/26", "203.0.113.128/25", "2001:db8:ffff::/48")
SELECTOR_HOSTS = ("*.partner.example", "partner.example", "*.updates.example", "img.cdn.example")
PORTS = (1, 2, 22, 53, 80, 443, 8443, 65534, 65535)
USER_NAMES = tuple(user.name for user in USERS)


@dataclass(frozen=True)
class World:
    data_centers: tuple[DataCenter, ...]
    accounts: tuple[Account, ...]
    routes: tuple[PrivateRoute, ...]
    origins: tuple[InNetworkOrigin, ...]
    settings: DeploymentSettings

    def build(self, version: int = 1) -> Snapshot:
        return build_snapshot(
            version=version,
            data_centers=self.data_centers,
            accounts=self.accounts,
            routes=self.routes,
            origins=self.origins,
            settings=self.settings,
        )

    @property
    def codes(self) -> list[str]:
        return [dc.code for dc in self.data_centers]


# Strategy building is the slow part of these tests: draw indexes and bit masks from
# cached integer strategies instead of building a new sampled_from per draw.


def pick(draw: st.DrawFn, options: Sequence[T]) -> T:
    return options[draw(st.integers(0, len(options) - 1))]


def constrained(draw: st.DrawFn) -> bool:
    """Whether a selector field is set: rarely, so that policies match often enough."""
    return draw(st.integers(0, 4)) == 4


def subset(draw: st.DrawFn, options: Sequence[T], max_size: int = 2) -> frozenset[T]:
    """Usually empty, else 1..max_size items (shrinks towards the empty set)."""
    if not constrained(draw):
        return frozenset()
    size = draw(st.integers(1, min(max_size, len(options))))
    return frozenset(pick(draw, options) for _ in range(size))


def sequence(draw: st.DrawFn, options: Sequence[T], max_size: int = 2) -> tuple[T, ...]:
    if not constrained(draw):
        return ()
    return tuple(pick(draw, options) for _ in range(draw(st.integers(1, max_size))))


GROUPS = ("engineering", "finance", "legal")
POLICY_PROTOCOLS = ("tcp", "udp")  # "dns" never reaches the policies (R4) and is rejected
STATES = (LocationState.ACTIVE,) * 6 + (LocationState.PENDING, LocationState.QUARANTINED)
RTTS = (None, 1.0, 5.0, 5.0, 5.0, 20.0, 60.0)


def draw_selector(draw: st.DrawFn, codes: Sequence[str], device_ids: Sequence[str]) -> Selector:
    ports = tuple(
        (min(a, b), max(a, b))
        for a, b in ((pick(draw, PORTS), pick(draw, PORTS)) for _ in range(draw(st.integers(0, 2))))
        if constrained(draw)
    )
    return Selector(
        users=subset(draw, USER_NAMES),
        groups=subset(draw, GROUPS),
        devices=subset(draw, device_ids, max_size=1),
        networks=tuple(net(n) for n in sequence(draw, SELECTOR_NETWORKS)),
        hostnames=sequence(draw, SELECTOR_HOSTS),
        ports=ports,
        protocols=subset(draw, POLICY_PROTOCOLS),
        connected_pops=subset(draw, codes),
    )


def draw_account(draw: st.DrawFn, index: int, codes: Sequence[str]) -> Account:
    account_id = f"a{index}"
    plan = pick(draw, (Plan.ENTERPRISE, Plan.ENTERPRISE, Plan.ENTERPRISE, Plan.FREE))
    proxy_tcp = pick(draw, (True,) * 7 + (False,))
    proxy_udp = proxy_tcp and pick(draw, (True, True, True, False))
    fallback = pick(draw, (Fallback.CLOSED, Fallback.SHARED))
    locations: list[DedicatedLocation] = []
    if plan is Plan.ENTERPRISE:
        for j in range(pick(draw, (2, 3, 4, 0, 1))):
            has_v6 = pick(draw, (True, True, True, False))
            locations.append(
                DedicatedLocation(
                    id=f"{account_id}-l{j}",
                    home_pop=pick(draw, codes),
                    ipv4=ipaddress.IPv4Address(f"198.51.100.{100 + 10 * index + j}"),
                    ipv6=ipaddress.IPv6Network(f"2001:db8:{0x1000 + 16 * index + j:x}::/48")
                    if has_v6
                    else None,
                    state=pick(draw, STATES),
                )
            )
    device_ids = [device.id for device in devices_for(account_id)]
    ids = [loc.id for loc in locations]
    with_v6 = [loc.id for loc in locations if loc.ipv6 is not None]
    policies: list[EgressPolicy] = []
    for k in range(draw(st.integers(0, 4))):
        selector = draw_selector(draw, codes, device_ids)
        action: SharedAction | DedicatedAction = SharedAction()
        if with_v6 and draw(st.integers(0, 2)):
            primary = pick(draw, ids)
            secondary = pick(draw, ["shared", *[i for i in ids if i != primary]])
            action = DedicatedAction(primary=primary, secondary=secondary, ipv6=pick(draw, with_v6))
        policies.append(EgressPolicy(id=f"{account_id}-p{k}", selector=selector, action=action))
    return Account(
        id=account_id,
        name=account_id,
        plan=plan,
        settings=NetworkSettings(proxy_tcp=proxy_tcp, proxy_udp=proxy_udp, fallback=fallback),
        locations=tuple(locations),
        users=USERS,
        devices=devices_for(account_id),
        policies=tuple(policies),
    )


@st.composite
def worlds(draw: st.DrawFn) -> World:
    pool = list(DATA_CENTERS)
    dcs = []
    for _ in range(draw(st.integers(2, len(pool)))):
        dcs.append(pool.pop(draw(st.integers(0, len(pool) - 1))))
    codes = [dc.code for dc in dcs]
    account_list = [draw_account(draw, i, codes) for i in range(draw(st.integers(1, 4)))]
    routes = [
        PrivateRoute(
            id=f"{account.id}-office",
            account=account.id,
            kind=pick(draw, (RouteKind.TUNNEL, RouteKind.WAN)),
            networks=(net("192.0.2.192/27"),),
            hostnames=("*.corp.example",),
            via=f"{account.id}-connector",
        )
        for account in account_list
        if draw(st.booleans())
    ]
    origins = (CDN,) if draw(st.booleans()) else ()
    deployment = DeploymentSettings(
        control_addresses=(net("203.0.113.250/32"),) if draw(st.booleans()) else (),
        allow_destinations=(net("127.0.0.1/32"),) if draw(st.booleans()) else (),
    )
    return World(tuple(dcs), tuple(account_list), tuple(routes), origins, deployment)


def own_addresses(world: World) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The deployment's own addresses, and the usual SSRF targets."""
    own = [
        ipaddress.ip_address(a)
        for a in ("127.0.0.1", "::1", "169.254.169.254", "203.0.113.250", "ff02::1")
    ]
    for dc in world.data_centers:
        own += dc.shared_ipv4
        if dc.shared_ipv6 is not None:
            own.append(dc.shared_ipv6.network_address + 1)
        if dc.backbone_address is not None:
            own.append(dc.backbone_address)
    for account in world.accounts:
        for loc in account.locations:
            own.append(loc.ipv4)
            if loc.ipv6 is not None:
                own.append(loc.ipv6.network_address + 7)
    return own


def draw_destination(
    draw: st.DrawFn, own: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    kind = draw(st.integers(0, 7))
    if kind == 7:
        return pick(draw, own)
    if kind == 6:
        return ipaddress.IPv4Address(f"203.0.113.{draw(st.integers(128, 255))}")
    if kind >= 3:
        return ipaddress.IPv4Address(f"192.0.2.{draw(st.integers(0, 255))}")
    return ipaddress.IPv6Address(f"2001:db8:ffff::{draw(st.integers(0, 2**16 - 1)):x}")


def draw_flow(
    draw: st.DrawFn, world: World, own: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> Flow:
    ids = [account.id for account in world.accounts]
    account = pick(draw, [*ids * 16, None, "ghost"])
    user = pick(draw, [*USER_NAMES, "stranger"])
    device = pick(draw, [f"{account}:{user}-laptop", f"{account}:bob-phone", "unknown-device"])
    pop = pick(draw, [*world.codes * 16, "xyz"])
    port = pick(draw, PORTS) if draw(st.booleans()) else draw(st.integers(1, 65535))
    return Flow(
        account=account,
        user=user,
        device=device,
        connected_pop=pop,
        protocol=pick(draw, ("tcp", "tcp", "tcp", "udp", "udp", "dns")),
        address=draw_destination(draw, own),
        port=port,
        hostname=pick(draw, [None, None, *HOSTNAMES]),
    )


def draw_view(draw: st.DrawFn, world: World) -> HealthView:
    codes = world.codes
    up = frozenset(code for code in codes if draw(st.integers(0, 5)))  # mostly up
    rtt = {}
    for a in codes:
        for b in codes:
            if a != b:
                value = pick(draw, RTTS)
                if value is not None:
                    rtt[(a, b)] = value
    return HealthView(up=up, rtt_ms=rtt)


@dataclass(frozen=True)
class Scenario:
    world: World
    snapshot: Snapshot
    cases: tuple[tuple[Flow, HealthView], ...]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    world = draw(worlds())
    snapshot = world.build()
    own = own_addresses(world)
    cases = tuple(
        (draw_flow(draw, world, own), draw_view(draw, world))
        for _ in range(draw(st.integers(1, 6)))
    )
    return Scenario(world, snapshot, cases)


def decisions(scenario: Scenario) -> list[tuple[Flow, HealthView, Decision]]:
    return [(f, v, decide(scenario.snapshot, f, v)) for f, v in scenario.cases]


def account_of(world: World, account_id: str | None) -> Account | None:
    return next((a for a in world.accounts if a.id == account_id), None)


def really_active(world: World, account: Account) -> bool:
    """R2, computed independently of the code under test."""
    cities = {
        (dc.city, dc.country)
        for loc in account.locations
        if loc.state is LocationState.ACTIVE
        for dc in world.data_centers
        if dc.code == loc.home_pop
    }
    return account.plan is Plan.ENTERPRISE and len(cities) >= 2


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@FAST
@given(scenarios())
def test_no_flow_ever_leaves_from_another_accounts_address(scenario: Scenario) -> None:
    snap = scenario.snapshot
    for flow, _, decision in decisions(scenario):
        for source in (decision.source_address, decision.proxy_v2_source):
            if source is not None:
                owner = snap.owner_of(source)
                assert owner is None or owner == flow.account, (flow, decision, owner)


@FAST
@given(scenarios())
def test_shared_and_dedicated_sources_are_what_they_say(scenario: Scenario) -> None:
    snap = scenario.snapshot
    for flow, _, decision in decisions(scenario):
        if decision.egress is Egress.SHARED:
            connected = snap.data_centers[flow.connected_pop]
            assert decision.egress_pop == flow.connected_pop
            assert snap.owner_of(decision.source_address) is None  # type: ignore[arg-type]
            if flow.address.version == 4:
                assert decision.source_address in connected.shared_ipv4
            else:
                assert connected.shared_ipv6 is not None
                assert decision.source_address in connected.shared_ipv6
        elif decision.egress is Egress.DEDICATED:
            assert decision.location is not None
            if decision.path is Path.IN_NETWORK:
                assert snap.owner_of(decision.proxy_v2_source) == flow.account  # type: ignore[arg-type]
            else:
                assert snap.owner_of(decision.source_address) == flow.account  # type: ignore[arg-type]


@FAST
@given(worlds(), st.data())
def test_a_shared_address_is_never_dedicated(world: World, data: st.DataObject) -> None:
    candidates = [
        (i, j) for i, account in enumerate(world.accounts) for j in range(len(account.locations))
    ]
    if not candidates:
        # Give the first account one location, made enterprise.
        first = dataclasses.replace(
            world.accounts[0],
            plan=Plan.ENTERPRISE,
            locations=(
                DedicatedLocation(
                    "l0", world.codes[0], ipaddress.IPv4Address("198.51.100.99"), None
                ),
            ),
            policies=(),
        )
        world = dataclasses.replace(world, accounts=(first, *world.accounts[1:]))
        candidates = [(0, 0)]
    i, j = data.draw(st.sampled_from(candidates))
    shared = data.draw(st.sampled_from([a for dc in world.data_centers for a in dc.shared_ipv4]))
    account = world.accounts[i]
    locations = list(account.locations)
    locations[j] = dataclasses.replace(locations[j], ipv4=shared)
    bad = dataclasses.replace(account, locations=tuple(locations))
    world = dataclasses.replace(
        world, accounts=(*world.accounts[:i], bad, *world.accounts[i + 1 :])
    )
    with pytest.raises(ValidationError) as excinfo:
        world.build()
    path = f"accounts[{account.id}].locations[{locations[j].id}].ipv4"
    assert any(issue.path == path and issue.rule == "R2" for issue in excinfo.value.issues), (
        excinfo.value.issues
    )


@FAST
@given(worlds(), st.data())
def test_a_shared_ipv6_range_is_never_dedicated(world: World, data: st.DataObject) -> None:
    with_shared_v6 = [dc for dc in world.data_centers if dc.shared_ipv6 is not None]
    candidates = [
        (i, j) for i, account in enumerate(world.accounts) for j in range(len(account.locations))
    ]
    if not with_shared_v6 or not candidates:
        return
    i, j = data.draw(st.sampled_from(candidates))
    prefix = data.draw(st.sampled_from(with_shared_v6)).shared_ipv6
    assert prefix is not None
    account = world.accounts[i]
    locations = list(account.locations)
    locations[j] = dataclasses.replace(locations[j], ipv6=prefix)
    bad = dataclasses.replace(account, locations=tuple(locations))
    world = dataclasses.replace(
        world, accounts=(*world.accounts[:i], bad, *world.accounts[i + 1 :])
    )
    with pytest.raises(ValidationError) as excinfo:
        world.build()
    assert any(issue.rule == "R2" for issue in excinfo.value.issues)


@FAST
@given(scenarios())
def test_a_refused_decision_never_carries_a_source(scenario: Scenario) -> None:
    for _, _, decision in decisions(scenario):
        if decision.refused:
            assert decision.egress is Egress.REFUSED
            assert decision.source_address is None
            assert decision.proxy_v2_source is None
            assert decision.egress_pop is None
            assert decision.reason
        else:
            assert decision.source_address is not None
            assert decision.egress_pop is not None


@FAST
@given(scenarios())
def test_r6_picks_a_location_with_the_minimum_rtt(scenario: Scenario) -> None:
    world, snap = scenario.world, scenario.snapshot
    for flow, health, decision in decisions(scenario):
        if decision.rule != "R6":
            continue
        account = account_of(world, flow.account)
        assert account is not None and really_active(world, account)
        ipv6 = flow.address.version == 6
        active = [loc for loc in account.locations if loc.state is LocationState.ACTIVE]
        if ipv6 or decision.path is Path.IN_NETWORK:
            # IPv6 (R9) and in-network IPv4 (R8) leave locally, so an unreachable home PoP is
            # a last resort only: R6 asks for the most performant *healthy* location first.
            candidates = [loc for loc in active if not ipv6 or loc.ipv6 is not None]
            reachable = [loc for loc in candidates if health.is_up(flow.connected_pop, loc.home_pop)]
            usable = reachable or candidates
        else:
            usable = [loc for loc in active if health.is_up(flow.connected_pop, loc.home_pop)]
        chosen = next(loc for loc in usable if loc.id == decision.location)
        best = min(health.rtt(flow.connected_pop, loc.home_pop) for loc in usable)
        assert health.rtt(flow.connected_pop, chosen.home_pop) == best
        assert decision.egress is Egress.DEDICATED
        assert snap.owner_of(chosen.ipv4) == flow.account


@FAST
@given(scenarios())
def test_decide_is_deterministic(scenario: Scenario) -> None:
    rebuilt = scenario.world.build(version=2)
    for flow, health, decision in decisions(scenario):
        assert decide(scenario.snapshot, flow, health) == decision
        copy_flow = dataclasses.replace(flow)
        copy_view = HealthView(up=frozenset(health.up), rtt_ms=dict(health.rtt_ms))
        assert decide(rebuilt, copy_flow, copy_view) == decision


@FAST
@given(scenarios())
def test_source_family_is_the_destination_family(scenario: Scenario) -> None:
    for flow, _, decision in decisions(scenario):
        for source in (decision.source_address, decision.proxy_v2_source):
            if source is not None:
                assert source.version == flow.address.version, (flow, decision)


@FAST
@given(scenarios())
def test_dedicated_only_for_accounts_with_active_dedicated_egress(scenario: Scenario) -> None:
    world = scenario.world
    for flow, _, decision in decisions(scenario):
        if decision.egress is not Egress.DEDICATED:
            continue
        account = account_of(world, flow.account)
        assert account is not None and really_active(world, account)
        assert flow.protocol != "dns"  # R4
        assert account.settings.proxy_tcp  # R3
        if flow.protocol == "udp":
            assert account.settings.proxy_udp
        used = next(loc for loc in account.locations if loc.id == decision.location)
        assert used.state is LocationState.ACTIVE  # R2: only confirmed addresses


@FAST
@given(scenarios())
def test_unauthenticated_and_forbidden_flows_are_refused(scenario: Scenario) -> None:
    snap = scenario.snapshot
    allowed = scenario.world.settings.allow_destinations
    forbidden = {
        *(a for dc in scenario.world.data_centers for a in dc.shared_ipv4),
        *(dc.backbone_address for dc in scenario.world.data_centers),
        *(loc.ipv4 for account in scenario.world.accounts for loc in account.locations),
        *(n.network_address for n in scenario.world.settings.control_addresses),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("ff02::1"),
    }
    for flow, _, decision in decisions(scenario):
        if (
            flow.account is None
            or flow.account not in snap.accounts
            or flow.connected_pop not in snap.data_centers
        ):
            assert decision.refused and decision.rule == "R13"
        elif flow.address in forbidden and not any(flow.address in n for n in allowed):
            assert decision.refused and decision.rule == "R13", (flow, decision)


@FAST
@given(scenarios())
def test_egress_pop_follows_the_path_rules(scenario: Scenario) -> None:
    snap = scenario.snapshot
    for flow, health, decision in decisions(scenario):
        if decision.egress is not Egress.DEDICATED:
            continue
        account = account_of(scenario.world, flow.account)
        assert account is not None
        loc = next(loc for loc in account.locations if loc.id == decision.location)
        home = snap.data_centers[loc.home_pop]
        assert decision.logical_city == home.city
        if flow.address.version == 6 or decision.path is Path.IN_NETWORK:  # R8, R9
            assert decision.egress_pop == flow.connected_pop
        else:  # R7
            assert decision.egress_pop == loc.home_pop
            assert decision.source_address == loc.ipv4
            assert health.is_up(flow.connected_pop, loc.home_pop)
            expected = Path.DIRECT if loc.home_pop == flow.connected_pop else Path.BACKBONE
            assert decision.path is expected
