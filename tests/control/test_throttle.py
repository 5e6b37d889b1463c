"""Guessing tokens: failed authentications per source are limited (API and enrollment)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from egressd.control.app import ControlSettings, create_app

from .conftest import bootstrap_admin


def test_failed_token_checks_are_rate_limited_per_source(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'control.db'}"
    admin = bootstrap_admin(url)
    app = create_app(ControlSettings(database_url=url, auth_failures_per_source=3))
    with TestClient(app) as client:
        good = {"Authorization": f"Bearer {admin}"}
        assert client.get("/v1/accounts").status_code == 401  # no token: not a guess
        for guess in ("egd_a", "egd_b"):
            assert client.get("/v1/accounts", headers={"Authorization": f"Bearer {guess}"}).status_code == 401
        response = client.post("/v1/enroll", json={"token": "not-an-enrollment-token"})
        assert response.status_code == 401 and "www-authenticate" not in response.headers
        # Past the limit even the right token is refused, with when to come back.
        response = client.get("/v1/accounts", headers=good)
        assert response.status_code == 429
        assert response.headers["content-type"].startswith("application/problem+json")
        assert 0 < int(response.headers["retry-after"]) <= 60
        assert "too many failed authentications" in response.json()["detail"]
        assert client.post("/v1/enroll", json={"token": "x"}).status_code == 429
        # Public endpoints that need no token are not affected.
        assert client.get("/geofeed.csv").status_code == 200
    app.state.engine.dispose()
