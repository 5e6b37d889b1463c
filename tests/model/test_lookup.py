"""CidrTable, HostTable and PolicyIndex: the lookup structures behind every decision."""

from __future__ import annotations

import inspect
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import or_

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.model.addresses import IPAddress
from egressd.model.lookup import CidrTable, HostTable
from egressd.model.policy import EgressPolicy, Selector, SharedAction
from egressd.model.policy_index import PolicyIndex

from .builders import addr, net

# --------------------------------------------------------------------------------------------
# CidrTable
# --------------------------------------------------------------------------------------------


def cidr_table(entries: Mapping[str, str]) -> CidrTable[str]:
    table: CidrTable[str] = CidrTable()
    for network, value in entries.items():
        table.add(net(network), value)
    return table


def test_cidr_longest_prefix_wins_whatever_the_insertion_order() -> None:
    entries = {
        "192.0.2.0/24": "/24",
        "192.0.2.128/25": "/25",
        "192.0.2.192/26": "/26",
        "192.0.2.200/32": "/32",
    }
    for ordering in (list(entries.items()), list(reversed(entries.items()))):
        table = cidr_table(dict(ordering))
        assert table.longest(addr("192.0.2.200")) == "/32"
        assert table.longest(addr("192.0.2.201")) == "/26"
        assert table.longest(addr("192.0.2.191")) == "/25"
        assert table.longest(addr("192.0.2.127")) == "/24"
        assert table.longest(addr("192.0.2.0")) == "/24"
        assert table.longest(addr("192.0.2.255")) == "/26"
        assert table.longest(addr("192.0.3.0")) is None
        assert table.longest(addr("192.0.1.255")) is None


def test_cidr_every_yields_all_matches_longest_first() -> None:
    table = cidr_table({"0.0.0.0/0": "/0", "192.0.2.0/24": "/24", "192.0.2.0/28": "/28"})
    assert list(table.every(addr("192.0.2.5"))) == ["/28", "/24", "/0"]
    assert list(table.every(addr("192.0.2.50"))) == ["/24", "/0"]
    assert list(table.every(addr("198.51.100.1"))) == ["/0"]


def test_cidr_default_route_and_host_routes() -> None:
    table = cidr_table({"0.0.0.0/0": "v4-default", "::/0": "v6-default", "::1/128": "host6"})
    assert table.longest(addr("203.0.113.9")) == "v4-default"
    assert table.longest(addr("255.255.255.255")) == "v4-default"
    assert table.longest(addr("2001:db8::1")) == "v6-default"
    assert table.longest(addr("::1")) == "host6"
    assert table.longest(addr("::2")) == "v6-default"


def test_cidr_ipv4_and_ipv6_are_separate() -> None:
    # 192.0.2.0/24 as an integer is 0xC0000200; the IPv6 address ::c000:201 has the same
    # low bits and must not match it, nor must any IPv4 address match an IPv6 entry.
    table = cidr_table({"192.0.2.0/24": "v4", "::c000:200/120": "v6"})
    assert table.longest(addr("192.0.2.1")) == "v4"
    assert table.longest(addr("::c000:201")) == "v6"
    only_v4 = cidr_table({"0.0.0.0/0": "v4"})
    assert only_v4.longest(addr("::c000:201")) is None
    assert list(only_v4.every(addr("2001:db8::1"))) == []
    only_v6 = cidr_table({"::/0": "v6"})
    assert only_v6.longest(addr("192.0.2.1")) is None
    assert list(only_v6.every(addr("192.0.2.1"))) == []


def test_cidr_ipv4_mapped_ipv6_is_not_ipv4() -> None:
    table = cidr_table({"192.0.2.0/24": "v4"})
    assert table.longest(addr("::ffff:192.0.2.1")) is None


def test_cidr_empty_table() -> None:
    table: CidrTable[str] = CidrTable()
    assert not table
    assert table.longest(addr("192.0.2.1")) is None
    assert table.longest(addr("2001:db8::1")) is None
    assert list(table.every(addr("192.0.2.1"))) == []
    table.add(net("2001:db8::/32"), "x")
    assert table


def test_cidr_same_network_keeps_the_first_value_or_combines() -> None:
    table: CidrTable[str] = CidrTable()
    table.add(net("192.0.2.0/24"), "first")
    table.add(net("192.0.2.0/24"), "second")
    assert table.longest(addr("192.0.2.1")) == "first"
    masks: CidrTable[int] = CidrTable()
    masks.add(net("192.0.2.0/24"), 0b01, or_)
    masks.add(net("192.0.2.0/24"), 0b10, or_)
    masks.add(net("192.0.2.0/25"), 0b100, or_)
    assert masks.longest(addr("192.0.2.200")) == 0b11
    assert list(masks.every(addr("192.0.2.1"))) == [0b100, 0b11]


@settings(max_examples=200, deadline=None)
@given(
    networks=st.lists(
        st.one_of(
            st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
                lambda t: ipaddress.IPv4Network((t[0] >> (32 - t[1]) << (32 - t[1]), t[1]))
            ),
            st.tuples(
                st.integers(0, 2**128 - 1), st.sampled_from([0, 1, 32, 48, 64, 127, 128])
            ).map(lambda t: ipaddress.IPv6Network((t[0] >> (128 - t[1]) << (128 - t[1]), t[1]))),
        ),
        max_size=12,
    ),
    probe_bits=st.integers(0, 2**128 - 1),
    version=st.sampled_from([4, 6]),
    pick=st.integers(0, 100),
)
def test_cidr_longest_agrees_with_a_linear_scan(
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    probe_bits: int,
    version: int,
    pick: int,
) -> None:
    table: CidrTable[str] = CidrTable()
    for network in networks:
        table.add(network, str(network))
    # Probe either a random address or one inside a random entry.
    same_family = [n for n in networks if n.version == version]
    if same_family and pick % 2:
        base = same_family[pick % len(same_family)]
        probe: IPAddress = base.network_address + (probe_bits % base.num_addresses)
    else:
        probe = (
            ipaddress.IPv4Address(probe_bits % 2**32)
            if version == 4
            else ipaddress.IPv6Address(probe_bits)
        )
    containing = [n for n in networks if n.version == probe.version and probe in n]
    expected = str(max(containing, key=lambda n: n.prefixlen)) if containing else None
    assert table.longest(probe) == expected
    assert list(table.every(probe)) == sorted(
        {str(n) for n in containing}, key=lambda s: -ipaddress.ip_network(s).prefixlen
    )


# --------------------------------------------------------------------------------------------
# HostTable
# --------------------------------------------------------------------------------------------


def host_table(*patterns: str) -> HostTable[str]:
    table: HostTable[str] = HostTable()
    for pattern in patterns:
        table.add(pattern, pattern)
    return table


def test_host_exact_match_only_matches_the_name() -> None:
    table = host_table("api.partner.example")
    assert table.longest("api.partner.example") == "api.partner.example"
    assert table.longest("x.api.partner.example") is None
    assert table.longest("partner.example") is None
    assert table.longest("api.partner.example.evil.example") is None


def test_host_wildcard_matches_subdomains_not_the_apex() -> None:
    table = host_table("*.partner.example")
    assert table.longest("api.partner.example") == "*.partner.example"
    assert table.longest("a.b.c.partner.example") == "*.partner.example"
    assert table.longest("partner.example") is None
    assert table.longest("example") is None
    assert table.longest("evilpartner.example") is None
    assert table.longest("partner.example.evil.example") is None


def test_host_exact_beats_wildcard_and_the_longest_suffix_wins() -> None:
    table = host_table("*.example", "*.partner.example", "api.partner.example")
    assert table.longest("api.partner.example") == "api.partner.example"
    assert table.longest("www.partner.example") == "*.partner.example"
    assert table.longest("x.www.partner.example") == "*.partner.example"
    assert table.longest("partner.example") == "*.example"
    assert table.longest("example") is None


def test_host_exact_and_wildcard_of_the_same_name_are_different_entries() -> None:
    table = host_table("partner.example", "*.partner.example")
    assert table.longest("partner.example") == "partner.example"
    assert table.longest("www.partner.example") == "*.partner.example"
    assert list(table.every("partner.example")) == ["partner.example"]


def test_host_every_yields_exact_then_wildcards_most_specific_first() -> None:
    table = host_table("*.example", "*.partner.example", "api.partner.example")
    assert list(table.every("api.partner.example")) == [
        "api.partner.example",
        "*.partner.example",
        "*.example",
    ]
    assert list(table.every("other.example")) == ["*.example"]
    assert list(table.every("example")) == []


def test_host_patterns_are_normalised() -> None:
    table: HostTable[str] = HostTable()
    table.add("API.Partner.Example.", "exact")
    table.add(" *.CDN.Example ", "wild")
    assert table.longest("api.partner.example") == "exact"
    assert table.longest("img.cdn.example") == "wild"


def test_host_empty_table() -> None:
    table: HostTable[str] = HostTable()
    assert not table
    assert table.longest("example") is None
    assert list(table.every("a.example")) == []


def test_host_same_pattern_keeps_first_or_combines() -> None:
    table: HostTable[str] = HostTable()
    table.add("*.example", "first")
    table.add("*.example", "second")
    assert table.longest("a.example") == "first"
    masks: HostTable[int] = HostTable()
    masks.add("*.example", 1, or_)
    masks.add("*.EXAMPLE", 2, or_)
    assert masks.longest("a.example") == 3


# --------------------------------------------------------------------------------------------
# PolicyIndex
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Index:
    """A PolicyIndex with the users' groups it was built for (some versions fold them in)."""

    index: PolicyIndex
    groups_of: Mapping[str, frozenset[str]]


def make_index(
    policies: Sequence[EgressPolicy], groups_of: Mapping[str, frozenset[str]] | None = None
) -> Index:
    """Build an index; tolerant of whether the constructor takes the users' groups.

    As in a snapshot, every user a policy names is a user of the account (validation).
    """
    groups = {user: frozenset[str]() for p in policies for user in p.selector.users}
    groups.update(groups_of or {})
    takes_groups = len(inspect.signature(PolicyIndex).parameters) >= 2
    index = PolicyIndex(policies, groups) if takes_groups else PolicyIndex(policies)  # type: ignore[call-arg]
    return Index(index, groups)


def first_match(
    built: Index,
    *,
    user: str = "u0",
    device: str = "d0",
    protocol: str = "tcp",
    pop: str = "las",
    address: str | IPAddress = "192.0.2.1",
    hostname: str | None = None,
    port: int = 443,
) -> str | None:
    """The id of the first matching policy; fills whichever parameters first_match takes."""
    ip = addr(address) if isinstance(address, str) else address
    values = {
        "user": user,
        "groups": built.groups_of.get(user, frozenset()),
        "device": device,
        "protocol": protocol,
        "connected_pop": pop,
        "address": ip,
        "version": ip.version,
        "address_int": int(ip),
        "hostname": hostname,
        "port": port,
    }
    params = inspect.signature(built.index.first_match).parameters
    found = built.index.first_match(**{name: values[name] for name in params})
    return None if found is None else found.id


def pol(id: str, **fields: object) -> EgressPolicy:
    destinations = list(fields.pop("destinations", ()))  # type: ignore[call-overload]
    for key in ("users", "groups", "devices", "protocols", "connected_pops"):
        if key in fields:
            fields[key] = frozenset(fields[key])  # type: ignore[arg-type]
    if "ports" in fields:
        fields["ports"] = tuple(fields["ports"])  # type: ignore[arg-type]
    selector = Selector(
        networks=tuple(net(d) for d in destinations if "/" in d),
        hostnames=tuple(d for d in destinations if "/" not in d),
        **fields,  # type: ignore[arg-type]
    )
    return EgressPolicy(id=id, selector=selector, action=SharedAction())


def test_policy_index_empty() -> None:
    index = make_index([])
    assert first_match(index) is None
    assert first_match(index, address="2001:db8::1", hostname="a.example") is None


def test_policy_index_unconstrained_policy_matches_everything() -> None:
    index = make_index([pol("all")])
    for port in (1, 443, 65535):
        for address in ("192.0.2.1", "2001:db8::1"):
            assert first_match(index, port=port, address=address, hostname="x.example") == "all"


def test_policy_index_many_policies_lowest_bit_wins() -> None:
    # 100 policies, more than a machine word: only 37, 65 and 99 match, 37 wins.
    policies = [
        pol(f"p{i}", ports=[(443, 443)] if i in (37, 65, 99) else [(1, 1)]) for i in range(100)
    ]
    index = make_index(policies)
    assert first_match(index, port=443) == "p37"
    assert first_match(index, port=1) == "p0"
    # Without 37, the next one; only beyond 64 bits.
    policies[37] = pol("p37", ports=[(2, 2)])
    assert first_match(make_index(policies), port=443) == "p65"
    assert first_match(make_index(policies), port=2) == "p37"


def test_policy_index_lowest_bit_wins_across_fields() -> None:
    policies = [pol(f"user{i}", users={f"u{i}"}) for i in range(70)]
    policies.append(pol("catch-all"))
    policies.append(pol("too-late", users={"u69"}))
    index = make_index(policies)
    assert first_match(index, user="u69") == "user69"
    assert first_match(index, user="u5") == "user5"
    assert first_match(index, user="nobody") == "catch-all"


def test_policy_index_port_range_boundaries() -> None:
    index = make_index(
        [
            pol("one", ports=[(1, 1)]),
            pol("max", ports=[(65535, 65535)]),
            pol("band", ports=[(1024, 2048)]),
            pol("middle", ports=[(2, 65534)]),
        ]
    )
    expected = {
        1: "one",
        2: "middle",
        1023: "middle",
        1024: "band",
        2048: "band",
        2049: "middle",
        65534: "middle",
        65535: "max",
    }
    for port, policy_id in expected.items():
        assert first_match(index, port=port) == policy_id, port


def test_policy_index_full_port_range_and_single_ports() -> None:
    index = make_index([pol("all-ports", ports=[(1, 65535)])])
    for port in (1, 2, 32768, 65534, 65535):
        assert first_match(index, port=port) == "all-ports"
    index = make_index([pol("two", ports=[(80, 80), (443, 443)])])
    assert [first_match(index, port=p) for p in (79, 80, 81, 442, 443, 444)] == [
        None,
        "two",
        None,
        None,
        "two",
        None,
    ]


def test_policy_index_adjacent_and_overlapping_port_ranges() -> None:
    index = make_index(
        [
            pol("low", ports=[(100, 199)]),
            pol("high", ports=[(200, 299)]),
            pol("wide", ports=[(150, 250)]),
        ]
    )
    assert [first_match(index, port=p) for p in (99, 100, 149, 150, 199, 200, 250, 299, 300)] == [
        None,
        "low",
        "low",
        "low",
        "low",
        "high",
        "high",
        "high",
        None,
    ]


def test_policy_index_destination_is_cidr_or_hostname() -> None:
    index = make_index([pol("p", destinations=["192.0.2.0/25", "*.partner.example"])])
    assert first_match(index, address="192.0.2.1") == "p"
    assert first_match(index, address="192.0.2.200", hostname="api.partner.example") == "p"
    assert first_match(index, address="192.0.2.200", hostname="partner.example") is None
    assert first_match(index, address="192.0.2.200") is None
    assert first_match(index, address="2001:db8::1", hostname="www.partner.example") == "p"


def test_policy_index_ipv4_cidr_does_not_match_ipv6() -> None:
    index = make_index([pol("v4", destinations=["0.0.0.0/0"]), pol("v6", destinations=["::/0"])])
    assert first_match(index, address="192.0.2.1") == "v4"
    assert first_match(index, address="2001:db8::1") == "v6"
    assert first_match(index, address="::c000:201") == "v6"


def test_policy_index_hostname_patterns_exact_vs_wildcard() -> None:
    index = make_index(
        [pol("exact", destinations=["partner.example"]), pol("wild", destinations=["*.example"])]
    )
    assert first_match(index, hostname="partner.example") == "exact"
    assert first_match(index, hostname="www.partner.example") == "wild"
    assert first_match(index, hostname="example") is None


def test_policy_index_groups_any_of_and_unknown_user() -> None:
    groups_of = {
        "u0": frozenset({"eng"}),
        "u1": frozenset({"fin", "ops"}),
        "u2": frozenset(),
    }
    index = make_index([pol("fin-or-legal", groups={"fin", "legal"}), pol("rest")], groups_of)
    assert first_match(index, user="u1") == "fin-or-legal"
    assert first_match(index, user="u0") == "rest"
    assert first_match(index, user="u2") == "rest"
    assert first_match(index, user="stranger") == "rest"


def test_policy_index_each_field_narrows() -> None:
    index = make_index(
        [
            pol(
                "narrow",
                users={"u0"},
                devices={"d0"},
                protocols={"udp"},
                connected_pops={"jfk"},
                ports=[(443, 443)],
                destinations=["192.0.2.0/24"],
            ),
        ]
    )
    base = {
        "user": "u0",
        "device": "d0",
        "protocol": "udp",
        "pop": "jfk",
        "port": 443,
        "address": "192.0.2.9",
    }
    assert first_match(index, **base) == "narrow"  # type: ignore[arg-type]
    for key, other in (
        ("user", "u1"),
        ("device", "d1"),
        ("protocol", "tcp"),
        ("pop", "las"),
        ("port", 444),
        ("address", "198.51.100.1"),
    ):
        assert first_match(index, **{**base, key: other}) is None, key  # type: ignore[arg-type]


# Differential test: the compiled index agrees with evaluating each selector in order.

USERS = ["u0", "u1", "u2"]
GROUPS_OF = {"u0": frozenset({"g0"}), "u1": frozenset({"g1", "g2"}), "u2": frozenset()}
NETWORKS = [
    "192.0.2.0/24",
    "192.0.2.0/25",
    "192.0.2.128/26",
    "192.0.2.77/32",
    "198.51.100.0/24",
    "0.0.0.0/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "::/0",
]
HOSTNAMES = ["a.example", "*.example", "*.a.example", "b.a.example", "*.b.a.example"]
ADDRESSES = [
    "192.0.2.1",
    "192.0.2.77",
    "192.0.2.130",
    "192.0.2.200",
    "198.51.100.7",
    "203.0.113.1",
    "2001:db8::1",
    "2001:db8:1::1",
    "2001:db9::1",
]
FLOW_HOSTS = [None, "a.example", "b.a.example", "c.b.a.example", "example", "x.example", "z.org"]
PORT_POINTS = [1, 2, 79, 80, 81, 443, 1023, 1024, 65534, 65535]

port_ranges = st.lists(
    st.tuples(st.sampled_from(PORT_POINTS), st.sampled_from(PORT_POINTS)).map(
        lambda t: (min(t), max(t))
    ),
    max_size=2,
)
selectors = st.builds(
    Selector,
    users=st.frozensets(st.sampled_from(USERS), max_size=2),
    groups=st.frozensets(st.sampled_from(["g0", "g1", "g2", "g9"]), max_size=2),
    devices=st.frozensets(st.sampled_from(["d0", "d1"]), max_size=1),
    networks=st.lists(st.sampled_from(NETWORKS).map(net), max_size=2).map(tuple),
    hostnames=st.lists(st.sampled_from(HOSTNAMES), max_size=2).map(tuple),
    ports=port_ranges.map(tuple),
    protocols=st.frozensets(st.sampled_from(["tcp", "udp", "dns"]), max_size=2),
    connected_pops=st.frozensets(st.sampled_from(["las", "lax", "jfk"]), max_size=2),
)
policy_lists = st.lists(selectors, max_size=8).map(
    lambda sels: [
        EgressPolicy(id=f"p{i}", selector=s, action=SharedAction()) for i, s in enumerate(sels)
    ]
)


def _host_matches(pattern: str, hostname: str) -> bool:
    if pattern.startswith("*."):
        return hostname.endswith("." + pattern[2:])
    return hostname == pattern


def reference_first_match(
    policies: Sequence[EgressPolicy],
    *,
    user: str,
    device: str,
    protocol: str,
    pop: str,
    address: IPAddress,
    hostname: str | None,
    port: int,
) -> str | None:
    for p in policies:
        s = p.selector
        if s.users and user not in s.users:
            continue
        if s.groups and not s.groups & GROUPS_OF.get(user, frozenset()):
            continue
        if s.devices and device not in s.devices:
            continue
        if s.protocols and protocol not in s.protocols:
            continue
        if s.connected_pops and pop not in s.connected_pops:
            continue
        if s.ports and not any(low <= port <= high for low, high in s.ports):
            continue
        if s.networks or s.hostnames:
            by_cidr = any(n.version == address.version and address in n for n in s.networks)
            by_host = hostname is not None and any(_host_matches(h, hostname) for h in s.hostnames)
            if not (by_cidr or by_host):
                continue
        return p.id
    return None


@settings(max_examples=300, deadline=None)
@given(
    policies=policy_lists,
    user=st.sampled_from([*USERS, "stranger"]),
    device=st.sampled_from(["d0", "d1", "d2"]),
    protocol=st.sampled_from(["tcp", "udp", "dns"]),
    pop=st.sampled_from(["las", "lax", "jfk", "ord"]),
    address=st.sampled_from(ADDRESSES),
    hostname=st.sampled_from(FLOW_HOSTS),
    port=st.one_of(st.sampled_from(PORT_POINTS), st.integers(1, 65535)),
)
def test_policy_index_agrees_with_evaluating_selectors_in_order(
    policies: list[EgressPolicy],
    user: str,
    device: str,
    protocol: str,
    pop: str,
    address: str,
    hostname: str | None,
    port: int,
) -> None:
    index = make_index(policies, GROUPS_OF)
    flow = {
        "user": user,
        "device": device,
        "protocol": protocol,
        "pop": pop,
        "hostname": hostname,
        "port": port,
    }
    expected = reference_first_match(policies, address=addr(address), **flow)  # type: ignore[arg-type]
    assert first_match(index, address=address, **flow) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("port", [1, 65535])
def test_policy_index_through_decide_at_port_boundaries(port: int) -> None:
    from egressd.decide import decide

    from .builders import ALL_UP, dedicated, enterprise, flow, policy, snapshot

    p = policy("edge", dedicated("acme-jfk", "acme-lax"), ports=[(port, port)])
    snap = snapshot(enterprise("acme", policies=[p]))
    assert decide(snap, flow("acme", port=port), ALL_UP).rule == "policy:edge"
    neighbour = 2 if port == 1 else 65534
    assert decide(snap, flow("acme", port=neighbour), ALL_UP).rule == "R6"
