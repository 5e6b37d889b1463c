"""The tunnel protocol's data and the PoP's judgement of an announcement, without sockets:
tokens, route parsing, verdicts, which announced routes a PoP accepts (declared for the
connector, clear of other accounts' routes), hostname routes decided before resolution
(R4), and connectors in deployment files."""

from __future__ import annotations

import ipaddress

import pytest

from egressd.decide import Flow, Path, decide_private_name
from egressd.model.deployment import DeploymentError, load_deployment
from egressd.pop.tunnel_routes import check_announcement
from egressd.protocols.tunnel import (
    Announcement,
    Verdict,
    connector_of,
    host_matches,
    new_token,
    parse_routes,
    token_digest,
)

DIGEST = "ab" * 32

DEPLOYMENT = f"""
[[data_centers]]
code = "las"
city = "Las Vegas"
country = "US"
latitude = 36.17
longitude = -115.14
shared_ipv4 = ["198.51.100.10"]

[[accounts]]
id = "acme"

  [[accounts.connectors]]
  id = "acme-office"
  token_sha256 = "{DIGEST}"

  [[accounts.private_routes]]
  id = "office"
  via = "acme-office"
  destinations = ["10.20.0.0/16", "*.corp.acme.example"]

  [[accounts.private_routes]]
  id = "branch"
  kind = "wan"
  via = "mpls"
  destinations = ["10.40.0.0/16", "branch.acme.example"]

[[accounts]]
id = "globex"

  [[accounts.private_routes]]
  id = "lab"
  via = "globex-office"
  destinations = ["10.20.128.0/24", "db.globex.example"]
"""


def test_tokens() -> None:
    token = new_token("acme-office")
    assert connector_of(token) == "acme-office" and token != new_token("acme-office")
    assert len(token_digest(token)) == 64
    for bad in ("", "egdt.acme", "egdt..x", "other.acme.x", "egdt.Acme.x", "egdt.a.b.c"):
        assert connector_of(bad) is None
    with pytest.raises(ValueError, match="invalid connector id"):
        new_token("Not Valid")


def test_parse_routes() -> None:
    parsed = parse_routes(" 10.1.0.0/16, db.corp.example.,*.Corp.Example,2001:db8::/32 ")
    assert [str(n) for n in parsed.networks] == ["10.1.0.0/16", "2001:db8::/32"]
    assert parsed.hostnames == ("db.corp.example", "*.corp.example")
    assert parse_routes(parsed.header()) == parsed
    assert parse_routes("").empty
    for bad, message in (("10.1.0.1/16", "host bits"), ("10.1.0.0/33", "10.1.0.0/33"),
                         ("bad host!", "neither"), ("*.*.x", "neither"),
                         (",".join(["10.0.0.0/8"] * 300), "at most")):
        with pytest.raises(ValueError, match=message):
            parse_routes(bad)
    assert host_matches("*.corp.example", "a.b.corp.example")
    assert not host_matches("*.corp.example", "corp.example")
    assert host_matches("db.corp.example", "DB.corp.example.")


def test_verdicts_round_trip_and_garbage_is_refused() -> None:
    verdict = Verdict(True, "las", "acme-office", "acme", ("10.20.0.0/16",),
                      (("10.30.0.0/16", "not declared"),))
    assert Verdict.decode(verdict.encode()) == verdict
    for garbage in (b"", b"[]", b"{}", b'{"accepted": "yes"}', b"\xff",
                    b'{"accepted": true, "refused": [{"route": 1}]}'):
        with pytest.raises(ValueError):
            Verdict.decode(garbage)


def test_the_pop_accepts_only_declared_routes_clear_of_other_accounts() -> None:
    snapshot = load_deployment(DEPLOYMENT)
    connector = snapshot.connectors["acme-office"]
    assert connector.account == "acme" and connector.token_sha256 == DIGEST
    # Nothing announced: everything declared for this connector (not the WAN route). The
    # declared 10.20.0.0/16 contains globex's 10.20.128.0/24, so it is refused whole.
    everything = check_announcement(snapshot, connector, Announcement())
    assert everything.accepted == ("*.corp.acme.example",)
    assert everything.refused == (("10.20.0.0/16", "overlaps a private route of another account"),)
    # Parts of it are fine; the conflict (with the other account's name) is for the PoP's
    # log only.
    checked = check_announcement(snapshot, connector, parse_routes(
        "10.20.1.0/24,10.20.128.0/25,10.30.0.0/16,10.40.0.0/24,db.corp.acme.example,"
        "db.globex.example,*.globex.example,other.example"))
    assert checked.accepted == ("10.20.1.0/24", "db.corp.acme.example")
    reasons = dict(checked.refused)
    assert reasons["10.20.128.0/25"] == "overlaps a private route of another account"
    assert reasons["db.globex.example"] == "overlaps a private route of another account"
    assert reasons["*.globex.example"] == "overlaps a private route of another account"
    assert "not declared for connector acme-office" in reasons["10.30.0.0/16"]
    assert "not declared" in reasons["10.40.0.0/24"]  # a WAN route is not the connector's
    assert "not declared" in reasons["other.example"]
    assert "globex" not in " ".join(reasons.values())
    assert dict(checked.conflicts)["10.20.128.0/25"] == "globex/lab"


def test_whole_declared_route_overlapping_another_account_is_refused() -> None:
    snapshot = load_deployment(DEPLOYMENT)
    checked = check_announcement(snapshot, snapshot.connectors["acme-office"],
                                 parse_routes("10.20.0.0/16"))
    assert checked.accepted == ()
    assert checked.refused == (("10.20.0.0/16", "overlaps a private route of another account"),)


def test_hostname_routes_are_decided_before_resolution() -> None:
    snapshot = load_deployment(DEPLOYMENT)

    def flow(account: str, hostname: str) -> Flow:
        return Flow(account=account, user="", device="", connected_pop="las", protocol="tcp",
                    address=ipaddress.IPv4Address(0), port=443, hostname=hostname)

    decision = decide_private_name(snapshot, flow("acme", "DB.corp.acme.example."))
    assert decision is not None
    assert (decision.rule, decision.path, decision.route, decision.via) == (
        "R4", Path.PRIVATE_ROUTE, "office", "acme-office")
    assert decision.source_address == ipaddress.IPv4Address("198.51.100.10")  # never dedicated
    assert decide_private_name(snapshot, flow("acme", "branch.acme.example")) is None  # WAN
    assert decide_private_name(snapshot, flow("acme", "www.example")) is None
    assert decide_private_name(snapshot, flow("globex", "db.corp.acme.example")) is None


def test_connectors_in_deployment_files_are_validated() -> None:
    duplicate = DEPLOYMENT + f"""
  [[accounts.connectors]]
  id = "acme-office"
  token_sha256 = "{DIGEST}"

  [[accounts.connectors]]
  id = "short"
  token_sha256 = "abc"
  colour = "red"
"""
    with pytest.raises(DeploymentError) as error:
        load_deployment(duplicate)
    text = str(error.value)
    assert "connector id already used by account 'acme'" in text
    assert "accounts[globex].connectors[short].token_sha256: must be 64 hex digits" in text
    assert "unknown key 'colour'" in text
