"""The lab's pure parts, without root: the address plan derived from the topology, the lab
DNS zone, the deployment edits the seed scenario makes, and the PoP resolver asking an
upstream from its shared address (R4) on loopback."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import socket
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from egressd.cli.lab_cmd import DEFAULT_TOPOLOGY
from egressd.lab.dns_server import DnsServer, Zone
from egressd.lab.plan import INTERNET, LabError, one_way_delay_ms, plan_lab
from egressd.lab.scenarios import Result, Row
from egressd.model.deployment import load_deployment
from egressd.pop.dns_service import DnsService
from egressd.pop.flowlog import FlowLog
from egressd.pop.resolver import ResolveError, Resolver

SEED = DEFAULT_TOPOLOGY.read_text(encoding="utf-8")


def test_the_seed_topology_plans_namespaces_links_and_delays() -> None:
    plan = plan_lab(SEED)
    assert set(plan.namespaces) == {INTERNET, "las", "lax", "jfk", "s-home", "p-branch", "p-office"}
    delays = {(link.a_role, link.b_role): link.delay_ms for link in plan.links}
    # las–lax ~370 km, las–jfk ~3,590 km, lax–jfk ~3,940 km; × 1.5 / 200 km per ms
    assert delays[("las", "lax")] == pytest.approx(2.8, abs=0.1)
    assert delays[("las", "jfk")] == pytest.approx(26.9, abs=0.2)
    assert delays[("lax", "jfk")] == pytest.approx(29.5, abs=0.2)
    assert delays[(INTERNET, "las")] == 0.0
    link_nets = [link.v4 for link in plan.links]
    assert len(set(link_nets)) == len(link_nets)  # no two links share a subnet


def test_the_internet_routes_every_address_a_pop_sends_from_back_to_it() -> None:
    plan = plan_lab(SEED)
    inet = {str(route.destination): route.interface for route in plan.namespaces[INTERNET].routes}
    assert inet["198.51.100.10/32"] == "las"  # shared
    assert inet["198.51.100.50/32"] == "lax"  # acme's dedicated Los Angeles address: home PoP (R7)
    assert inet["198.51.100.60/32"] == "jfk"
    # R9: each PoP's sub-range of acme's Los Angeles range is routed to that PoP
    assert inet["2001:db8:100:1::/64"] == "las"
    assert inet["2001:db8:100:2::/64"] == "lax"
    assert inet["2001:db8:200:3::/64"] == "jfk"
    las = plan.namespaces["las"]
    local = {str(route.destination) for route in las.routes if route.local}
    assert {"2001:db8:10::/48", "2001:db8:100:1::/64", "2001:db8:200:1::/64"} == local
    assert ipaddress.ip_network("198.51.100.50/32") not in las.loopback  # only lax holds it
    assert any(str(route.destination) == "198.51.100.224/28" for route in las.routes)  # the WAN link
    assert not any(str(route.destination) == "198.51.100.224/28" for route in plan.namespaces["lax"].routes)
    # the office behind a connector: reachable from nowhere, it reaches the PoPs' service addresses
    assert not any(route.destination.overlaps(ipaddress.ip_network("198.51.100.192/28"))
                   for ns in plan.namespaces.values() for route in ns.routes if route.destination.version == 4
                   and route.destination.prefixlen > 0)
    assert inet["203.0.113.2/32"] == "lax"
    office = {str(route.destination): route.interface for route in plan.namespaces["p-office"].routes}
    assert office == {"0.0.0.0/0": "inet"}


def test_the_deployment_part_is_what_the_pops_load_with_lines_kept() -> None:
    plan = plan_lab(SEED)
    assert not [line for line in plan.deployment_text.splitlines() if line.lstrip().startswith("[lab")]
    assert len(plan.deployment_text.splitlines()) == len(SEED.splitlines())
    assert load_deployment(plan.deployment_text).accounts["acme"].dedicated_active


@pytest.mark.parametrize(("change", "message"), [
    (lambda text: text.replace('pop = "las"\n  latitude', 'pop = "sfo"\n  latitude'), "unknown PoP 'sfo'"),
    (lambda text: plan_lab(text).deployment_text, "[lab] table is needed"),
    (lambda text: text.replace("[lab]\n", "[notlab]\n"), "unknown key 'notlab'"),
    (lambda text: text.replace('backbone = "203.0.113.2"\n', ""), "PoP lax needs an IPv4 `backbone`"),
    (lambda text: text.replace('kind = "dns"', 'kind = "smtp"'), "kind must be echo, in-network or dns"),
    (lambda text: text.replace('ipv4 = "198.51.100.50"', 'ipv4 = "198.51.100.10"'), "deployment part is invalid"),
])
def test_a_bad_topology_is_refused_with_the_reason(change: object, message: str) -> None:
    assert callable(change)
    with pytest.raises(LabError, match=message.replace("[", r"\[").replace("(", r"\(")):
        plan_lab(change(SEED))


def test_delay_follows_the_great_circle() -> None:
    assert one_way_delay_ms((0.0, 0.0), (0.0, 0.0), 1.5) == 0.0
    # a quarter of the equator, 10,007 km: 50 ms at stretch 1, 75 ms at 1.5
    assert one_way_delay_ms((0.0, 0.0), (0.0, 90.0), 1.0) == pytest.approx(50.0, abs=0.1)
    assert one_way_delay_ms((0.0, 0.0), (0.0, 90.0), 1.5) == pytest.approx(75.1, abs=0.1)


def test_zone_answers_records_wildcards_whoami_and_refuses_the_rest() -> None:
    plan = plan_lab(SEED)
    zone = Zone(plan.zone, {name: [str(a) for a in addresses] for name, addresses in plan.zone_records().items()})

    def ask(name: str, kind: str) -> dns.message.Message:
        wire, _seen = zone.answer(dns.message.make_query(name, kind).to_wire(), "198.51.100.10")
        assert wire is not None
        return dns.message.from_wire(wire)

    assert [r.to_text() for r in ask("echo.lab.egressd.test", "A").answer[0]] == ["203.0.113.100"]
    assert [r.to_text() for r in ask("echo.lab.egressd.test", "AAAA").answer[0]] == ["2001:db8:ffff::100"]
    assert [r.to_text() for r in ask("x1.echo.lab.egressd.test", "A").answer[0]] == ["203.0.113.100"]
    assert ask("whoami.lab.egressd.test", "TXT").answer[0][0].to_text() == '"198.51.100.10"'
    assert ask("nothing.lab.egressd.test", "A").rcode() == dns.rcode.NXDOMAIN
    assert ask("example.com", "A").rcode() == dns.rcode.REFUSED
    assert zone.answer(b"\x00\x01garbage", "198.51.100.10") == (None, {"error": "ShortHeader"})


def test_the_control_plane_sits_on_a_refused_control_address() -> None:
    plan = plan_lab(SEED)
    assert str(plan.control) == "203.0.113.250" and plan.control_url == "http://203.0.113.250:18070"
    assert ipaddress.ip_network("203.0.113.250/32") in plan.namespaces[INTERNET].loopback
    site = {str(route.destination): route.interface for route in plan.namespaces["s-home"].routes}
    assert site["203.0.113.250/32"] == "inet" and site["0.0.0.0/0"] == "pop"  # only that, directly
    with pytest.raises(LabError, match="must be in \\[deployment\\] control_addresses"):
        plan_lab(SEED.replace('control = "203.0.113.250"', 'control = "203.0.113.249"'))


def test_the_result_table_says_which_rows_differ() -> None:
    good = Row("ordinary site, IPv4", "echo 203.0.113.100", 4, "las", "lax", "198.51.100.50", "Los Angeles",
               "leaves lax", ok=True)
    bad = Row("UDP", "echo", 4, "las", "las", "198.51.100.10", "Las Vegas", "leaves lax from 198.51.100.50")
    text = Result([good, bad]).table()
    assert "FAIL: expected leaves lax from 198.51.100.50" in text and "1/2 rows ok" in text
    assert Result([good]).ok and not Result([good, bad]).ok and not Result([]).ok


async def test_the_pop_resolver_asks_its_upstream_from_the_shared_address() -> None:
    """R4 on loopback: the lab DNS server logs the source of the PoP resolver's queries."""
    zone = Zone("lab.egressd.test", {"echo.lab.egressd.test": ["203.0.113.100", "2001:db8:ffff::100"]})
    log = io.StringIO()
    server = DnsServer(zone, log)
    loop = asyncio.get_running_loop()
    from egressd.lab.dns_server import _Udp

    transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(server), local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        service = DnsService("tst", [(ipaddress.ip_address("127.0.0.1"), port)],
                             lambda version: ipaddress.ip_address("127.0.0.23") if version == 4 else None,
                             FlowLog.disabled())
        resolver = Resolver(service=service)
        found = await resolver.resolve("echo.lab.egressd.test", 80)
        assert set(map(str, found)) == {"203.0.113.100", "2001:db8:ffff::100"}
        asked = [json.loads(line) for line in log.getvalue().splitlines()]
        assert {entry["source"] for entry in asked} == {"127.0.0.23"}
        assert {entry["type"] for entry in asked} == {"A", "AAAA"}
        await resolver.resolve("echo.lab.egressd.test", 80)  # cached: not asked again
        assert len(log.getvalue().splitlines()) == 2
        with pytest.raises(ResolveError, match="no such name"):
            await resolver.resolve("missing.lab.egressd.test", 80)
    finally:
        transport.close()


async def test_an_unreachable_upstream_is_a_clear_resolve_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:  # bound, never answers
        hole.bind(("127.0.0.1", 0))
        service = DnsService("tst", [(ipaddress.ip_address("127.0.0.1"), hole.getsockname()[1])],
                             lambda version: None, FlowLog.disabled(), timeout=0.3)
        with pytest.raises(ResolveError, match=r"cannot resolve .*127\.0\.0\.1: "):
            await Resolver(service=service).resolve("echo.lab.egressd.test", 80)


def test_default_topology_is_installed_with_the_package() -> None:
    assert Path(DEFAULT_TOPOLOGY).is_file() and DEFAULT_TOPOLOGY.parent.name == "data"
