"""Tenant isolation over every endpoint of the control plane's API (R13 for the API).

The endpoints come from the app's own OpenAPI document, not from a list in this file: an
endpoint added later under /v1/accounts/{account_id} is probed the moment it exists, and
this test fails unless it refuses another account's token and PoP tokens. Likewise every
deployment-wide write refuses account and PoP tokens.

Each probe carries a body that passes the request schema (generated from the OpenAPI
schema), so what answers is the endpoint's authorisation, not FastAPI's validation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Api

ACME_NAME = "Acme Secret Corp"
ACME_ADDRESS = "203.0.113.20"  # acme's dedicated location (lax)
OTHER_ADDRESS = "203.0.113.21"  # a free dedicated address at lax
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT")

# Values that satisfy the request schemas, by property name; otherwise the first candidate
# that fits the schema's pattern and lengths.
HINTS: dict[str, Any] = {
    "name": "alice", "user": "alice", "via": "connector1", "id": "probe",
    "destinations": ["10.20.0.0/16"], "ipv4": OTHER_ADDRESS, "address": OTHER_ADDRESS,
    "data_center": "lax", "code": "probe", "country": "US", "city": "Probe City",
    "token": "egd_not-a-real-token",
}
CANDIDATES = ("probe", "alice", "US", OTHER_ADDRESS, "2001:db8:120::/48", "10.20.0.0/16")
FORMATS = {"ipv4": OTHER_ADDRESS, "ipv6": "2001:db8::1", "ipv4network": "10.20.0.0/16",
           "ipv6network": "2001:db8:120::/48", "date-time": "2030-01-01T00:00:00Z"}
# Path parameters that are not ids of acme's objects.
PATH_VALUES = {"account_id": "acme", "code": "lax", "address": OTHER_ADDRESS, "name": "alice"}


class Spec:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            schema = self.document["components"]["schemas"][name]
        return schema

    def operations(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        order = {"get": 0, "post": 1, "put": 2, "patch": 3, "delete": 4}
        found = [(path, method, op) for path, ops in self.document["paths"].items()
                 for method, op in ops.items() if method in order]
        yield from sorted(found, key=lambda item: order[item[1]])

    def body(self, op: dict[str, Any]) -> Any:
        content = op.get("requestBody", {}).get("content", {})
        if "application/json" not in content:
            return None
        return self.value(content["application/json"]["schema"], None)

    def value(self, schema: dict[str, Any], name: str | None) -> Any:
        """A minimal value valid for `schema`: required properties only."""
        schema = self.resolve(schema)
        if "enum" in schema:
            return schema["enum"][0]
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = [s for s in schema[key] if self.resolve(s).get("type") != "null"]
                return self.value(options[0], name) if options else None
        if "allOf" in schema:
            return self.value(schema["allOf"][0], name)
        kind = schema.get("type")
        if kind == "object" or "properties" in schema:
            return {prop: self.value(sub, prop)
                    for prop, sub in schema.get("properties", {}).items()
                    if prop in schema.get("required", [])}
        if kind == "array":
            if name in HINTS and isinstance(HINTS[name], list):
                return list(HINTS[name])
            count = schema.get("minItems", 0)
            return [self.value(schema.get("items", {}), None) for _ in range(count)]
        if kind == "integer":
            return int(schema.get("minimum", 1))
        if kind == "number":
            return float(schema.get("minimum", 0)) if "minimum" in schema and schema["minimum"] > 0 else 0.0
        if kind == "boolean":
            return False
        if kind == "string":
            return self.string(schema, name)
        return "probe"

    @staticmethod
    def string(schema: dict[str, Any], name: str | None) -> str:
        if schema.get("format") in FORMATS:
            return FORMATS[schema["format"]]
        options = ([HINTS[name]] if isinstance(HINTS.get(name), str) else []) + list(CANDIDATES)
        pattern = schema.get("pattern")
        for option in options:
            if pattern and not re.search(pattern, option):
                continue
            if not schema.get("minLength", 0) <= len(option) <= schema.get("maxLength", 10**6):
                continue
            return option
        raise AssertionError(f"test_isolation: no value for {name!r} {schema}: add one to HINTS")


def call(api: Api, method: str, path: str, token: str, body: Any = None,
         params: dict[str, Any] | None = None) -> Any:
    return api.client.request(method.upper(), path, headers=api.headers(token),
                              json=body, params=params)


def fill(path: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        return values.get(match[1], PATH_VALUES.get(match[1], "probe"))
    return re.sub(r"\{([^}:]+)(?::[^}]*)?\}", one, path)


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


@pytest.fixture
def acme(world: Api) -> dict[str, Any]:
    """acme with one object in every collection its OpenAPI exposes; the values a leak
    would show (secrets, ids, its name and address) are the markers."""
    api = world
    spec = Spec(api.client.get("/openapi.json").json())
    assert api.patch("/v1/accounts/acme", {"name": ACME_NAME}).status_code == 200
    response = api.post("/v1/accounts/acme/locations", {"ipv4": ACME_ADDRESS, "confirmed": True})
    assert response.status_code == 201, response.text
    ids: dict[str, str] = {"location_id": response.json()["id"]}
    created: list[Any] = []
    collections = [(path, op) for path, method, op in spec.operations()
                   if method == "post" and re.fullmatch(r"/v1/accounts/\{account_id\}/[a-z-]+", path)
                   and not path.endswith("/locations")]
    for _ in range(2):  # a second pass for collections whose bodies name others (devices: users)
        for path, op in list(collections):
            response = api.post(fill(path, {}), spec.body(op))
            if response.status_code == 201:
                collections.remove((path, op))
                body = response.json()
                created.append(body)
                # The item path's parameter, e.g. /users/{name} -> "name"
                for item_path in spec.document["paths"]:
                    match = re.fullmatch(re.escape(path) + r"/\{(\w+)\}", item_path)
                    if match:
                        ids[match[1] if match[1] != "name" else f"{path}:name"] = str(
                            body.get("id") or body.get("name"))
    assert not collections, [f"{path}: could not seed acme" for path, _ in collections]
    acme_token = api.token("account", "acme", name="acme-admin")
    tokens = api.get("/v1/tokens").json()
    token_id = next(t["id"] for t in tokens if t["name"] == "acme-admin")
    markers = {ACME_NAME, ACME_ADDRESS, acme_token}
    for value in strings(created):
        if len(value) >= 8 and not TIMESTAMP.match(value) and value != "10.20.0.0/16":
            markers.add(value)
    return {"spec": spec, "ids": ids, "markers": markers, "token": acme_token,
            "token_id": token_id}


def values_for(path: str, ids: dict[str, str]) -> dict[str, str]:
    values = {key: value for key, value in ids.items() if ":" not in key}
    collection = path.split("/{name}")[0]
    if f"{collection}:name" in ids:
        values["name"] = ids[f"{collection}:name"]
    return values


def assert_refused(response: Any, what: str, markers: set[str], *, allow_404: bool = True) -> None:
    allowed = (403, 404) if allow_404 else (403,)
    assert response.status_code in allowed, f"{what}: {response.status_code} {response.text[:300]}"
    assert response.headers["content-type"].startswith("application/problem+json"), what
    body = response.json()
    assert body["status"] == response.status_code and body["detail"], what
    if body.get("type", "").endswith("invalid-request"):
        pytest.fail(f"{what}: the probe's body did not validate; fix HINTS: {body}")
    body.pop("instance", None)  # the request's own path
    text = json.dumps(body)
    leaked = [marker for marker in markers if marker in text]
    assert not leaked, f"{what} shows acme's data: {leaked}"


def assert_no_acme(response: Any, what: str, markers: set[str]) -> None:
    text = response.text
    leaked = [marker for marker in markers | {"acme"} if marker in text]
    assert not leaked, f"{what} ({response.status_code}) shows acme's things: {leaked}"


def admin_view(api: Api, spec: Spec, ids: dict[str, str]) -> dict[str, Any]:
    """Every GET of acme's endpoints, as the admin sees them (to prove nothing changed)."""
    view = {}
    for path, method, _ in spec.operations():
        if method == "get" and "{account_id}" in path:
            url = fill(path, values_for(path, ids))
            response = api.get(url)
            view[url] = (response.status_code, response.json())
    return view


def test_account_endpoints_refuse_other_accounts_and_pops(world: Api, acme: dict[str, Any]) -> None:
    api, spec, ids, markers = world, acme["spec"], acme["ids"], acme["markers"]
    globex = api.token("account", "globex", name="globex-admin")
    pop = api.token("pop", name="pop-lax")
    # The tokens work where they should: the refusals below are not a broken token.
    assert api.get("/v1/accounts/globex", globex).status_code == 200
    assert api.get("/v1/accounts/acme", acme["token"]).json()["name"] == ACME_NAME
    assert api.get("/v1/snapshot", pop).status_code == 200
    before, version = admin_view(api, spec, ids), api.version()

    probed = []
    for path, method, op in spec.operations():
        if "{account_id}" not in path:
            continue
        url = fill(path, values_for(path, ids))
        body = spec.body(op)
        for who, token in (("globex", globex), ("pop", pop)):
            response = call(api, method, url, token, body)
            assert_refused(response, f"{method.upper()} {url} with a {who} token", markers)
            probed.append(f"{method.upper()} {path}")
    operations = set(probed)
    assert len(operations) >= 12, operations  # the OpenAPI walk found the account endpoints
    assert {"GET /v1/accounts/{account_id}", "DELETE /v1/accounts/{account_id}",
            "POST /v1/accounts/{account_id}/locations"} <= operations
    # Nothing of acme's changed, and no new version was published.
    assert admin_view(api, spec, ids) == before
    assert api.version() == version


# Endpoints that take another kind of credential than an API token (a connector's token):
# any API token is unknown there (401), whoever's it is.
OTHER_CREDENTIALS = {"/v1/tunnel/pops"}


def test_lists_and_queries_show_only_the_callers_account(world: Api, acme: dict[str, Any]) -> None:
    api, spec, markers = world, acme["spec"], acme["markers"]
    globex = api.token("account", "globex", name="globex-admin")
    api.patch("/v1/accounts/globex/settings/network", {"fallback": "shared"}, token=globex)
    assert [a["id"] for a in api.get("/v1/accounts", globex).json()] == ["globex"]
    tokens = api.get("/v1/tokens", globex).json()
    assert {t["account_id"] for t in tokens} == {"globex"} and len(tokens) == 1
    audit = api.get("/v1/audit", globex).json()
    assert audit and {entry["account_id"] for entry in audit} == {"globex"}
    assert_refused(api.get("/v1/audit", globex, params={"account_id": "acme"}),
                   "audit of acme", markers, allow_404=False)
    # Every parameterless GET (and every one taking ?account_id=) either refuses globex or
    # shows nothing of acme.
    for path, method, op in spec.operations():
        if method != "get" or "{" in path:
            continue
        queries: list[dict[str, Any]] = [{}]
        if any(p["name"] == "account_id" for p in op.get("parameters", [])):
            queries.append({"account_id": "acme"})
        for params in queries:
            response = call(api, "get", path, globex, params=params)
            what = f"GET {path} {params or ''} with globex's token"
            assert response.status_code < 500, what
            if path in OTHER_CREDENTIALS:  # not an account's endpoint: the token is the wrong kind
                assert response.status_code == 401, what
                assert_no_acme(response, what, markers)
            elif response.status_code < 300 and not op.get("security"):
                # Public (the geofeed, health): every address, but no account named.
                assert "acme" not in response.text.lower(), what
            elif response.status_code < 300:
                assert_no_acme(response, what, markers)
            else:
                assert_refused(response, what, markers)
    # acme's API token is invisible to globex and cannot be revoked by it.
    assert_refused(api.delete(f"/v1/tokens/{acme['token_id']}", globex), "revoke acme's token",
                   markers)
    assert api.get("/v1/accounts/acme", acme["token"]).status_code == 200


# What a PoP token exists for: pushing its flows and its view of the backbone.
POP_WRITES = {"POST /v1/flows", "PUT /v1/pops/{pop}/health"}


def test_deployment_wide_writes_refuse_account_and_pop_tokens(
    world: Api, acme: dict[str, Any]
) -> None:
    api, spec, markers = world, acme["spec"], acme["markers"]
    globex = api.token("account", "globex", name="globex-admin")
    pop = api.token("pop", name="pop-lax")
    version = api.version()
    probed = set()
    for path, method, op in spec.operations():
        public = not op.get("security")
        if method == "get" or "{account_id}" in path or public or path.startswith("/v1/tokens"):
            continue  # tokens: below, scope by scope
        url = fill(path, {})
        for who, token in (("globex", globex), ("pop", pop)):
            if who == "pop" and f"{method.upper()} {path}" in POP_WRITES:
                continue
            response = call(api, method, url, token, spec.body(op))
            assert_refused(response, f"{method.upper()} {url} with a {who} token", markers,
                           allow_404=False)
        probed.add(f"{method.upper()} {path}")
    assert {"POST /v1/data-centers", "POST /v1/addresses", "PUT /v1/settings",
            "PUT /v1/in-network-origins/{name}", "DELETE /v1/addresses/{address}"} <= probed
    # Tokens: an account token makes tokens of its own account only; a PoP token none.
    for who, token in (("globex", globex), ("pop", pop)):
        for body in ({"name": "x", "scope": "deployment"}, {"name": "x", "scope": "pop"},
                     {"name": "x", "scope": "account", "account_id": "acme"}):
            assert_refused(api.post("/v1/tokens", body, token),
                           f"POST /v1/tokens {body} with a {who} token", markers, allow_404=False)
    assert_refused(api.post("/v1/tokens", {"name": "x", "scope": "account", "account_id": "globex"},
                            pop), "pop token making an account token", markers, allow_404=False)
    own = api.post("/v1/tokens", {"name": "ci", "scope": "account", "account_id": "globex"}, globex)
    assert own.status_code == 201 and own.json()["account_id"] == "globex"
    assert api.version() == version  # none of the refused writes made a change
    assert [dc["code"] for dc in api.get("/v1/data-centers").json()] == ["las", "lax", "bur", "jfk"]
