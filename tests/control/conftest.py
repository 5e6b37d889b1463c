"""Control-plane fixtures: the real app on a real store — SQLite always, PostgreSQL when
EGRESSD_TEST_POSTGRES_URL names a server (`.ci/run` starts one). Each test gets its own
database, so tests never see each other's rows."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from egressd.control.app import ControlSettings, create_app
from egressd.control.auth import create_token
from egressd.control.db import make_engine, normalise_url

POSTGRES_URL = os.environ.get("EGRESSD_TEST_POSTGRES_URL", "")

BASE_DOCUMENT: dict[str, Any] = {
    "data_centers": [
        {"code": "las", "city": "Las Vegas", "country": "US", "region": "US-NV",
         "latitude": 36.17, "longitude": -115.14, "shared_ipv4": ["198.51.100.10"],
         "shared_ipv6": "2001:db8:10::/48", "slot": 1},
        {"code": "lax", "city": "Los Angeles", "country": "US", "region": "US-CA",
         "latitude": 34.05, "longitude": -118.24, "shared_ipv4": ["198.51.100.20"],
         "shared_ipv6": "2001:db8:20::/48", "slot": 2},
        {"code": "bur", "city": "Los Angeles", "country": "US", "region": "US-CA",
         "latitude": 34.2, "longitude": -118.36, "shared_ipv4": ["198.51.100.25"], "slot": 3},
        {"code": "jfk", "city": "New York", "country": "US", "region": "US-NY",
         "latitude": 40.71, "longitude": -74.01, "shared_ipv4": ["198.51.100.30"],
         "shared_ipv6": "2001:db8:30::/48", "slot": 4},
    ],
}

# Dedicated inventory the tests assign from: (address, data center).
DEDICATED = [
    ("203.0.113.20", "lax"), ("203.0.113.21", "lax"), ("203.0.113.25", "bur"),
    ("203.0.113.30", "jfk"), ("203.0.113.31", "jfk"),
    ("2001:db8:120::/48", "lax"), ("2001:db8:125::/48", "bur"), ("2001:db8:130::/48", "jfk"),
]


def store_params() -> list[Any]:
    return [
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]


@pytest.fixture(params=store_params())
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'control.db'}"
        return
    yield from postgres_database()


def postgres_database() -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    if not POSTGRES_URL:
        pytest.skip("EGRESSD_TEST_POSTGRES_URL is not set (./scripts/test starts PostgreSQL as root)")
    name = f"egressd_test_{secrets.token_hex(6)}"
    admin = create_engine(normalise_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")
    for attempt in range(5):  # CREATE DATABASE fails while another copies template1
        try:
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            break
        except DBAPIError:
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    base, _, _ = normalise_url(POSTGRES_URL).rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        for attempt in range(5):  # an autovacuum worker may hold it for a moment
            try:
                with admin.connect() as connection:
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                break
            except DBAPIError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        admin.dispose()


@dataclass
class Api:
    """A client of the real app with an admin token, and helpers to make more tokens."""

    client: TestClient
    admin: str
    app: Any

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin}"}

    def get(self, path: str, token: str | None = None, **kwargs: Any) -> Any:
        return self.client.get(path, headers=self.headers(token), **kwargs)

    def post(self, path: str, json: Any = None, token: str | None = None, **kwargs: Any) -> Any:
        return self.client.post(path, json=json, headers=self.headers(token), **kwargs)

    def patch(self, path: str, json: Any = None, token: str | None = None) -> Any:
        return self.client.patch(path, json=json, headers=self.headers(token))

    def put(self, path: str, json: Any = None, token: str | None = None) -> Any:
        return self.client.put(path, json=json, headers=self.headers(token))

    def delete(self, path: str, token: str | None = None) -> Any:
        return self.client.delete(path, headers=self.headers(token))

    def token(self, scope: str, account_id: str | None = None, name: str = "test") -> str:
        response = self.post("/v1/tokens", {"name": name, "scope": scope, "account_id": account_id})
        assert response.status_code == 201, response.text
        return str(response.json()["token"])

    def version(self) -> int:
        return int(self.get("/v1/version").json()["version"])


def bootstrap_admin(url: str) -> str:
    engine = make_engine(url)
    from egressd.control.db import migrate, sessions

    migrate(engine)
    with sessions(engine)() as session, session.begin():
        _, token = create_token(session, name="admin", scope="deployment")
    engine.dispose()
    return token


@pytest.fixture
def api(store_url: str) -> Iterator[Api]:
    admin = bootstrap_admin(store_url)
    app = create_app(ControlSettings(database_url=store_url, replica="test", poll_interval=0.05))
    with TestClient(app) as client:
        yield Api(client=client, admin=admin, app=app)
    app.state.engine.dispose()


@pytest.fixture
def world(api: Api) -> Api:
    """Four data centers (two in Los Angeles), a dedicated inventory, accounts acme
    (enterprise) and globex (free)."""
    for dc in BASE_DOCUMENT["data_centers"]:
        body = {key: dc[key] for key in ("code", "city", "country", "region", "latitude",
                                         "longitude", "slot", "shared_ipv4") if key in dc}
        body["shared_ipv6"] = dc.get("shared_ipv6")
        response = api.post("/v1/data-centers", body)
        assert response.status_code == 201, response.text
    for address, dc in DEDICATED:
        response = api.post("/v1/addresses", {"address": address, "data_center": dc,
                                              "kind": "dedicated"})
        assert response.status_code == 201, response.text
    for account, plan in (("acme", "enterprise"), ("globex", "free")):
        response = api.post("/v1/accounts", {"id": account, "name": account.title(), "plan": plan})
        assert response.status_code == 201, response.text
    return api
