"""Tunnel connectors through the API (issue 6): create with a token shown once and kept
as a digest, the snapshot the PoPs receive, status from the PoPs' reports, token
re-issue, delete, audit without secrets, scopes."""

from __future__ import annotations

import json

from egressd.protocols.tunnel import connector_of, token_digest

from .conftest import Api
from .test_accounts import problem
from .test_identity import account_in, audit, published

A = "/v1/accounts/acme"
T = f"{A}/tunnels"


def test_tunnel_lifecycle(world: Api) -> None:
    api = world
    assert api.get(T).json() == []
    assert api.post(f"{A}/private-routes", {"id": "office", "kind": "tunnel", "via": "office-1",
                                            "destinations": ["10.20.0.0/16"]}).status_code == 201
    before = api.version()
    created = api.post(T, {"id": "office-1"})
    assert created.status_code == 201, created.text
    body = created.json()
    token = body.pop("token")
    assert connector_of(token) == "office-1"
    assert body["status"] == "disconnected" and body["attached"] == []
    assert body["declared_routes"] == ["office"] and body["account_id"] == "acme"
    assert api.version() == before + 1
    # The PoPs receive the digest, never the token.
    connectors = account_in(published(api), "acme")["connectors"]
    assert connectors == [{"id": "office-1", "token_sha256": token_digest(token)}]
    # Listing and reading never show a token again; the audit keeps no secret either.
    assert "token" not in api.get(f"{T}/office-1").json()
    assert [item["id"] for item in api.get(T).json()] == ["office-1"]
    entry = audit(api)[0]
    assert entry["resource"] == "accounts/acme/tunnels/office-1" and entry["action"] == "create"
    assert token not in json.dumps(entry) and token_digest(token) not in json.dumps(entry)

    problem(api.post(T, {"id": "office-1"}), 409, field="id")
    problem(api.post(T, {"id": "Bad_Id"}), 422, field="id")
    problem(api.post(T, {"id": "x", "extra": 1}), 422)
    problem(api.get(f"{T}/nope"), 404)
    # Ids are deployment-wide: another account cannot take it.
    problem(api.post("/v1/accounts/globex/tunnels", {"id": "office-1"}), 409, field="id")
    problem(api.get("/v1/accounts/globex/tunnels/office-1"), 404)

    # A new token replaces the old one in the snapshot.
    reissued = api.post(f"{T}/office-1/token")
    assert reissued.status_code == 200, reissued.text
    new = reissued.json()["token"]
    assert new != token and connector_of(new) == "office-1"
    assert account_in(published(api), "acme")["connectors"][0]["token_sha256"] == token_digest(new)
    assert audit(api)[0]["resource"] == "accounts/acme/tunnels/office-1/token"

    assert api.delete(f"{T}/office-1").status_code == 204
    assert api.get(T).json() == []
    assert "connectors" not in account_in(published(api), "acme")
    assert audit(api)[0]["action"] == "delete"
    problem(api.delete(f"{T}/office-1"), 404)


def test_status_comes_from_the_pops_reports(world: Api) -> None:
    api = world
    assert api.post(T, {"id": "office-1"}).status_code == 201
    pop = api.token("pop", name="pop-las")
    report = {"up": ["las", "lax"], "rtt_ms": {"lax": 1.5},
              "tunnels": [{"connector": "office-1", "account": "acme", "peer": "192.0.2.7:40000",
                           "since": 1_790_000_000.0, "routes": ["10.20.0.0/16"]}]}
    assert api.put("/v1/pops/las/health", report, token=pop).status_code == 204
    assert api.put("/v1/pops/lax/health", {**report, "tunnels": []}, token=pop).status_code == 204
    shown = api.get(f"{T}/office-1").json()
    assert shown["status"] == "connected"
    assert [item["pop"] for item in shown["attached"]] == ["las"]
    assert shown["attached"][0]["peer"] == "192.0.2.7:40000"
    assert shown["announced"] == ["10.20.0.0/16"]
    # The connector's own view: the PoPs with a tunnel listener, by its token.
    token = api.post(f"{T}/office-1/token").json()["token"]
    listen = {**report, "tunnels": [], "tunnel_listen": "las@192.0.2.10:7444"}
    assert api.put("/v1/pops/las/health", listen, token=pop).status_code == 204
    listed = api.client.get("/v1/tunnel/pops", headers={"Authorization": f"Bearer {token}"})
    assert listed.status_code == 200, listed.text
    assert listed.json() == [{"pop": "las", "address": "las@192.0.2.10:7444"}]
    for header in ({}, {"Authorization": f"Bearer {token[:-1]}x"}, {"Authorization": "Bearer x"},
                   {"Authorization": f"Bearer {api.admin}"}):
        problem(api.client.get("/v1/tunnel/pops", headers=header), 401)
    problem(api.put("/v1/pops/las/health", {**listen, "tunnel_listen": "no port"}, token=pop), 422)
    # A malformed report is refused, not stored.
    bad = {**report, "tunnels": [{"connector": "Not Valid", "account": "acme", "peer": "x",
                                  "since": 0, "routes": []}]}
    problem(api.put("/v1/pops/las/health", bad, token=pop), 422)


def test_scopes(world: Api) -> None:
    api = world
    acme = api.token("account", "acme")
    globex = api.token("account", "globex")
    created = api.post(T, {"id": "office-2"}, token=acme)
    assert created.status_code == 201, created.text
    problem(api.get(T, token=globex), 403)
    problem(api.post(f"{T}/office-2/token", token=globex), 403)
    problem(api.delete(f"{T}/office-2", token=globex), 403)
    pop = api.token("pop", name="pop-las")
    problem(api.post(T, {"id": "office-3"}, token=pop), 403)
    assert api.delete(f"{T}/office-2", token=acme).status_code == 204
