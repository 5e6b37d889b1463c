"""Egress policies (R6), their order, private routes (R4) and in-network origins through HTTP."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Any

import pytest

from egressd.decide import Flow, HealthView, decide
from egressd.model.deployment import load_document

from .conftest import Api
from .test_accounts import problem
from .test_identity import account_in, audit, published

A = "/v1/accounts/acme"
P = f"{A}/policies"

BANK: dict[str, Any] = {
    "id": "bank", "name": "Finance's bank allowlists New York", "groups": ["finance"],
    "destinations": ["*.bank.example", "93.184.216.0/24"], "ports": ["443", 8443],
    "protocols": ["tcp"], "action": "dedicated", "primary": "jfk", "secondary": "lax",
    "ipv6": "jfk",
}


@pytest.fixture
def acme(world: Api) -> Api:
    """acme with active dedicated egress in Los Angeles (lax, bur without IPv6) and New York
    (jfk), group finance, users alice (finance) and bob, and a device of alice's."""
    api = world
    for body in ({"ipv4": "203.0.113.20", "ipv6": "2001:db8:120::/48", "confirmed": True},
                 {"ipv4": "203.0.113.30", "ipv6": "2001:db8:130::/48", "confirmed": True},
                 {"ipv4": "203.0.113.25", "confirmed": True}):
        assert api.post(f"{A}/locations", body).status_code == 201
    assert api.post(f"{A}/groups", {"name": "finance"}).status_code == 201
    assert api.post(f"{A}/users", {"name": "alice", "groups": ["finance"]}).status_code == 201
    assert api.post(f"{A}/users", {"name": "bob"}).status_code == 201
    assert api.post(f"{A}/devices", {"user": "alice", "id": "alice-laptop"}).status_code == 201
    return api


def expected_out(body: dict[str, Any], position: int) -> dict[str, Any]:
    out = {"name": "", "users": [], "groups": [], "devices": [], "destinations": [], "ports": [],
           "protocols": [], "connected_pops": [], "primary": None, "secondary": None,
           "ipv6": None, **body, "position": position}
    out["ports"] = [str(port) for port in out["ports"]]
    return out


def test_policy_lifecycle_and_audit(acme: Api) -> None:
    api = acme
    assert api.get(P).json() == []
    before = api.version()
    response = api.post(P, BANK)
    assert response.status_code == 201, response.text
    assert response.json() == expected_out(BANK, 0)
    assert api.version() == before + 1
    assert api.get(f"{P}/bank").json() == expected_out(BANK, 0)
    # Stored and published in the deployment file's schema.
    [policy] = account_in(published(api), "acme")["policies"]
    assert policy == {**{k: v for k, v in BANK.items()}, "ports": ["443", "8443"]}
    entry = audit(api)[0]
    assert entry["action"] == "create" and entry["resource"] == "accounts/acme/policies/bank"
    assert entry["before"] is None and entry["after"]["primary"] == "jfk"

    problem(api.post(P, BANK), 409, field="id")
    problem(api.post(P, {**BANK, "id": "Bad Id"}), 422, field="id")
    problem(api.post(P, {**BANK, "id": "order"}), 422, field="id")
    problem(api.post(P, {**BANK, "id": "x", "selector": []}), 422, field="selector")
    problem(api.post(P, {**BANK, "id": "x", "action": "block"}), 422, field="action")
    problem(api.get(f"{P}/nope"), 404)
    problem(api.get("/v1/accounts/nobody/policies"), 404)

    # PUT replaces the whole policy (absent selectors match anything again).
    replacement = {"name": "all of finance", "groups": ["finance"], "action": "dedicated",
                   "primary": "lax", "secondary": "shared"}
    response = api.put(f"{P}/bank", replacement)
    assert response.status_code == 200, response.text
    assert response.json() == expected_out({**replacement, "id": "bank"}, 0)
    entry = audit(api)[0]
    assert entry["action"] == "update" and entry["before"]["primary"] == "jfk"
    assert entry["after"]["primary"] == "lax" and "destinations" not in entry["after"]
    problem(api.put(f"{P}/bank", {**replacement, "id": "other"}), 422, field="id")
    assert api.put(f"{P}/bank", {**replacement, "id": "bank"}).status_code == 200
    problem(api.put(f"{P}/nope", replacement), 404)

    # PATCH changes the given fields; null clears a selector; shared drops the locations.
    response = api.patch(f"{P}/bank", {"ports": [443], "users": ["alice"], "ipv6": "jfk"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ports"] == ["443"] and body["users"] == ["alice"] and body["ipv6"] == "jfk"
    assert body["primary"] == "lax" and body["groups"] == ["finance"]
    body = api.patch(f"{P}/bank", {"users": None, "action": "shared"}).json()
    assert body["users"] == [] and body["action"] == "shared"
    assert (body["primary"], body["secondary"], body["ipv6"]) == (None, None, None)
    problem(api.patch(f"{P}/bank", {"primary": "lax"}), 422, field="primary", rule="R6")
    problem(api.patch(f"{P}/bank", {"action": "dedicated"}), 422, field="primary", rule="R6")
    problem(api.patch(f"{P}/bank", {"action": None}), 422, field="action")
    problem(api.patch(f"{P}/nope", {"name": "x"}), 404)

    before = api.version()
    assert api.delete(f"{P}/bank").status_code == 204
    assert api.version() == before + 1
    entry = audit(api)[0]
    assert entry["action"] == "delete" and entry["after"] is None
    assert entry["before"]["id"] == "bank" and entry["before"]["action"] == "shared"
    problem(api.delete(f"{P}/bank"), 404)
    assert account_in(published(api), "acme")["policies"] == []


# (change to BANK, field, rule, caught by the snapshot loader rather than the API itself)
BAD: list[tuple[dict[str, Any], str, str | None, bool]] = [
    ({"primary": "nowhere"}, "primary", "R6", True),
    ({"secondary": "jfk"}, "secondary", "R6", True),  # equal to the primary
    ({"secondary": "nowhere"}, "secondary", "R6", True),
    ({"ipv6": "bur"}, "ipv6", "R9", True),  # bur has no IPv6 range
    ({"ipv6": "nowhere"}, "ipv6", "R6", True),
    ({"users": ["nobody"]}, "users", None, True),
    ({"devices": ["nope"]}, "devices", None, True),
    ({"connected_pops": ["zzz"]}, "connected_pops", None, True),
    ({"destinations": ["10.0.0.1/8"]}, "destinations", None, True),  # host bits set
    ({"destinations": ["www.*.example"]}, "destinations", None, True),
    ({"ports": ["70000"]}, "ports", None, True),
    ({"ports": ["https"]}, "ports", None, True),
    ({"protocols": ["dns"]}, "protocols", "R4", True),
    ({"protocols": ["icmp"]}, "protocols", None, True),
    ({"groups": ["nobody"]}, "groups", None, False),  # the document has no list of groups
    ({"secondary": None}, "secondary", "R6", False),
    ({"action": "shared"}, "primary", "R6", False),  # locations belong to dedicated only
]


def test_bad_references_are_422_naming_field_and_rule(acme: Api) -> None:
    api = acme
    before = api.version()
    for change, field, rule, from_loader in BAD:
        body = {key: value for key, value in {**BANK, "id": "p1", **change}.items()
                if value is not None}
        found = problem(api.post(P, body), 422, field=field, rule=rule)
        if from_loader:  # the full document path stays in `errors`
            paths = [error["field"] for error in found["errors"]]
            assert f"accounts[acme].policies[p1].{field}" in paths, (change, found)
    # The same checks guard PUT and PATCH; nothing was written by any of it.
    assert api.post(P, {**BANK, "id": "p1"}).status_code == 201
    problem(api.put(f"{P}/p1", {**BANK, "id": "p1", "primary": "nowhere"}), 422, field="primary",
            rule="R6")
    problem(api.patch(f"{P}/p1", {"secondary": "jfk"}), 422, field="secondary", rule="R6")
    problem(api.patch(f"{P}/p1", {"destinations": ["not a host"]}), 422, field="destinations")
    assert api.get(f"{P}/p1").json() == expected_out({**BANK, "id": "p1"}, 0)
    assert api.version() == before + 1
    # Dedicated egress is for enterprise accounts (R2).
    problem(api.post("/v1/accounts/globex/policies", {**BANK, "groups": []}), 422,
            field="action", rule="R2")
    shared = api.post("/v1/accounts/globex/policies", {"id": "all", "action": "shared"})
    assert shared.status_code == 201


def test_order_first_match_wins_in_the_published_snapshot(acme: Api) -> None:
    api = acme
    # Both match alice's HTTPS flow to the bank; the first one decides.
    assert api.post(P, BANK).status_code == 201
    catch_all = {"id": "la", "action": "dedicated", "primary": "lax", "secondary": "jfk"}
    assert api.post(P, catch_all).status_code == 201
    response = api.post(P, {"id": "bob-shared", "users": ["bob"], "action": "shared",
                            "position": 0})
    assert response.status_code == 201 and response.json()["position"] == 0
    problem(api.post(P, {"id": "far", "action": "shared", "position": 4}), 422,
            field="position")
    assert [(p["id"], p["position"]) for p in api.get(P).json()] == [
        ("bob-shared", 0), ("bank", 1), ("la", 2)]

    def egress() -> tuple[str, str]:
        document = published(api)
        snapshot = load_document(document, version=1, now=datetime.now(UTC))
        flow = Flow(account="acme", user="alice", device="alice-laptop", connected_pop="las",
                    protocol="tcp", address=ipaddress.ip_address("93.184.216.34"), port=443,
                    hostname="www.bank.example")
        decision = decide(snapshot, flow, HealthView(up=frozenset({"las", "lax", "jfk", "bur"})))
        return decision.rule, str(decision.source_address)

    assert egress() == ("policy:bank", "203.0.113.30")
    before = api.version()
    response = api.put(f"{P}/order", {"ids": ["la", "bob-shared", "bank"]})
    assert response.status_code == 200, response.text
    assert [(p["id"], p["position"]) for p in response.json()] == [
        ("la", 0), ("bob-shared", 1), ("bank", 2)]
    assert api.version() == before + 1
    assert [p["id"] for p in account_in(published(api), "acme")["policies"]] == [
        "la", "bob-shared", "bank"]
    assert egress() == ("policy:la", "203.0.113.20")
    entry = audit(api)[0]
    assert entry["action"] == "reorder" and entry["resource"] == "accounts/acme/policies"
    assert entry["before"] == {"order": ["bob-shared", "bank", "la"]}
    assert entry["after"] == {"order": ["la", "bob-shared", "bank"]}

    # Not a permutation of the existing ids: 422 naming the field, nothing changes.
    for ids in (["la", "bank"], ["la", "bob-shared", "bank", "nope"],
                ["la", "la", "bob-shared", "bank"], ["la", "la", "bank"]):
        body = problem(api.put(f"{P}/order", {"ids": ids}), 422, field="ids")
        assert "nope" in body["detail"] if "nope" in ids else True
    problem(api.put(f"{P}/order", {}), 422, field="ids")
    assert [p["id"] for p in api.get(P).json()] == ["la", "bob-shared", "bank"]

    # Deleting closes the gap; PUT keeps the place.
    assert api.delete(f"{P}/bob-shared").status_code == 204
    assert [(p["id"], p["position"]) for p in api.get(P).json()] == [("la", 0), ("bank", 1)]
    assert api.put(f"{P}/la", {"action": "shared"}).json()["position"] == 0
    assert api.put(f"{P}/order", {"ids": ["bank", "la"]}).status_code == 200
    assert egress() == ("policy:bank", "203.0.113.30")


def test_private_routes(acme: Api) -> None:
    api = acme
    R = f"{A}/private-routes"
    assert api.get(R).json() == []
    route = {"id": "office", "kind": "tunnel", "via": "connector-1",
             "destinations": ["10.20.0.0/16", "*.corp.example"]}
    before = api.version()
    response = api.post(R, route)
    assert response.status_code == 201, response.text
    assert response.json() == route and api.version() == before + 1
    assert api.post(R, {"id": "wan", "kind": "wan", "via": "mpls",
                        "destinations": ["10.30.0.0/16"]}).status_code == 201
    assert [r["id"] for r in api.get(R).json()] == ["office", "wan"]
    assert api.get(f"{R}/office").json() == route
    assert account_in(published(api), "acme")["private_routes"][0] == route
    entry = audit(api)[1]
    assert entry["resource"] == "accounts/acme/private-routes/office"
    assert entry["after"] == route

    problem(api.post(R, route), 409, field="id")
    problem(api.post(R, {**route, "id": "x", "destinations": []}), 422, field="destinations")
    problem(api.post(R, {**route, "id": "x", "destinations": ["10.20.0.1/16"]}), 422,
            field="destinations")
    problem(api.post(R, {**route, "id": "x", "kind": "vpn"}), 422, field="kind")
    problem(api.get(f"{R}/nope"), 404)

    # A flow to a route's destination leaves from shared, even under a dedicated policy (R4).
    assert api.post(P, {"id": "all", "action": "dedicated", "primary": "lax",
                        "secondary": "jfk"}).status_code == 201
    snapshot = load_document(published(api), version=1, now=datetime.now(UTC))
    flow = Flow(account="acme", user="alice", device="alice-laptop", connected_pop="las",
                protocol="tcp", address=ipaddress.ip_address("10.20.1.2"), port=22)
    decision = decide(snapshot, flow, HealthView(up=frozenset({"las", "lax", "jfk"})))
    assert (decision.rule, decision.route, str(decision.source_address)) == (
        "R4", "office", "198.51.100.10")

    changed = {**route, "destinations": ["10.21.0.0/16"]}
    response = api.put(f"{R}/office", changed)
    assert response.status_code == 200 and response.json() == changed
    entry = audit(api)[0]
    assert entry["before"] == route and entry["after"] == changed
    problem(api.put(f"{R}/office", {**changed, "destinations": ["nope nope"]}), 422,
            field="destinations")
    problem(api.put(f"{R}/office", {**changed, "id": "other"}), 422, field="id")
    problem(api.put(f"{R}/nope", {**changed, "id": None}), 404)
    assert api.delete(f"{R}/office").status_code == 204
    entry = audit(api)[0]
    assert entry["action"] == "delete" and entry["before"] == changed
    problem(api.delete(f"{R}/office"), 404)
    assert [r["id"] for r in account_in(published(api), "acme")["private_routes"]] == ["wan"]


def test_in_network_origins(acme: Api) -> None:
    api = acme
    origin = {"name": "cdn", "destinations": ["104.16.0.0/13", "*.cdn.example"]}
    response = api.put("/v1/in-network-origins/cdn", origin)
    assert response.status_code == 200, response.text
    assert api.get("/v1/in-network-origins").json() == [origin]
    assert published(api)["in_network_origins"] == [origin]
    body = problem(api.put("/v1/in-network-origins/cdn", {**origin, "destinations": ["bad host"]}),
                   422)
    assert body["field"].endswith("destinations")
    problem(api.put("/v1/in-network-origins/cdn", {**origin, "name": "other"}), 422, field="name")
    problem(api.put("/v1/in-network-origins/cdn", origin, token=api.token("account", "acme")),
            403)
    assert api.delete("/v1/in-network-origins/cdn").status_code == 204
    problem(api.delete("/v1/in-network-origins/cdn"), 404)


def test_account_tokens_reach_their_own_account_only(acme: Api) -> None:
    api = acme
    assert api.post(P, {"id": "p1", "action": "shared"}).status_code == 201
    route = {"id": "r1", "via": "c1", "destinations": ["10.0.0.0/8"]}
    assert api.post(f"{A}/private-routes", route).status_code == 201
    calls: list[tuple[str, str, Any]] = [
        ("get", P, None),
        ("post", P, {"id": "p2", "action": "shared"}),
        ("get", f"{P}/p1", None),
        ("put", f"{P}/p1", {"action": "shared"}),
        ("patch", f"{P}/p1", {"name": "x"}),
        ("delete", f"{P}/p1", None),
        ("put", f"{P}/order", {"ids": ["p1"]}),
        ("get", f"{A}/private-routes", None),
        ("post", f"{A}/private-routes", {**route, "id": "r2"}),
        ("get", f"{A}/private-routes/r1", None),
        ("put", f"{A}/private-routes/r1", route),
        ("delete", f"{A}/private-routes/r1", None),
    ]
    for token in (api.token("account", "globex"), api.token("pop")):
        for method, path, body in calls:
            kwargs = {"json": body} if body is not None else {}
            problem(api.client.request(method, path, headers=api.headers(token), **kwargs), 403)
    own = api.token("account", "acme")
    assert api.get(P, token=own).status_code == 200
    assert api.patch(f"{P}/p1", {"name": "mine"}, token=own).status_code == 200
    assert [p["id"] for p in api.get(P).json()] == ["p1"]
    assert [r["id"] for r in api.get(f"{A}/private-routes").json()] == ["r1"]
