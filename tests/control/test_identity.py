"""Users, groups, devices, enrollment tokens and self-enrollment through HTTP."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update

from egressd.control.tables import EnrollmentTokenRow

from .conftest import Api
from .test_accounts import problem

A = "/v1/accounts/acme"


def audit(api: Api, account: str = "acme") -> list[dict[str, Any]]:
    response = api.get("/v1/audit", params={"account_id": account, "limit": 1000})
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()
    return entries


def published(api: Api) -> dict[str, Any]:
    """The newest document the PoPs receive."""
    version = api.version()
    pop = api.token("pop", name="pop-lax")
    response = api.get("/v1/snapshot", token=pop, params={"after": version - 1, "wait": 5})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["version"] >= version
    return body["deployment"]


def account_in(document: dict[str, Any], account: str) -> dict[str, Any]:
    return next(item for item in document["accounts"] if item["id"] == account)


def with_users(api: Api) -> Api:
    for group in ("finance", "eng"):
        assert api.post(f"{A}/groups", {"name": group}).status_code == 201
    response = api.post(f"{A}/users", {"name": "alice", "groups": ["finance"]})
    assert response.status_code == 201, response.text
    assert api.post(f"{A}/users", {"name": "bob"}).status_code == 201
    return api


def test_users_and_groups(world: Api) -> None:
    api = with_users(world)
    assert api.get(f"{A}/users").json() == [
        {"name": "alice", "groups": ["finance"], "devices": []},
        {"name": "bob", "groups": [], "devices": []}]
    problem(api.post(f"{A}/users", {"name": "alice"}), 409, field="name")
    problem(api.post(f"{A}/users", {"name": "carol", "groups": ["sales"]}), 422, field="groups")
    problem(api.post(f"{A}/users", {"name": "-carol"}), 422, field="name")
    problem(api.post(f"{A}/users", {"name": "carol", "extra": 1}), 422, field="extra")
    problem(api.get(f"{A}/users/carol"), 404)
    problem(api.get("/v1/accounts/nobody/users"), 404)
    before = api.version()
    response = api.patch(f"{A}/users/alice", {"groups": ["eng", "finance", "eng"]})
    assert response.status_code == 200, response.text
    assert response.json()["groups"] == ["eng", "finance"]
    assert api.version() == before + 1
    problem(api.patch(f"{A}/users/alice", {"groups": ["sales"]}), 422, field="groups")
    problem(api.patch(f"{A}/users/carol", {"groups": []}), 404)
    assert api.get(f"{A}/users/alice").json()["groups"] == ["eng", "finance"]
    entry = audit(api)[0]
    assert entry["action"] == "update" and entry["resource"] == "accounts/acme/users/alice"
    assert entry["before"] == {"name": "alice", "groups": ["finance"]}
    assert entry["after"] == {"name": "alice", "groups": ["eng", "finance"]}
    # The PoPs see the membership in the users' groups.
    users = account_in(published(api), "acme")["users"]
    assert {"name": "alice", "groups": ["eng", "finance"]} in users

    assert api.get(f"{A}/groups").json() == [
        {"name": "eng", "members": ["alice"]}, {"name": "finance", "members": ["alice"]}]
    assert api.get(f"{A}/groups/eng").json() == {"name": "eng", "members": ["alice"]}
    problem(api.get(f"{A}/groups/sales"), 404)
    problem(api.post(f"{A}/groups", {"name": "eng"}), 409, field="name")
    problem(api.post(f"{A}/groups", {"name": "bad name"}), 422, field="name")
    # Deleting a group takes it out of its members' lists.
    assert api.delete(f"{A}/groups/eng").status_code == 204
    assert api.get(f"{A}/users/alice").json()["groups"] == ["finance"]
    entry = audit(api)[0]
    assert entry["action"] == "delete" and entry["before"] == {"name": "eng", "members": ["alice"]}
    problem(api.delete(f"{A}/groups/eng"), 404)
    # Groups are per account.
    assert api.get("/v1/accounts/globex/groups").json() == []
    problem(api.post("/v1/accounts/globex/users", {"name": "x", "groups": ["finance"]}), 422,
            field="groups")


def test_devices(world: Api) -> None:
    api = with_users(world)
    before = api.version()
    response = api.post(f"{A}/devices", {"user": "alice"})
    assert response.status_code == 201, response.text
    created = response.json()
    assert re.fullmatch(r"acme-alice-[0-9a-f]{6}", created["id"])
    assert created["account_id"] == "acme" and created["user"] == "alice"
    secret = created["secret"]
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert len(secret) >= 24 and api.version() == before + 1
    # The PoPs get only the hash, and authenticate the device with it.
    devices = account_in(published(api), "acme")["devices"]
    assert {"id": created["id"], "user": "alice", "secret_sha256": digest} in devices
    named = api.post(f"{A}/devices", {"user": "bob", "id": "bob.phone"})
    assert named.status_code == 201 and named.json()["id"] == "bob.phone"

    listed = api.get(f"{A}/devices")
    assert [d["id"] for d in listed.json()] == sorted([created["id"], "bob.phone"])
    read = api.get(f"{A}/devices/{created['id']}")
    assert read.json() == {key: created[key] for key in ("id", "account_id", "user",
                                                          "created_at")}
    assert [d["id"] for d in api.get(f"{A}/devices", params={"user": "bob"}).json()] == [
        "bob.phone"]
    assert api.get(f"{A}/users/alice").json()["devices"] == [created["id"]]
    for text in (listed.text, read.text, api.get(f"{A}/users").text,
                 json.dumps(audit(api))):
        assert secret not in text and digest not in text and "secret" not in text

    problem(api.post(f"{A}/devices", {"user": "bob", "id": "bob.phone"}), 409, field="id")
    # Device ids are deployment-wide: another account cannot take one either.
    api.post("/v1/accounts/globex/users", {"name": "gina"})
    problem(api.post("/v1/accounts/globex/devices", {"user": "gina", "id": "bob.phone"}), 409,
            field="id")
    problem(api.post(f"{A}/devices", {"user": "bob", "id": "Bob Phone"}), 422, field="id")
    problem(api.post(f"{A}/devices", {"user": "carol"}), 422, field="user")
    problem(api.post(f"{A}/devices", {"user": "alice", "secret": "mine"}), 422, field="secret")
    problem(api.get(f"{A}/devices/nope"), 404)
    # Another account's device is not found through acme.
    gina = api.post("/v1/accounts/globex/devices", {"user": "gina"}).json()
    problem(api.get(f"{A}/devices/{gina['id']}"), 404)
    problem(api.delete(f"{A}/devices/{gina['id']}"), 404)

    before = api.version()
    assert api.delete(f"{A}/devices/bob.phone").status_code == 204
    assert api.version() == before + 1
    entry = audit(api)[0]
    assert entry["action"] == "delete" and entry["before"] == {"id": "bob.phone", "user": "bob"}
    problem(api.get(f"{A}/devices/bob.phone"), 404)
    assert "bob.phone" not in {d["id"] for d in account_in(published(api), "acme")["devices"]}


def test_default_device_ids_fit_the_pattern(world: Api) -> None:
    api = world
    name = "Alice.Smith@Example.COM" + "x" * 70
    assert api.post(f"{A}/users", {"name": name}).status_code == 201
    device = api.post(f"{A}/devices", {"user": name}).json()
    assert re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,99}", device["id"]), device["id"]
    assert device["id"].startswith("acme-alice.smith-example.com")


def test_deleting_a_user_deletes_their_devices_and_tokens(world: Api) -> None:
    api = with_users(world)
    device = api.post(f"{A}/devices", {"user": "alice"}).json()
    token = api.post(f"{A}/enrollment-tokens", {"user": "alice"}).json()
    bob = api.post(f"{A}/devices", {"user": "bob"}).json()
    assert api.delete(f"{A}/users/alice").status_code == 204
    problem(api.get(f"{A}/users/alice"), 404)
    problem(api.get(f"{A}/devices/{device['id']}"), 404)
    assert [d["id"] for d in api.get(f"{A}/devices").json()] == [bob["id"]]
    assert api.get(f"{A}/enrollment-tokens").json() == []
    assert api.get(f"{A}/groups/finance").json()["members"] == []
    problem(api.client.post("/v1/enroll", json={"token": token["token"]}), 401, field="token")
    entry = audit(api)[0]
    assert entry["resource"] == "accounts/acme/users/alice" and entry["after"] is None
    assert entry["before"] == {"name": "alice", "groups": ["finance"], "devices": [device["id"]]}
    document = account_in(published(api), "acme")
    assert [u["name"] for u in document["users"]] == ["bob"]
    assert [d["id"] for d in document["devices"]] == [bob["id"]]
    problem(api.delete(f"{A}/users/alice"), 404)


def test_what_a_policy_selects_cannot_be_deleted(world: Api) -> None:
    api = with_users(world)
    device = api.post(f"{A}/devices", {"user": "bob"}).json()["id"]
    for policy in ({"id": "p-user", "users": ["alice"], "action": "shared"},
                   {"id": "p-group", "groups": ["finance"], "action": "shared"},
                   {"id": "p-device", "devices": [device], "action": "shared"}):
        assert api.post(f"{A}/policies", policy).status_code == 201
    body = problem(api.delete(f"{A}/users/alice"), 409, field="name")
    assert "p-user" in body["detail"]
    problem(api.delete(f"{A}/users/bob"), 409, field="name")  # through bob's device
    problem(api.delete(f"{A}/groups/finance"), 409, field="name")
    problem(api.delete(f"{A}/devices/{device}"), 409, field="id")
    assert api.delete(f"{A}/policies/p-device").status_code == 204
    assert api.delete(f"{A}/devices/{device}").status_code == 204


def test_enrollment_tokens(world: Api) -> None:
    api = with_users(world)
    before = api.version()
    response = api.post(f"{A}/enrollment-tokens", {"user": "alice"})
    assert response.status_code == 201, response.text
    created = response.json()
    expires = datetime.fromisoformat(created["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(minutes=60))) < timedelta(minutes=1)
    assert created["status"] == "unused" and created["used_by_device"] is None
    token = created["token"]
    digest = hashlib.sha256(token.encode()).hexdigest()
    short = api.post(f"{A}/enrollment-tokens", {"user": "bob", "expires_in_minutes": 5}).json()
    assert datetime.fromisoformat(short["expires_at"]) < expires
    # Not configuration: audited, but no new snapshot version.
    assert api.version() == before
    listed = api.get(f"{A}/enrollment-tokens")
    assert {item["id"] for item in listed.json()} == {created["id"], short["id"]}
    assert all(set(item) == {"id", "user", "expires_at", "status", "used_by_device"}
               for item in listed.json())
    entries = audit(api)
    assert [e["action"] for e in entries[:2]] == ["create", "create"]
    assert entries[1]["resource"] == f"accounts/acme/enrollment-tokens/{created['id']}"
    assert entries[1]["after"]["user"] == "alice" and entries[1]["version"] == before
    for text in (listed.text, json.dumps(entries)):
        assert token not in text and digest not in text

    problem(api.post(f"{A}/enrollment-tokens", {"user": "carol"}), 422, field="user")
    problem(api.post(f"{A}/enrollment-tokens", {"user": "alice", "expires_in_minutes": 0}), 422,
            field="expires_in_minutes")
    assert api.delete(f"{A}/enrollment-tokens/{short['id']}").status_code == 204
    assert api.version() == before
    entry = audit(api)[0]
    assert entry["action"] == "delete" and entry["before"]["id"] == short["id"]
    problem(api.delete(f"{A}/enrollment-tokens/{short['id']}"), 404)
    problem(api.client.post("/v1/enroll", json={"token": short["token"]}), 401, field="token")
    # Another account's token id is not found through acme.
    api.post("/v1/accounts/globex/users", {"name": "gina"})
    gina = api.post("/v1/accounts/globex/enrollment-tokens", {"user": "gina"}).json()
    problem(api.delete(f"{A}/enrollment-tokens/{gina['id']}"), 404)


def test_enroll_is_single_use(world: Api) -> None:
    api = with_users(world)
    token = api.post(f"{A}/enrollment-tokens", {"user": "alice"}).json()
    before = api.version()
    # Public: the enrollment token is the only credential.
    response = api.client.post("/v1/enroll", json={"token": token["token"]})
    assert response.status_code == 201, response.text
    enrolled = response.json()
    assert set(enrolled) == {"device_id", "secret", "account_id", "user", "pops"}
    assert enrolled["account_id"] == "acme" and enrolled["user"] == "alice"
    assert re.fullmatch(r"acme-alice-[0-9a-f]{6}", enrolled["device_id"])
    assert enrolled["pops"][0] == {"code": "las", "city": "Las Vegas", "country": "US",
                                   "latitude": 36.17, "longitude": -115.14,
                                   "shared_ipv4": "198.51.100.10"}
    assert [pop["code"] for pop in enrolled["pops"]] == ["las", "lax", "bur", "jfk"]
    assert api.version() == before + 1  # a device is configuration
    digest = hashlib.sha256(enrolled["secret"].encode()).hexdigest()
    devices = account_in(published(api), "acme")["devices"]
    assert {"id": enrolled["device_id"], "user": "alice", "secret_sha256": digest} in devices
    assert api.get(f"{A}/devices/{enrolled['device_id']}").json()["user"] == "alice"
    [item] = api.get(f"{A}/enrollment-tokens").json()
    assert item["status"] == "used" and item["used_by_device"] == enrolled["device_id"]
    entry = audit(api)[0]
    assert entry["action"] == "enroll" and entry["actor"].startswith("enrollment of alice")
    assert entry["after"] == {"id": enrolled["device_id"], "user": "alice",
                              "enrollment_token": token["id"]}
    assert enrolled["secret"] not in json.dumps(audit(api)) and digest not in json.dumps(audit(api))

    body = problem(api.client.post("/v1/enroll", json={"token": token["token"]}), 401,
                   field="token")
    assert "already used" in body["detail"]
    assert len(api.get(f"{A}/devices").json()) == 1


def test_enroll_with_a_device_name(world: Api) -> None:
    api = with_users(world)
    first = api.post(f"{A}/enrollment-tokens", {"user": "alice"}).json()["token"]
    second = api.post(f"{A}/enrollment-tokens", {"user": "alice"}).json()["token"]
    response = api.client.post("/v1/enroll", json={"token": first, "device_name": "laptop"})
    assert response.status_code == 201 and response.json()["device_id"] == "acme-alice-laptop"
    # A name already taken: 409, and the token is not used up.
    problem(api.client.post("/v1/enroll", json={"token": second, "device_name": "laptop"}), 409,
            field="device_name")
    problem(api.client.post("/v1/enroll", json={"token": second, "device_name": "My Laptop"}),
            422, field="device_name")
    response = api.client.post("/v1/enroll", json={"token": second, "device_name": "phone"})
    assert response.status_code == 201 and response.json()["device_id"] == "acme-alice-phone"


def test_enroll_refuses_expired_and_unknown_tokens(world: Api) -> None:
    api = with_users(world)
    token = api.post(f"{A}/enrollment-tokens", {"user": "alice"}).json()
    with api.app.state.ctx.sessions() as session, session.begin():
        session.execute(update(EnrollmentTokenRow).where(EnrollmentTokenRow.id == token["id"])
                        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert api.get(f"{A}/enrollment-tokens").json()[0]["status"] == "expired"
    before = api.version()
    body = problem(api.client.post("/v1/enroll", json={"token": token["token"]}), 401,
                   field="token")
    assert "expired" in body["detail"]
    problem(api.client.post("/v1/enroll", json={"token": "egd_enroll_nope"}), 401, field="token")
    problem(api.client.post("/v1/enroll", json={"token": api.admin}), 401, field="token")
    problem(api.client.post("/v1/enroll", json={}), 422, field="token")
    assert api.get(f"{A}/devices").json() == [] and api.version() == before


def test_account_tokens_reach_their_own_account_only(world: Api) -> None:
    api = with_users(world)
    device = api.post(f"{A}/devices", {"user": "alice"}).json()["id"]
    token_id = api.post(f"{A}/enrollment-tokens", {"user": "alice"}).json()["id"]
    calls: list[tuple[str, str, Any]] = [
        ("get", f"{A}/users", None),
        ("post", f"{A}/users", {"name": "mallory"}),
        ("get", f"{A}/users/alice", None),
        ("patch", f"{A}/users/alice", {"groups": []}),
        ("delete", f"{A}/users/bob", None),
        ("get", f"{A}/groups", None),
        ("post", f"{A}/groups", {"name": "x"}),
        ("get", f"{A}/groups/finance", None),
        ("delete", f"{A}/groups/eng", None),
        ("get", f"{A}/devices", None),
        ("post", f"{A}/devices", {"user": "alice"}),
        ("get", f"{A}/devices/{device}", None),
        ("delete", f"{A}/devices/{device}", None),
        ("get", f"{A}/enrollment-tokens", None),
        ("post", f"{A}/enrollment-tokens", {"user": "alice"}),
        ("delete", f"{A}/enrollment-tokens/{token_id}", None),
    ]
    globex = api.token("account", "globex")
    pop = api.token("pop")
    for token in (globex, pop):
        for method, path, body in calls:
            kwargs = {"json": body} if body is not None else {}
            response = api.client.request(method, path, headers=api.headers(token), **kwargs)
            problem(response, 403)
    own = api.token("account", "acme")
    assert api.get(f"{A}/users", token=own).status_code == 200
    assert api.post(f"{A}/devices", {"user": "bob"}, token=own).status_code == 201
    assert len(api.get(f"{A}/users").json()) == 2  # nothing changed by the refused calls
