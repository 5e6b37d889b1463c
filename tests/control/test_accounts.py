"""Accounts, Settings › Network and dedicated locations through HTTP, with every R2 rule."""

from __future__ import annotations

from typing import Any

from .conftest import Api


def problem(response: Any, status: int, *, field: str | None = None, rule: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    if field is not None:
        assert body.get("field") == field, body
    if rule is not None:
        assert body.get("rule") == rule, body
    return body


def test_account_lifecycle_and_audit(world: Api) -> None:
    api = world
    accounts = api.get("/v1/accounts").json()
    assert [a["id"] for a in accounts] == ["acme", "globex"]
    assert accounts[0]["dedicated"]["status"] == "none"
    response = api.patch("/v1/accounts/globex", {"name": "Globex Inc"})
    assert response.status_code == 200 and response.json()["name"] == "Globex Inc"
    problem(api.post("/v1/accounts", {"id": "acme", "name": "again"}), 409, field="id")
    problem(api.post("/v1/accounts", {"id": "Bad Id", "name": "x"}), 422, field="id")
    problem(api.get("/v1/accounts/nobody"), 404)
    entries = api.get("/v1/audit", params={"account_id": "globex"}).json()
    update = entries[0]
    assert update["action"] == "update" and update["resource"] == "accounts/globex"
    assert update["before"]["name"] == "Globex" and update["after"]["name"] == "Globex Inc"
    assert update["actor"].startswith("admin")
    assert api.delete("/v1/accounts/globex").status_code == 204
    problem(api.get("/v1/accounts/globex"), 404)


def test_every_change_is_a_new_version(world: Api) -> None:
    api = world
    before = api.version()
    api.patch("/v1/accounts/acme/settings/network", {"proxy_udp": True})
    assert api.version() == before + 1
    api.get("/v1/accounts/acme")
    assert api.version() == before + 1


def test_network_settings_and_r3(world: Api) -> None:
    api = world
    assert api.get("/v1/accounts/acme/settings/network").json() == {
        "proxy_tcp": True, "proxy_udp": False, "fallback": "closed"}
    body = api.patch("/v1/accounts/acme/settings/network", {"proxy_udp": True, "fallback": "shared"})
    assert body.json() == {"proxy_tcp": True, "proxy_udp": True, "fallback": "shared"}
    problem(api.patch("/v1/accounts/acme/settings/network", {"proxy_tcp": False, "proxy_udp": True}),
            422, field="proxy_udp", rule="R3")
    # Turning TCP off takes UDP with it.
    body = api.patch("/v1/accounts/acme/settings/network", {"proxy_tcp": False})
    assert body.json()["proxy_udp"] is False
    problem(api.patch("/v1/accounts/acme/settings/network", {"fallback": "open"}), 422,
            field="fallback")


def test_r2_dedicated_is_enterprise_only(world: Api) -> None:
    problem(world.post("/v1/accounts/globex/locations", {"ipv4": "203.0.113.20"}), 422,
            field="plan", rule="R2")


def test_r2_active_only_with_two_cities(world: Api) -> None:
    api = world
    first = api.post("/v1/accounts/acme/locations",
                     {"ipv4": "203.0.113.20", "ipv6": "2001:db8:120::/48"})
    assert first.status_code == 201, first.text
    assert first.json() | {"assigned_at": None} == {
        "id": "lax", "account_id": "acme", "pop": "lax", "city": "Los Angeles",
        "ipv4": "203.0.113.20", "ipv6": "2001:db8:120::/48", "state": "pending",
        "assigned_at": None}
    # Pending: not in use until the administrator confirms allowlists (R2).
    assert api.get("/v1/accounts/acme").json()["dedicated"]["status"] == "needs-second-city"
    assert api.post("/v1/accounts/acme/locations/lax/confirm").json()["state"] == "active"
    # Burbank is another PoP in the same city: still one city.
    bur = api.post("/v1/accounts/acme/locations", {"ipv4": "203.0.113.25", "confirmed": True})
    assert bur.status_code == 201 and bur.json()["state"] == "active"
    dedicated = api.get("/v1/accounts/acme").json()["dedicated"]
    assert dedicated["status"] == "needs-second-city" and dedicated["cities"] == ["Los Angeles"]
    jfk = api.post("/v1/accounts/acme/locations", {"ipv4": "203.0.113.30", "confirmed": True})
    assert jfk.status_code == 201
    dedicated = api.get("/v1/accounts/acme").json()["dedicated"]
    assert dedicated["status"] == "active" and dedicated["cities"] == ["Los Angeles", "New York"]
    # Any number more.
    more = api.post("/v1/accounts/acme/locations", {"ipv4": "203.0.113.21", "id": "lax-two"})
    assert more.status_code == 201
    assert len(api.get("/v1/accounts/acme/locations").json()) == 4


def test_r2_an_address_belongs_to_one_account(world: Api) -> None:
    api = world
    api.post("/v1/accounts", {"id": "initech", "name": "Initech", "plan": "enterprise"})
    assert api.post("/v1/accounts/acme/locations", {"ipv4": "203.0.113.20"}).status_code == 201
    problem(api.post("/v1/accounts/initech/locations", {"ipv4": "203.0.113.20"}), 409,
            field="ipv4", rule="R2")
    problem(api.post("/v1/accounts/acme/locations", {"ipv4": "203.0.113.20", "id": "x"}), 409,
            field="ipv4", rule="R2")


def test_r2_only_inventory_addresses_at_one_pop(world: Api) -> None:
    api = world
    problem(api.post("/v1/accounts/acme/locations", {"ipv4": "192.0.2.1"}), 422, field="ipv4",
            rule="R2")
    problem(api.post("/v1/accounts/acme/locations", {"ipv4": "198.51.100.20"}), 422,
            field="ipv4", rule="R2")  # a shared address
    problem(api.post("/v1/accounts/acme/locations",
                     {"ipv4": "203.0.113.20", "ipv6": "2001:db8:130::/48"}), 422,
            field="ipv6", rule="R2")
    problem(api.post("/v1/accounts/acme/locations", {"ipv4": "not-an-ip"}), 422, field="ipv4")


def test_r2_release_quarantines(world: Api) -> None:
    api = world
    api.post("/v1/accounts", {"id": "initech", "name": "Initech", "plan": "enterprise"})
    api.post("/v1/accounts/acme/locations", {"ipv4": "203.0.113.20", "ipv6": "2001:db8:120::/48"})
    assert api.delete("/v1/accounts/acme/locations/lax").status_code == 204
    body = problem(api.post("/v1/accounts/initech/locations", {"ipv4": "203.0.113.20"}), 409,
                   field="ipv4", rule="R2")
    assert "quarantined until" in body["detail"]
    problem(api.post("/v1/accounts/initech/locations", {"ipv4": "203.0.113.21",
                                                        "ipv6": "2001:db8:120::/48"}),
            409, field="ipv6", rule="R2")
    # The account that released it may take it back.
    assert api.post("/v1/accounts/acme/locations", {"ipv4": "203.0.113.20"}).status_code == 201
    # With no cool-down, reassignment is immediate.
    assert api.delete("/v1/accounts/acme/locations/lax").status_code == 204
    assert api.put("/v1/settings", {"quarantine_days": 0}).status_code == 200
    api.delete("/v1/accounts/acme/locations/lax")
    assert api.post("/v1/accounts/acme/locations", {"ipv4": "203.0.113.21"}).status_code == 201
    assert api.delete("/v1/accounts/acme/locations/lax").status_code == 204
    assert api.post("/v1/accounts/initech/locations", {"ipv4": "203.0.113.21"}).status_code == 201


def test_r2_leaving_enterprise_needs_locations_released(world: Api) -> None:
    api = world
    api.post("/v1/accounts/acme/locations", {"ipv4": "203.0.113.20"})
    problem(api.patch("/v1/accounts/acme", {"plan": "free"}), 422, field="plan", rule="R2")
    api.delete("/v1/accounts/acme/locations/lax")
    assert api.patch("/v1/accounts/acme", {"plan": "free"}).status_code == 200


def test_problem_documents_for_auth(world: Api) -> None:
    response = world.client.get("/v1/accounts")
    body = problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    assert "token" in body["detail"]
    problem(world.client.get("/v1/accounts", headers={"Authorization": "Bearer nope"}), 401)


def test_problem_fields_name_the_request_input(world: Api) -> None:
    body = problem(world.put("/v1/settings", {"allow_destinations": ["not-a-net"]}), 422)
    assert body["field"] == "allow_destinations.0"
    body = problem(world.get("/v1/accounts", params={"limit": 0}), 422)
    assert body["field"] == "limit"
    body = problem(world.put("/v1/in-network-origins/cdn",
                             {"name": "cdn", "destinations": ["300.1.2.3/8"]}), 422)
    assert body["field"] == "destinations", body
    assert world.post("/v1/accounts/acme/locations", {"ipv4": "203.0.113.20"}).status_code == 201
    problem(world.delete("/v1/addresses/203.0.113.20"), 409, field="address", rule="R2")
