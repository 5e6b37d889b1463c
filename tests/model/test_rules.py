"""DESIGN §2, rule by rule: each test fails if the code of its rule is broken.

Topology and addresses: see `builders.py`. From `las`, the backbone RTTs are
lax 8 ms < bur 9 ms < ord 45 ms < jfk 60 ms, so with no policy acme (acme-lax, acme-jfk)
leaves from acme-lax.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from datetime import UTC, datetime, timedelta

import pytest

from egressd.decide import Decision, Egress, Flow, Path, decide, ipv6_subrange
from egressd.model import (
    Fallback,
    LocationState,
    NetworkSettings,
    Quarantine,
    Snapshot,
    ValidationError,
)
from egressd.model.deployment import DeploymentError, load_deployment
from egressd.model.snapshot import DeploymentSettings

from .builders import (
    ACME_BUR,
    ACME_JFK,
    ACME_LAS,
    ACME_LAX,
    ALL_UP,
    CDN,
    DATA_CENTERS,
    DC,
    DEST4,
    DEST6,
    INI_JFK,
    INI_LAX,
    LAS,
    LAX,
    SHARED,
    addr,
    dedicated,
    enterprise,
    find_issue,
    flow,
    free,
    location,
    net,
    policy,
    route,
    snapshot,
    validation_issues,
    view,
)

UDP_ON = NetworkSettings(proxy_tcp=True, proxy_udp=True)
FALLBACK_SHARED = NetworkSettings(fallback=Fallback.SHARED)


def assert_shared_from(decision: Decision, pop: str, family: int = 4) -> None:
    """The flow leaves from a shared address of `pop`, physically at `pop`."""
    dc = DC[pop]
    assert decision.egress is Egress.SHARED, decision
    assert decision.egress_pop == pop
    assert decision.connected_pop == pop
    assert decision.location is None
    assert decision.proxy_v2_source is None
    source = decision.source_address
    assert source is not None and source.version == family
    if family == 4:
        assert source in dc.shared_ipv4
    else:
        assert dc.shared_ipv6 is not None and source in dc.shared_ipv6


def assert_refused(decision: Decision, rule: str) -> None:
    assert decision.egress is Egress.REFUSED, decision
    assert decision.refused
    assert decision.rule == rule, decision
    assert decision.source_address is None
    assert decision.egress_pop is None
    assert decision.proxy_v2_source is None
    assert decision.reason


# --------------------------------------------------------------------------------------------
# R1 shared by default
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pop", ["las", "lax", "jfk", "bur", "ord"])
def test_r1_free_account_leaves_from_connected_pops_shared_ipv4(pop: str) -> None:
    snap = snapshot(free("globex"))
    decision = decide(snap, flow("globex", pop=pop), ALL_UP)
    assert_shared_from(decision, pop)
    assert decision.rule == "R1"
    assert decision.path is Path.DIRECT
    assert decision.logical_city == DC[pop].city


@pytest.mark.parametrize("pop", ["las", "lax", "jfk", "bur"])
def test_r1_free_account_ipv6_flow_gets_connected_pops_shared_ipv6(pop: str) -> None:
    snap = snapshot(free("globex"))
    decision = decide(snap, flow("globex", DEST6, pop=pop), ALL_UP)
    assert_shared_from(decision, pop, family=6)
    assert decision.rule == "R1"


def test_r1_enterprise_without_locations_is_shared() -> None:
    snap = snapshot(enterprise("acme", locations=()))
    for dst, family in ((DEST4, 4), (DEST6, 6)):
        decision = decide(snap, flow("acme", dst), ALL_UP)
        assert_shared_from(decision, "las", family)
        assert decision.rule == "R1"


def test_r1_enterprise_with_only_pending_locations_is_shared() -> None:
    pending = [
        location("acme-lax", "lax", "198.51.100.50", "2001:db8:100::/48", LocationState.PENDING),
        location("acme-jfk", "jfk", "198.51.100.60", "2001:db8:200::/48", LocationState.PENDING),
    ]
    snap = snapshot(enterprise("acme", locations=pending))
    assert not snap.accounts["acme"].dedicated_active
    for dst, family in ((DEST4, 4), (DEST6, 6)):
        decision = decide(snap, flow("acme", dst), ALL_UP)
        assert_shared_from(decision, "las", family)
        assert decision.rule in {"R1", "R2"}


def test_r1_shared_address_is_shared_by_all_such_accounts() -> None:
    # lax has a single shared IPv4: every account without dedicated egress uses it.
    snap = snapshot(
        free("globex"),
        free("hooli"),
        enterprise("acme", locations=()),
        enterprise("initech", locations=(INI_LAX,)),  # one city only: not active
    )
    sources = set()
    for account in ("globex", "hooli", "acme", "initech"):
        for user in ("alice", "bob", "carol"):
            decision = decide(snap, flow(account, user=user, pop="lax"), ALL_UP)
            assert decision.egress is Egress.SHARED
            sources.add(decision.source_address)
    assert sources == {addr("198.51.100.20")}


def test_r1_shared_source_is_never_another_pops_shared_address() -> None:
    snap = snapshot(free("globex"), free("hooli"))
    for account in ("globex", "hooli"):
        for user in ("alice", "bob", "carol", "dave"):
            decision = decide(snap, flow(account, user=user, pop="las"), ALL_UP)
            assert decision.source_address in LAS.shared_ipv4


# --------------------------------------------------------------------------------------------
# R2 dedicated is enterprise-only and comes in two cities
# --------------------------------------------------------------------------------------------


def test_r2_locations_on_a_free_account_are_a_validation_error() -> None:
    account = dataclasses.replace(free("globex"), locations=(ACME_LAX, ACME_JFK))
    with pytest.raises(ValidationError) as excinfo:
        snapshot(account)
    issue = find_issue(validation_issues(excinfo.value), "accounts[globex].locations", "R2")
    assert "enterprise" in issue.message


def test_r2_dedicated_policy_on_a_free_account_is_a_validation_error() -> None:
    account = free("globex", policies=[policy("p", dedicated("x", "shared"))])
    with pytest.raises(ValidationError) as excinfo:
        snapshot(account)
    find_issue(validation_issues(excinfo.value), "accounts[globex].policies[p].action", "R2")


def test_r2_two_locations_in_two_cities_activate_dedicated_egress() -> None:
    snap = snapshot(enterprise("acme", locations=(ACME_LAX, ACME_JFK)))
    assert snap.accounts["acme"].dedicated_active
    decision = decide(snap, flow("acme"), ALL_UP)
    assert decision.egress is Egress.DEDICATED
    assert decision.source_address == ACME_LAX.ipv4


def test_r2_one_location_is_not_enough() -> None:
    snap = snapshot(enterprise("acme", locations=(ACME_LAX,)))
    assert not snap.accounts["acme"].dedicated_active
    decision = decide(snap, flow("acme"), ALL_UP)
    assert_shared_from(decision, "las")
    assert decision.rule == "R2"


def test_r2_two_locations_in_the_same_city_are_not_enough() -> None:
    # lax and bur are two PoPs in Los Angeles.
    assert LAX.city == DC["bur"].city
    snap = snapshot(enterprise("acme", locations=(ACME_LAX, ACME_BUR)))
    assert not snap.accounts["acme"].dedicated_active
    for pop in ("las", "lax", "bur"):
        decision = decide(snap, flow("acme", pop=pop), ALL_UP)
        assert_shared_from(decision, pop)
    # A third location in another city makes it active; any number more may be added.
    snap = snapshot(enterprise("acme", locations=(ACME_LAX, ACME_BUR, ACME_JFK)))
    assert snap.accounts["acme"].dedicated_active
    assert decide(snap, flow("acme"), ALL_UP).egress is Egress.DEDICATED


def test_r2_many_locations_may_be_added() -> None:
    snap = snapshot(enterprise("acme", locations=(ACME_LAX, ACME_BUR, ACME_JFK, ACME_LAS)))
    assert snap.accounts["acme"].dedicated_active
    # From las the acme-las location (RTT 0) is the most performant.
    assert decide(snap, flow("acme"), ALL_UP).location == "acme-las"


@pytest.mark.parametrize("state", [LocationState.PENDING, LocationState.QUARANTINED])
def test_r2_a_location_not_active_does_not_count_towards_two_cities(state: LocationState) -> None:
    jfk = location("acme-jfk", "jfk", "198.51.100.60", "2001:db8:200::/48", state)
    snap = snapshot(enterprise("acme", locations=(ACME_LAX, jfk)))
    assert not snap.accounts["acme"].dedicated_active
    decision = decide(snap, flow("acme"), ALL_UP)
    assert_shared_from(decision, "las")
    assert decision.rule == "R2"


@pytest.mark.parametrize("state", [LocationState.PENDING, LocationState.QUARANTINED])
@pytest.mark.parametrize("dst", [DEST4, DEST6])
def test_r2_a_location_not_active_is_never_used(state: LocationState, dst: str) -> None:
    # acme-las would be the most performant from las (RTT 0), but it is not confirmed.
    las = location("acme-las", "las", "198.51.100.65", "2001:db8:600::/48", state)
    snap = snapshot(enterprise("acme", locations=(ACME_LAX, ACME_JFK, las)))
    for user in ("alice", "bob", "carol", "dave"):
        decision = decide(snap, flow("acme", dst, user=user), ALL_UP)
        assert decision.egress is Egress.DEDICATED
        assert decision.location == "acme-lax"
        assert decision.source_address != las.ipv4
        assert las.ipv6 is not None and decision.source_address not in las.ipv6


def test_r2_a_policy_naming_a_pending_primary_uses_the_secondary() -> None:
    jfk = location("acme-jfk", "jfk", "198.51.100.60", "2001:db8:200::/48", LocationState.PENDING)
    p = policy("p", dedicated("acme-jfk", "acme-bur", "acme-lax"))
    snap = snapshot(enterprise("acme", locations=(ACME_LAX, ACME_BUR, ACME_LAS, jfk), policies=[p]))
    decision = decide(snap, flow("acme"), ALL_UP)
    assert decision.location == "acme-bur"
    assert decision.source_address == ACME_BUR.ipv4


def test_r2_an_ipv4_address_has_one_owner() -> None:
    stolen = location("ini-lax", "lax", str(ACME_LAX.ipv4), "2001:db8:300::/48")
    with pytest.raises(ValidationError) as excinfo:
        snapshot(enterprise("acme"), enterprise("initech", locations=(stolen, INI_JFK)))
    issue = find_issue(
        validation_issues(excinfo.value), "accounts[initech].locations[ini-lax].ipv4", "R2"
    )
    assert "acme" in issue.message


def test_r2_an_ipv4_address_has_one_owner_even_when_quarantined_there() -> None:
    released = location("acme-old", "lax", "198.51.100.70", None, LocationState.QUARANTINED)
    with pytest.raises(ValidationError) as excinfo:
        snapshot(
            enterprise("acme", locations=(ACME_LAX, ACME_JFK, released)),
            enterprise("initech", locations=(INI_LAX, INI_JFK)),
        )
    assert any(issue.rule == "R2" for issue in validation_issues(excinfo.value))


@pytest.mark.parametrize(
    "ipv6",
    [
        "2001:db8:100::/48",  # the same range as acme-lax
        "2001:db8:100:8000::/49",  # inside acme-lax's range
        "2001:db8::/32",  # around every range
    ],
)
def test_r2_an_ipv6_range_has_one_owner(ipv6: str) -> None:
    overlapping = location("ini-lax", "lax", "198.51.100.70", ipv6)
    with pytest.raises(ValidationError) as excinfo:
        snapshot(enterprise("acme"), enterprise("initech", locations=(overlapping, INI_JFK)))
    issues = validation_issues(excinfo.value)
    assert any(issue.rule == "R2" and "ipv6" in issue.path for issue in issues), issues


@pytest.mark.parametrize("shared", ["198.51.100.10", "198.51.100.11", "198.51.100.30"])
def test_r2_a_shared_address_cannot_be_dedicated(shared: str) -> None:
    bad = location("acme-lax", "lax", shared, "2001:db8:100::/48")
    with pytest.raises(ValidationError) as excinfo:
        snapshot(enterprise("acme", locations=(bad, ACME_JFK)))
    issue = find_issue(validation_issues(excinfo.value), "accounts[acme].locations[acme-lax].ipv4")
    assert issue.rule == "R2"
    assert "shared" in issue.message


def test_r2_a_shared_ipv6_range_cannot_be_dedicated() -> None:
    bad = location("acme-lax", "lax", "198.51.100.50", "2001:db8:20::/48")  # lax's shared range
    with pytest.raises(ValidationError) as excinfo:
        snapshot(enterprise("acme", locations=(bad, ACME_JFK)))
    issues = validation_issues(excinfo.value)
    assert any(issue.rule == "R2" and "acme-lax" in issue.path for issue in issues), issues


RELEASED_AT = datetime(2030, 1, 1, tzinfo=UTC)
UNTIL = RELEASED_AT + timedelta(days=30)


@pytest.mark.parametrize(
    "released",
    [addr("198.51.100.70"), net("198.51.100.64/28")],
    ids=["address", "network"],
)
def test_r2_quarantine_refuses_a_released_ipv4_for_another_account_before_until(
    released: object,
) -> None:
    entry = Quarantine(address=released, released_by="acme", until=UNTIL)
    accounts = (enterprise("acme"), enterprise("initech", locations=(INI_LAX, INI_JFK)))
    for now in (RELEASED_AT, UNTIL - timedelta(seconds=1)):
        with pytest.raises(ValidationError) as excinfo:
            snapshot(*accounts, quarantine=[entry], now=now)
        issue = find_issue(
            validation_issues(excinfo.value), "accounts[initech].locations[ini-lax]", "R2"
        )
        assert "quarantine" in issue.message


def test_r2_quarantine_refuses_a_released_ipv6_range_for_another_account() -> None:
    entry = Quarantine(address=net("2001:db8:300::/48"), released_by="acme", until=UNTIL)
    with pytest.raises(ValidationError) as excinfo:
        snapshot(
            enterprise("acme"),
            enterprise("initech", locations=(INI_LAX, INI_JFK)),
            quarantine=[entry],
            now=RELEASED_AT,
        )
    find_issue(validation_issues(excinfo.value), "accounts[initech].locations[ini-lax]", "R2")


def test_r2_quarantine_allows_the_address_after_until() -> None:
    entry = Quarantine(address=addr("198.51.100.70"), released_by="acme", until=UNTIL)
    for now in (UNTIL, UNTIL + timedelta(days=1)):
        snap = snapshot(
            enterprise("acme"),
            enterprise("initech", locations=(INI_LAX, INI_JFK)),
            quarantine=[entry],
            now=now,
        )
        assert snap.owner_of(addr("198.51.100.70")) == "initech"


def test_r2_quarantine_allows_the_same_account_to_take_its_address_back() -> None:
    entry = Quarantine(address=addr("198.51.100.50"), released_by="acme", until=UNTIL)
    snap = snapshot(enterprise("acme"), quarantine=[entry], now=RELEASED_AT)
    assert snap.owner_of(ACME_LAX.ipv4) == "acme"


def test_r2_quarantine_does_not_touch_unrelated_addresses() -> None:
    entry = Quarantine(address=addr("198.51.100.99"), released_by="acme", until=UNTIL)
    snapshot(
        enterprise("acme"),
        enterprise("initech", locations=(INI_LAX, INI_JFK)),
        quarantine=[entry],
        now=RELEASED_AT,
    )


def test_r2_quarantine_is_enforced_by_the_deployment_loader() -> None:
    text = _TWO_ACCOUNTS_TOML + (
        '\n[[quarantine]]\naddress = "198.51.100.70"\nreleased_by = "acme"\n'
        "until = 2030-01-31T00:00:00Z\n"
    )
    with pytest.raises(DeploymentError) as excinfo:
        load_deployment(text, now=datetime(2030, 1, 2, tzinfo=UTC))
    find_issue(excinfo.value.issues, "accounts[initech].locations[ini-lax]", "R2")
    snap = load_deployment(text, now=datetime(2030, 2, 1, tzinfo=UTC))
    assert snap.owner_of(addr("198.51.100.70")) == "initech"


def test_r2_dedicated_policy_on_an_account_whose_dedicated_egress_is_inactive_is_shared() -> None:
    p = policy("p", dedicated("acme-lax", "shared"))
    snap = snapshot(enterprise("acme", locations=(ACME_LAX,), policies=[p]))
    decision = decide(snap, flow("acme"), ALL_UP)
    assert_shared_from(decision, "las")
    assert decision.rule == "R2"


# --------------------------------------------------------------------------------------------
# R3 scope
# --------------------------------------------------------------------------------------------


def test_r3_proxy_tcp_off_gives_shared() -> None:
    off = NetworkSettings(proxy_tcp=False, proxy_udp=False)
    everything = policy("all", dedicated("acme-jfk", "acme-lax"))
    snap = snapshot(enterprise("acme", policies=[everything], settings=off))
    for protocol in ("tcp", "udp"):
        decision = decide(snap, flow("acme", protocol=protocol), ALL_UP)
        assert_shared_from(decision, "las")
        assert decision.rule == "R3"


def test_r3_tcp_gets_dedicated_without_any_policy() -> None:
    snap = snapshot(enterprise("acme"))
    for port in (22, 443, 5432, 65535):  # HTTP or not
        decision = decide(snap, flow("acme", port=port), ALL_UP)
        assert decision.egress is Egress.DEDICATED
        assert decision.rule == "R6"


def test_r3_udp_with_proxy_udp_off_gives_shared() -> None:
    snap = snapshot(enterprise("acme", settings=NetworkSettings(proxy_tcp=True, proxy_udp=False)))
    decision = decide(snap, flow("acme", protocol="udp"), ALL_UP)
    assert_shared_from(decision, "las")
    assert decision.rule == "R3"
    assert decide(snap, flow("acme", protocol="tcp"), ALL_UP).egress is Egress.DEDICATED


def test_r3_udp_with_proxy_udp_on_gets_dedicated() -> None:
    snap = snapshot(enterprise("acme", settings=UDP_ON))
    for dst in (DEST4, DEST6):
        decision = decide(snap, flow("acme", dst, protocol="udp", port=443), ALL_UP)
        assert decision.egress is Egress.DEDICATED
        assert decision.location == "acme-lax"


def test_r3_proxy_udp_without_proxy_tcp_is_a_validation_error() -> None:
    bad = NetworkSettings(proxy_tcp=False, proxy_udp=True)
    with pytest.raises(ValidationError) as excinfo:
        snapshot(enterprise("acme", settings=bad))
    find_issue(validation_issues(excinfo.value), "accounts[acme].network.proxy_udp", "R3")


# --------------------------------------------------------------------------------------------
# R4 exclusions
# --------------------------------------------------------------------------------------------


def test_r4_dns_leaves_from_shared_addresses() -> None:
    everything = policy("all", dedicated("acme-jfk", "acme-lax"))
    snap = snapshot(enterprise("acme", policies=[everything], settings=UDP_ON))
    for dst, family in ((DEST4, 4), (DEST6, 6)):
        decision = decide(snap, flow("acme", dst, protocol="dns", port=53), ALL_UP)
        assert_shared_from(decision, "las", family)
        assert decision.rule == "R4"


ROUTES = [route("office-lan", "acme", ["192.0.2.128/26", "*.corp.acme.example"], via="office-1")]


def test_r4_private_route_by_cidr_is_shared() -> None:
    everything = policy("all", dedicated("acme-jfk", "acme-lax"))
    snap = snapshot(enterprise("acme", policies=[everything]), routes=ROUTES)
    decision = decide(snap, flow("acme", "192.0.2.130"), ALL_UP)
    assert_shared_from(decision, "las")
    assert decision.rule == "R4"
    assert decision.path is Path.PRIVATE_ROUTE
    assert decision.route == "office-lan"
    assert decision.via == "office-1"


def test_r4_private_route_by_hostname_pattern_is_shared() -> None:
    snap = snapshot(enterprise("acme"), routes=ROUTES)
    decision = decide(snap, flow("acme", "192.0.2.20", hostname="wiki.corp.acme.example"), ALL_UP)
    assert_shared_from(decision, "las")
    assert decision.rule == "R4"
    assert decision.path is Path.PRIVATE_ROUTE
    assert decision.route == "office-lan"
    assert decision.via == "office-1"


def test_r4_private_route_does_not_catch_other_destinations() -> None:
    snap = snapshot(enterprise("acme"), routes=ROUTES)
    for dst, hostname in (("192.0.2.127", None), ("192.0.2.20", "corp.acme.example")):
        decision = decide(snap, flow("acme", dst, hostname=hostname), ALL_UP)
        assert decision.egress is Egress.DEDICATED
        assert decision.route is None and decision.path is not Path.PRIVATE_ROUTE


def test_r4_routes_of_one_account_do_not_apply_to_another() -> None:
    snap = snapshot(
        enterprise("acme"),
        enterprise("initech", locations=(INI_LAX, INI_JFK)),
        free("globex"),
        routes=ROUTES,
    )
    for account in ("initech", "globex"):
        for dst, hostname in (("192.0.2.130", None), ("192.0.2.20", "wiki.corp.acme.example")):
            decision = decide(snap, flow(account, dst, hostname=hostname), ALL_UP)
            assert decision.path is not Path.PRIVATE_ROUTE
            assert decision.route is None and decision.via is None
    # acme's hostname pattern is acme's alone: for others the name is an ordinary destination
    assert decide(snap, flow("initech", "192.0.2.20", hostname="wiki.corp.acme.example"),
                  ALL_UP).egress is Egress.DEDICATED


def test_r13_another_accounts_private_network_is_refused() -> None:
    """A WAN route sits in the PoP's routing table for every flow: only its account may use it."""
    snap = snapshot(enterprise("acme"), enterprise("initech", locations=(INI_LAX, INI_JFK)),
                    free("globex"), routes=ROUTES)
    for account in ("initech", "globex"):
        decision = decide(snap, flow(account, "192.0.2.130"), ALL_UP)
        assert_refused(decision, "R13")
        assert "private route of another account" in decision.reason
    assert decide(snap, flow("acme", "192.0.2.130"), ALL_UP).rule == "R4"
    assert decide(snap, flow("globex", "192.0.2.127"), ALL_UP).rule == "R1"  # just outside it


# --------------------------------------------------------------------------------------------
# R5 both families
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dst", [DEST4, DEST6, "203.0.113.130", "192.0.2.130"])
@pytest.mark.parametrize("account", ["acme", "globex"])
@pytest.mark.parametrize("pop", ["las", "lax", "jfk"])
def test_r5_source_family_is_the_destination_family(dst: str, account: str, pop: str) -> None:
    p = policy("p", dedicated("acme-jfk", "acme-lax"), users={"bob"})
    snap = snapshot(enterprise("acme", policies=[p]), free("globex"), origins=[CDN], routes=ROUTES)
    family = addr(dst).version
    for user in ("alice", "bob"):
        decision = decide(snap, flow(account, dst, user=user, pop=pop), ALL_UP)
        if decision.refused:  # only acme may reach acme's private network (R13)
            assert (account, dst) == ("globex", "192.0.2.130"), decision
            continue
        assert decision.source_address is not None
        assert decision.source_address.version == family
        if decision.proxy_v2_source is not None:
            assert decision.proxy_v2_source.version == family


def test_r5_pop_without_shared_ipv6_refuses_shared_ipv6_flows() -> None:
    snap = snapshot(free("globex"), enterprise("acme", policies=[policy("s", SHARED)]))
    for account in ("globex", "acme"):
        assert_refused(decide(snap, flow(account, DEST6, pop="ord"), ALL_UP), "R5")
        # IPv4 still works there.
        decision = decide(snap, flow(account, DEST4, pop="ord"), ALL_UP)
        assert decision.source_address in DC["ord"].shared_ipv4


def test_r5_pop_without_shared_ipv6_still_serves_dedicated_ipv6() -> None:
    snap = snapshot(enterprise("acme"))
    decision = decide(snap, flow("acme", DEST6, pop="ord"), ALL_UP)
    assert decision.egress is Egress.DEDICATED
    assert decision.source_address is not None and decision.source_address.version == 6


# --------------------------------------------------------------------------------------------
# R6 location choice
# --------------------------------------------------------------------------------------------


def test_r6_first_matching_policy_wins() -> None:
    to_jfk = policy("to-jfk", dedicated("acme-jfk", "acme-lax"), users={"bob"})
    to_bur = policy("to-bur", dedicated("acme-bur", "acme-lax"), ports=[(443, 443)])
    locations = (ACME_LAX, ACME_BUR, ACME_JFK)
    snap = snapshot(enterprise("acme", locations=locations, policies=[to_jfk, to_bur]))
    decision = decide(snap, flow("acme", user="bob"), ALL_UP)
    assert (decision.rule, decision.location) == ("policy:to-jfk", "acme-jfk")
    # Order matters: the same two policies the other way round.
    snap = snapshot(enterprise("acme", locations=locations, policies=[to_bur, to_jfk]))
    decision = decide(snap, flow("acme", user="bob"), ALL_UP)
    assert (decision.rule, decision.location) == ("policy:to-bur", "acme-bur")


def test_r6_action_shared_uses_the_connected_pops_shared_address() -> None:
    snap = snapshot(
        enterprise("acme", policies=[policy("updates", SHARED, destinations=["*.updates.example"])])
    )
    for dst, family in ((DEST4, 4), (DEST6, 6)):
        decision = decide(snap, flow("acme", dst, hostname="dl.updates.example"), ALL_UP)
        assert_shared_from(decision, "las", family)
        assert decision.rule == "policy:updates"
    assert decide(snap, flow("acme", hostname="dl.other.example"), ALL_UP).rule == "R6"


def test_r6_policies_only_choose_the_egress_never_block() -> None:
    p = policy("bank", dedicated("acme-jfk", "acme-lax"), destinations=["*.bank.example"])
    snap = snapshot(enterprise("acme", policies=[p]))
    for hostname in ("www.bank.example", "www.shop.example"):
        assert not decide(snap, flow("acme", hostname=hostname), ALL_UP).refused


# Each case: selector fields, a flow that matches, flows that do not. The policy sends
# matching flows to acme-jfk; everything else takes the default acme-lax (lowest RTT).
SELECTOR_CASES = {
    "users": ({"users": {"bob"}}, {"user": "bob"}, [{"user": "alice"}, {"user": "carol"}]),
    "users-any-of": ({"users": {"bob", "carol"}}, {"user": "carol"}, [{"user": "alice"}]),
    "groups": ({"groups": {"finance"}}, {"user": "bob"}, [{"user": "alice"}, {"user": "carol"}]),
    "groups-any-of": (
        {"groups": {"finance", "legal"}},
        {"user": "dave"},
        [{"user": "alice"}, {"user": "carol"}],
    ),
    "devices": (
        {"devices": {"acme:bob-phone"}},
        {"user": "bob", "device": "acme:bob-phone"},
        [{"user": "bob", "device": "acme:bob-laptop"}],
    ),
    "cidr-v4": (
        {"destinations": ["192.0.2.0/25"]},
        {"dst": "192.0.2.127"},
        [{"dst": "192.0.2.128"}, {"dst": "2001:db8:ffff::1"}],
    ),
    "cidr-v6": (
        {"destinations": ["2001:db8:ffff:1::/64"]},
        {"dst": "2001:db8:ffff:1::99"},
        [{"dst": "2001:db8:ffff:2::99"}, {"dst": "192.0.2.1"}],
    ),
    "host-exact": (
        {"destinations": ["api.partner.example"]},
        {"hostname": "api.partner.example"},
        [
            {"hostname": "www.partner.example"},
            {"hostname": "x.api.partner.example"},
            {"hostname": None},
        ],
    ),
    "host-exact-case-and-dot": (
        {"destinations": ["api.partner.example"]},
        {"hostname": "API.Partner.Example."},
        [{"hostname": "api.partner.example.net"}],
    ),
    "host-wildcard": (
        {"destinations": ["*.partner.example"]},
        {"hostname": "api.partner.example"},
        [
            {"hostname": "partner.example"},  # the apex is not a subdomain
            {"hostname": "evilpartner.example"},
            {"hostname": "partner.example.evil.example"},
            {"hostname": None},
        ],
    ),
    "host-wildcard-deep": (
        {"destinations": ["*.partner.example"]},
        {"hostname": "a.b.partner.example"},
        [{"hostname": "example"}],
    ),
    "cidr-or-hostname": (
        {"destinations": ["192.0.2.64/26", "*.partner.example"]},
        {"dst": "192.0.2.100"},
        [{"dst": "192.0.2.10", "hostname": "www.other.example"}],
    ),
    "cidr-or-hostname-2": (
        {"destinations": ["192.0.2.64/26", "*.partner.example"]},
        {"dst": "192.0.2.10", "hostname": "www.partner.example"},
        [{"dst": "192.0.2.10"}],
    ),
    "port-range-low": (
        {"ports": [(8000, 8080)]},
        {"port": 8000},
        [{"port": 7999}, {"port": 8081}, {"port": 443}],
    ),
    "port-range-high": ({"ports": [(8000, 8080)]}, {"port": 8080}, [{"port": 8081}]),
    "ports-several": ({"ports": [(22, 22), (443, 443)]}, {"port": 22}, [{"port": 23}]),
    "ports-1": ({"ports": [(1, 1)]}, {"port": 1}, [{"port": 2}]),
    "ports-65535": ({"ports": [(65535, 65535)]}, {"port": 65535}, [{"port": 65534}]),
    "protocols": ({"protocols": {"udp"}}, {"protocol": "udp"}, [{"protocol": "tcp"}]),
    "protocols-tcp": ({"protocols": {"tcp"}}, {"protocol": "tcp"}, [{"protocol": "udp"}]),
    "connected-pops": (
        {"connected_pops": {"ord"}},
        {"pop": "ord"},
        [{"pop": "las"}, {"pop": "bur"}],
    ),
    "and-across-fields": (
        {"users": {"bob"}, "ports": [(443, 443)], "destinations": ["192.0.2.0/24"]},
        {"user": "bob", "port": 443, "dst": "192.0.2.1"},
        [
            {"user": "alice", "port": 443, "dst": "192.0.2.1"},
            {"user": "bob", "port": 80, "dst": "192.0.2.1"},
            {"user": "bob", "port": 443, "dst": "2001:db8:ffff::1"},
        ],
    ),
    "and-groups-protocol-pop": (
        {"groups": {"engineering"}, "protocols": {"udp"}, "connected_pops": {"las"}},
        {"user": "alice", "protocol": "udp", "pop": "las"},
        [
            {"user": "bob", "protocol": "udp", "pop": "las"},
            {"user": "alice", "protocol": "tcp", "pop": "las"},
            {"user": "alice", "protocol": "udp", "pop": "bur"},
        ],
    ),
}


@pytest.mark.parametrize("case", list(SELECTOR_CASES))
def test_r6_selector_fields(case: str) -> None:
    fields, matching, others = SELECTOR_CASES[case]
    p = policy("pick-jfk", dedicated("acme-jfk", "acme-lax"), **fields)
    snap = snapshot(enterprise("acme", policies=[p], settings=UDP_ON))
    up = view(rtt={**ALL_UP.rtt_ms, ("ord", "lax"): 1.0, ("bur", "lax"): 1.0})

    decision = decide(snap, flow("acme", **matching), up)
    assert decision.rule == "policy:pick-jfk", (case, matching, decision)
    assert decision.location == "acme-jfk"
    for other in others:
        decision = decide(snap, flow("acme", **other), up)
        assert decision.rule == "R6", (case, other, decision)
        assert decision.location == "acme-lax", (case, other, decision)


def test_r6_no_policy_uses_the_lowest_rtt_location_from_the_connected_pop() -> None:
    snap = snapshot(enterprise("acme", locations=(ACME_JFK, ACME_BUR, ACME_LAX)))
    expected = {"las": "acme-lax", "lax": "acme-lax", "bur": "acme-bur", "jfk": "acme-jfk"}
    for pop, location_id in expected.items():
        for dst in (DEST4, DEST6):
            decision = decide(snap, flow("acme", dst, pop=pop), ALL_UP)
            assert decision.rule == "R6"
            assert decision.location == location_id, (pop, dst, decision)
    # ord: jfk 18 < lax 40 < bur 41.
    assert decide(snap, flow("acme", pop="ord"), ALL_UP).location == "acme-jfk"
    # A different RTT view changes the choice.
    slow_lax = view(rtt={**ALL_UP.rtt_ms, ("las", "lax"): 70.0, ("las", "bur"): 75.0})
    assert decide(snap, flow("acme"), slow_lax).location == "acme-jfk"


def test_r6_a_location_without_a_known_rtt_is_the_last_choice() -> None:
    snap = snapshot(enterprise("acme", locations=(ACME_LAX, ACME_JFK)))
    unknown_lax = view(rtt={("las", "jfk"): 60.0})
    assert decide(snap, flow("acme"), unknown_lax).location == "acme-jfk"


EQUAL_RTT = view(rtt={("las", "lax"): 10.0, ("las", "jfk"): 10.0, ("las", "bur"): 10.0})
USERS_200 = [f"user{i}" for i in range(200)]


def test_r6_ties_are_broken_by_a_stable_hash_of_the_user() -> None:
    snap = snapshot(enterprise("acme", locations=(ACME_LAX, ACME_JFK)))
    first = {user: decide(snap, flow("acme", user=user), EQUAL_RTT).location for user in USERS_200}
    # Same user -> same location, every time and in a snapshot of another version with the
    # locations listed in the other order.
    again = snapshot(enterprise("acme", locations=(ACME_JFK, ACME_LAX)), version=2)
    for user in USERS_200:
        assert decide(snap, flow("acme", user=user), EQUAL_RTT).location == first[user]
        assert decide(again, flow("acme", user=user), EQUAL_RTT).location == first[user]
        # ... and whichever of the user's devices or destinations it uses.
        other = flow("acme", "192.0.2.99", user=user, device="acme:bob-phone", port=8443)
        assert decide(snap, other, EQUAL_RTT).location == first[user]
    # Different users spread over the tied locations.
    counts = {loc: list(first.values()).count(loc) for loc in ("acme-lax", "acme-jfk")}
    assert min(counts.values()) >= 50, counts


def test_r6_ties_only_among_the_lowest_rtt() -> None:
    # bur and lax tie at 10 ms, jfk is slower: no user ever gets jfk.
    snap = snapshot(enterprise("acme", locations=(ACME_LAX, ACME_BUR, ACME_JFK)))
    tie = view(rtt={("las", "lax"): 10.0, ("las", "bur"): 10.0, ("las", "jfk"): 11.0})
    chosen = {decide(snap, flow("acme", user=user), tie).location for user in USERS_200}
    assert chosen == {"acme-lax", "acme-bur"}


# --------------------------------------------------------------------------------------------
# R7 IPv4 path
# --------------------------------------------------------------------------------------------


def test_r7_ipv4_dedicated_goes_over_the_backbone_to_the_home_pop() -> None:
    snap = snapshot(enterprise("acme"))
    decision = decide(snap, flow("acme", pop="las"), ALL_UP)
    assert decision.egress is Egress.DEDICATED
    assert decision.path is Path.BACKBONE
    assert decision.connected_pop == "las"
    assert decision.egress_pop == "lax" != decision.connected_pop
    assert decision.source_address == ACME_LAX.ipv4
    assert decision.logical_city == "Los Angeles"
    assert decision.proxy_v2_source is None


def test_r7_policy_location_leaves_from_its_own_home_pop() -> None:
    p = policy("bank", dedicated("acme-jfk", "acme-lax"), destinations=["*.bank.example"])
    snap = snapshot(enterprise("acme", policies=[p]))
    decision = decide(snap, flow("acme", hostname="www.bank.example"), ALL_UP)
    assert (decision.path, decision.egress_pop, decision.source_address) == (
        Path.BACKBONE,
        "jfk",
        ACME_JFK.ipv4,
    )
    assert decision.logical_city == "New York"


def test_r7_connected_to_the_home_pop_is_direct() -> None:
    snap = snapshot(enterprise("acme"))
    for pop, loc in (("lax", ACME_LAX), ("jfk", ACME_JFK)):
        decision = decide(snap, flow("acme", pop=pop), ALL_UP)
        assert decision.path is Path.DIRECT
        assert decision.egress_pop == decision.connected_pop == pop
        assert decision.source_address == loc.ipv4


# --------------------------------------------------------------------------------------------
# R8 in-network destinations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dst", "hostname"),
    [("203.0.113.130", None), ("203.0.113.255", None), ("192.0.2.77", "www.cdn.example")],
    ids=["cidr", "cidr-last", "hostname"],
)
def test_r8_in_network_origin_leaves_locally_with_proxy_v2_source(
    dst: str, hostname: str | None
) -> None:
    snap = snapshot(enterprise("acme"), origins=[CDN])
    decision = decide(snap, flow("acme", dst, hostname=hostname, pop="las"), ALL_UP)
    assert decision.egress is Egress.DEDICATED
    assert decision.path is Path.IN_NETWORK
    assert decision.egress_pop == decision.connected_pop == "las"
    assert decision.source_address in LAS.shared_ipv4
    assert decision.proxy_v2_source == ACME_LAX.ipv4
    assert decision.location == "acme-lax"
    assert decision.logical_city == "Los Angeles"


def test_r8_in_network_origin_with_a_policy_carries_the_policy_location() -> None:
    p = policy("cdn-from-ny", dedicated("acme-jfk", "acme-lax"), destinations=["*.cdn.example"])
    snap = snapshot(enterprise("acme", policies=[p]), origins=[CDN])
    decision = decide(snap, flow("acme", "192.0.2.77", hostname="img.cdn.example"), ALL_UP)
    assert decision.path is Path.IN_NETWORK
    assert decision.egress_pop == "las"
    assert decision.proxy_v2_source == ACME_JFK.ipv4
    assert decision.source_address in LAS.shared_ipv4


def test_r8_prefers_a_healthy_location_over_a_faster_unreachable_one() -> None:
    """R6 asks for the most performant *healthy* location, even when R8 leaves locally."""
    snap = snapshot(enterprise("acme"), origins=[CDN])
    lax_down = view(down={"lax"}, rtt={("las", "lax"): 1.0, ("las", "jfk"): 60.0})
    decision = decide(snap, flow("acme", "203.0.113.130", pop="las"), lax_down)
    assert decision.path is Path.IN_NETWORK
    assert decision.location == "acme-jfk"
    assert decision.proxy_v2_source == ACME_JFK.ipv4


def test_r8_ordinary_destinations_are_not_in_network() -> None:
    snap = snapshot(enterprise("acme"), origins=[CDN])
    for dst, hostname in (("203.0.113.127", None), ("192.0.2.77", "cdn.example")):
        decision = decide(snap, flow("acme", dst, hostname=hostname), ALL_UP)
        assert decision.path is Path.BACKBONE
        assert decision.proxy_v2_source is None


# --------------------------------------------------------------------------------------------
# R9 IPv6 path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pop", ["las", "lax", "jfk", "bur", "ord"])
def test_r9_ipv6_leaves_locally_from_the_pops_subrange_of_the_location(pop: str) -> None:
    snap = snapshot(enterprise("acme"))
    connected = DC[pop]
    decision = decide(snap, flow("acme", DEST6, pop=pop), ALL_UP)
    loc = {"acme-lax": ACME_LAX, "acme-jfk": ACME_JFK}[decision.location or ""]
    assert loc.ipv6 is not None
    source = decision.source_address
    assert isinstance(source, ipaddress.IPv6Address)
    assert source in loc.ipv6
    assert source in ipv6_subrange(loc.ipv6, connected.slot)
    assert source != ipv6_subrange(loc.ipv6, connected.slot).network_address
    for other in DATA_CENTERS:
        if other.code != pop:
            assert source not in ipv6_subrange(loc.ipv6, other.slot)
    assert decision.egress_pop == decision.connected_pop == pop
    assert decision.path is Path.DIRECT
    assert decision.logical_city == DC[loc.home_pop].city
    assert decision.proxy_v2_source is None


def test_r9_ipv6_policy_uses_its_ipv6_location() -> None:
    p = policy("bank", dedicated("acme-lax", "shared", ipv6="acme-jfk"), users={"bob"})
    snap = snapshot(enterprise("acme", policies=[p]))
    decision = decide(snap, flow("acme", DEST6, user="bob"), ALL_UP)
    assert ACME_JFK.ipv6 is not None
    assert decision.location == "acme-jfk"
    assert decision.source_address in ipv6_subrange(ACME_JFK.ipv6, LAS.slot)
    assert decision.logical_city == "New York"
    assert decision.egress_pop == "las"


def test_r9_ipv6_needs_no_secondary_and_works_when_the_home_pop_is_down() -> None:
    p = policy("bank", dedicated("acme-jfk", "acme-lax"), users={"bob"})
    snap = snapshot(enterprise("acme", policies=[p]))
    homes_down = view(down={"lax", "jfk"})
    for user in ("alice", "bob"):
        decision = decide(snap, flow("acme", DEST6, user=user), homes_down)
        assert decision.egress is Egress.DEDICATED, decision
        assert decision.egress_pop == "las"
        assert snap.owner_of(decision.source_address) == "acme"
        # IPv4 to the same place fails closed instead (R11).
        assert decide(snap, flow("acme", DEST4, user=user), homes_down).refused


def test_r9_ipv6_source_is_stable_for_a_user_and_spreads_across_users() -> None:
    snap = snapshot(enterprise("acme"))
    sources = {}
    for user in USERS_200[:50]:
        one = decide(snap, flow("acme", DEST6, user=user), ALL_UP).source_address
        two = decide(snap, flow("acme", "2001:db8:ffff::99", user=user), ALL_UP).source_address
        assert one == two
        sources[user] = one
    assert len(set(sources.values())) > 1


# --------------------------------------------------------------------------------------------
# R11 failover
# --------------------------------------------------------------------------------------------

BANK = policy(
    "bank", dedicated("acme-jfk", "acme-lax"), destinations=["*.bank.example"], users={"bob"}
)
BANK_OR_SHARED = policy(
    "bank", dedicated("acme-jfk", "shared"), destinations=["*.bank.example"], users={"bob"}
)


def bank_flow(pop: str = "las") -> Flow:
    return flow("acme", "192.0.2.200", user="bob", hostname="www.bank.example", pop=pop)


def test_r11_primary_up_is_used_even_if_the_secondary_is_faster() -> None:
    snap = snapshot(enterprise("acme", policies=[BANK]))
    decision = decide(snap, bank_flow(), ALL_UP)
    assert decision.location == "acme-jfk"
    assert decision.rule == "policy:bank"


def test_r11_primary_down_moves_to_the_secondary() -> None:
    snap = snapshot(enterprise("acme", policies=[BANK]))
    decision = decide(snap, bank_flow(), view(down={"jfk"}))
    assert decision.egress is Egress.DEDICATED
    assert decision.location == "acme-lax"
    assert decision.source_address == ACME_LAX.ipv4
    assert decision.egress_pop == "lax"
    assert "R11" in decision.rule


def test_r11_secondary_shared_falls_back_to_shared() -> None:
    snap = snapshot(enterprise("acme", policies=[BANK_OR_SHARED]))
    up = decide(snap, bank_flow(), ALL_UP)
    assert up.location == "acme-jfk"
    decision = decide(snap, bank_flow(), view(down={"jfk"}))
    assert_shared_from(decision, "las")


def test_r11_both_down_fails_closed() -> None:
    snap = snapshot(enterprise("acme", policies=[BANK]))
    decision = decide(snap, bank_flow(), view(down={"jfk", "lax"}))
    assert_refused(decision, "R11")


def test_r11_connected_pop_is_always_reachable() -> None:
    # Even a view that lists nothing as up lets the connected PoP serve its own location.
    snap = snapshot(enterprise("acme", policies=[BANK]))
    decision = decide(snap, bank_flow(pop="jfk"), view(down=DC))
    assert decision.location == "acme-jfk"
    assert decision.path is Path.DIRECT


def test_r11_no_policy_skips_a_location_whose_pop_is_down() -> None:
    snap = snapshot(enterprise("acme"))
    decision = decide(snap, flow("acme"), view(down={"lax"}))
    assert decision.location == "acme-jfk"
    assert decision.source_address == ACME_JFK.ipv4


def test_r11_no_policy_all_locations_down_fallback_closed_refuses() -> None:
    snap = snapshot(enterprise("acme"))
    assert snap.accounts["acme"].account.settings.fallback is Fallback.CLOSED
    decision = decide(snap, flow("acme"), view(down={"lax", "jfk"}))
    assert_refused(decision, "R11")


def test_r11_no_policy_all_locations_down_fallback_shared_is_shared() -> None:
    snap = snapshot(enterprise("acme", settings=FALLBACK_SHARED))
    decision = decide(snap, flow("acme"), view(down={"lax", "jfk"}))
    assert_shared_from(decision, "las")
    assert decision.rule == "R11"


def test_r11_fallback_shared_is_only_used_when_nothing_is_usable() -> None:
    snap = snapshot(enterprise("acme", settings=FALLBACK_SHARED))
    assert decide(snap, flow("acme"), view(down={"lax"})).location == "acme-jfk"


# --------------------------------------------------------------------------------------------
# R13 isolation
# --------------------------------------------------------------------------------------------


def test_r13_unauthenticated_client_is_refused() -> None:
    snap = snapshot(enterprise("acme"), free("globex"))
    for dst in (DEST4, DEST6):
        assert_refused(decide(snap, flow(None, dst), ALL_UP), "R13")


def test_r13_unknown_account_is_refused() -> None:
    snap = snapshot(enterprise("acme"))
    assert_refused(decide(snap, flow("nobody"), ALL_UP), "R13")


def test_r13_unknown_connected_pop_is_refused() -> None:
    snap = snapshot(enterprise("acme"))
    assert_refused(decide(snap, flow("acme", pop="xyz"), ALL_UP), "R13")


FORBIDDEN = {
    "loopback-v4": "127.0.0.1",
    "loopback-v4-other": "127.1.2.3",
    "loopback-v6": "::1",
    "unspecified-v4": "0.0.0.0",
    "unspecified-v6": "::",
    "link-local-v4": "169.254.169.254",
    "link-local-v6": "fe80::1",
    "multicast-v4": "224.0.0.251",
    "multicast-v6": "ff02::1",
    "broadcast": "255.255.255.255",
    "ipv4-mapped-loopback": "::ffff:127.0.0.1",
    "shared-connected": "198.51.100.10",
    "shared-connected-2": "198.51.100.11",
    "shared-other-pop": "198.51.100.30",
    "backbone-connected": "203.0.113.1",
    "backbone-other-pop": "203.0.113.3",
    "dedicated-own": "198.51.100.50",
    "dedicated-other-account": "198.51.100.70",
    "control": "203.0.113.250",
}


@pytest.mark.parametrize("account", ["acme", "initech", "globex"])
@pytest.mark.parametrize("name", list(FORBIDDEN))
def test_r13_forbidden_destinations_are_refused(account: str, name: str) -> None:
    snap = _r13_snapshot()
    for protocol in ("tcp", "udp", "dns"):
        decision = decide(snap, flow(account, FORBIDDEN[name], protocol=protocol), ALL_UP)
        assert_refused(decision, "R13")


@pytest.mark.parametrize("dst", ["2001:db8:10::1", "2001:db8:20::1234"])
def test_r13_pops_shared_ipv6_range_is_refused(dst: str) -> None:
    snap = _r13_snapshot()
    assert_refused(decide(snap, flow("globex", dst), ALL_UP), "R13")


@pytest.mark.parametrize("dst", ["2001:db8:100::1", "2001:db8:300:2::1"])
def test_r13_dedicated_ipv6_ranges_are_refused(dst: str) -> None:
    snap = _r13_snapshot()
    assert_refused(decide(snap, flow("globex", dst), ALL_UP), "R13")


def test_r13_allow_destinations_re_allows_exactly_what_it_names() -> None:
    settings = DeploymentSettings(
        allow_destinations=(net("127.0.0.1/32"), net("::1/128")),
        control_addresses=(net("203.0.113.250/32"),),
    )
    snap = snapshot(enterprise("acme"), free("globex"), settings=settings)
    for account in ("acme", "globex"):
        for dst in ("127.0.0.1", "::1"):
            decision = decide(snap, flow(account, dst), ALL_UP)
            assert not decision.refused, decision
            assert decision.source_address is not None
        for dst in ("127.0.0.2", "169.254.169.254", "203.0.113.250", "198.51.100.10"):
            assert_refused(decide(snap, flow(account, dst), ALL_UP), "R13")


def test_r13_control_addresses_are_refused_only_when_configured() -> None:
    plain = snapshot(free("globex"))
    assert not decide(plain, flow("globex", "203.0.113.250"), ALL_UP).refused
    configured = snapshot(
        free("globex"), settings=DeploymentSettings(control_addresses=(net("203.0.113.240/28"),))
    )
    for dst in ("203.0.113.240", "203.0.113.250", "203.0.113.255"):
        assert_refused(decide(configured, flow("globex", dst), ALL_UP), "R13")
    assert not decide(configured, flow("globex", "203.0.113.239"), ALL_UP).refused


@pytest.mark.parametrize("field", ["primary", "secondary", "ipv6"])
def test_r13_a_policy_naming_another_accounts_location_is_a_validation_error(
    field: str,
) -> None:
    names = {"primary": "acme-lax", "secondary": "acme-jfk", "ipv6": "acme-lax"}
    names[field] = "ini-lax"  # exists only in initech
    p = policy("steal", dedicated(names["primary"], names["secondary"], names["ipv6"]))
    with pytest.raises(ValidationError) as excinfo:
        snapshot(
            enterprise("acme", policies=[p]), enterprise("initech", locations=(INI_LAX, INI_JFK))
        )
    issue = find_issue(validation_issues(excinfo.value), f"accounts[acme].policies[steal].{field}")
    assert "ini-lax" in issue.message


def test_r13_account_never_leaves_from_another_accounts_address() -> None:
    policies = [
        policy("a", dedicated("acme-jfk", "acme-lax"), users={"bob"}),
        policy("b", dedicated("acme-lax", "shared", "acme-jfk"), users={"carol"}),
    ]
    snap = snapshot(
        enterprise("acme", policies=policies),
        enterprise("initech", locations=(INI_LAX, INI_JFK)),
        free("globex"),
        origins=[CDN],
    )
    views = [ALL_UP, view(down={"lax"}), view(down={"jfk"}), view(down={"lax", "jfk"})]
    for account in ("acme", "initech", "globex"):
        for user in ("alice", "bob", "carol"):
            for pop in DC:
                for dst in (DEST4, DEST6, "203.0.113.130"):
                    for health in views:
                        decision = decide(snap, flow(account, dst, user=user, pop=pop), health)
                        for source in (decision.source_address, decision.proxy_v2_source):
                            if source is not None:
                                assert snap.owner_of(source) in (None, account), decision


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _r13_snapshot() -> Snapshot:
    return snapshot(
        enterprise("acme"),
        enterprise("initech", locations=(INI_LAX, INI_JFK)),
        free("globex"),
        settings=DeploymentSettings(control_addresses=(net("203.0.113.250/32"),)),
    )


_TWO_ACCOUNTS_TOML = """
[[data_centers]]
code = "lax"
city = "Los Angeles"
country = "US"
latitude = 34.05
longitude = -118.24
shared_ipv4 = ["198.51.100.20"]
slot = 2

[[data_centers]]
code = "jfk"
city = "New York"
country = "US"
latitude = 40.71
longitude = -74.01
shared_ipv4 = ["198.51.100.30"]
slot = 3

[[accounts]]
id = "acme"
plan = "enterprise"

  [[accounts.locations]]
  id = "acme-lax"
  pop = "lax"
  ipv4 = "198.51.100.50"

[[accounts]]
id = "initech"
plan = "enterprise"

  [[accounts.locations]]
  id = "ini-lax"
  pop = "lax"
  ipv4 = "198.51.100.70"

  [[accounts.locations]]
  id = "ini-jfk"
  pop = "jfk"
  ipv4 = "198.51.100.80"
"""
