"""Schemathesis against the real app (in-process ASGI) with an admin token, on a seeded
store: no operation answers any generated request with a server error, and every response
matches the schema the OpenAPI document declares for it.

Bounded: a few examples per operation, derandomized (the same cases on every run).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from egressd.control.app import ControlSettings, create_app

from .conftest import BASE_DOCUMENT, DEDICATED, bootstrap_admin

# Per operation. Small enough for < 60 s on two cores; raise it for a deeper hunt:
# EGRESSD_SCHEMATHESIS_EXAMPLES=200 python -m pytest tests/control/test_schemathesis.py
MAX_EXAMPLES = int(os.environ.get("EGRESSD_SCHEMATHESIS_EXAMPLES", "8"))


def _seed(client: TestClient, admin: str) -> None:
    """The `world` of conftest, and one object of each kind in acme."""
    headers = {"Authorization": f"Bearer {admin}"}

    def post(path: str, body: dict[str, Any]) -> None:
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 201, (path, response.text)

    for dc in BASE_DOCUMENT["data_centers"]:
        post("/v1/data-centers", dict(dc))
    for address, code in DEDICATED:
        post("/v1/addresses", {"address": address, "data_center": code, "kind": "dedicated"})
    post("/v1/accounts", {"id": "acme", "name": "Acme", "plan": "enterprise"})
    post("/v1/accounts", {"id": "globex", "name": "Globex"})
    post("/v1/accounts/acme/locations", {"ipv4": "203.0.113.20", "confirmed": True})
    post("/v1/accounts/acme/locations", {"ipv4": "203.0.113.30", "confirmed": True})
    response = client.put("/v1/in-network-origins/cdn", headers=headers,
                          json={"name": "cdn", "destinations": ["192.0.2.0/24"]})
    assert response.status_code == 200, response.text
    paths = set(client.get("/openapi.json").json()["paths"])
    if "/v1/accounts/{account_id}/groups" in paths:
        post("/v1/accounts/acme/groups", {"name": "staff"})
        post("/v1/accounts/acme/users", {"name": "alice", "groups": ["staff"]})
        post("/v1/accounts/acme/devices", {"user": "alice", "id": "acme-alice-laptop"})
    if "/v1/accounts/{account_id}/policies" in paths:
        post("/v1/accounts/acme/policies", {"id": "web", "destinations": ["*.example.com"],
                                            "action": "shared"})
    if "/v1/accounts/{account_id}/private-routes" in paths:
        post("/v1/accounts/acme/private-routes", {"id": "corp", "via": "connector1",
                                                  "destinations": ["10.20.0.0/16"]})


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, str]]:
    """The app under test and an admin token. The store is seeded through a first app
    instance; the one Schemathesis drives runs its own lifespan (its own event loop)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('schemathesis') / 'control.db'}"
    admin = bootstrap_admin(url)
    seeder = create_app(ControlSettings(database_url=url, replica="seed"))
    with TestClient(seeder) as client:
        _seed(client, admin)
    seeder.state.engine.dispose()
    app = create_app(ControlSettings(database_url=url, replica="schemathesis", poll_interval=0.05))
    yield app, admin
    from schemathesis.python import asgi

    with contextlib.suppress(Exception):
        asgi.shutdown_lifespans()
    app.state.engine.dispose()


@pytest.fixture(scope="module")
def api_schema(control: tuple[FastAPI, str]) -> Any:
    app, _ = control
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_schema_conformance(case: Any, control: tuple[FastAPI, str]) -> None:
    _, admin = control
    if case.path in ("/v1/snapshot", "/v1/flows") and isinstance(case.query, dict):
        case.query["wait"] = 0  # a long poll would only make the run slower
    case.call_and_validate(headers={"Authorization": f"Bearer {admin}"},
                           checks=[not_a_server_error, response_schema_conformance])
