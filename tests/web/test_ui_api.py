"""The dashboard's server side without a browser: the static files (`ui.py`) and the
read-only aggregates under /v1/ui (`api_ui.py`), on the real app and a SQLite store."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from egressd.control.app import ControlSettings, create_app
from egressd.control.bootstrap import import_deployment, issue_token
from egressd.control.db import make_engine, migrate
from egressd.control.ui import assets
from egressd.serve import embedded_deployment

WEB = Path(__file__).resolve().parents[2] / "src/egressd/control/web"


class Api:
    def __init__(self, client: TestClient, admin: str, acme: str, pop: str) -> None:
        self.client = client
        self.tokens = {"admin": admin, "acme": acme, "pop": pop}

    def get(self, path: str, who: str = "admin", **params: Any) -> Any:
        return self.client.get(path, params=params,
                               headers={"Authorization": f"Bearer {self.tokens[who]}"})


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    url = f"sqlite:///{tmp_path / 'control.db'}"
    engine = make_engine(url)
    migrate(engine)
    import_deployment(engine, embedded_deployment({"acme": "a" * 20, "globex": "g" * 20},
                                                  acme_proxy_udp=True), replace=True, source="test")
    admin = issue_token(engine, name="admin", scope="deployment", account_id=None)
    acme = issue_token(engine, name="acme-admin", scope="account", account_id="acme")
    pop = issue_token(engine, name="pop", scope="pop", account_id=None)
    with TestClient(create_app(ControlSettings(database_url=url), engine=engine)) as client:
        yield Api(client, admin, acme, pop)
    engine.dispose()


def test_index_and_assets_are_served_with_etag_and_csp(api: Api) -> None:
    index = api.client.get("/")
    assert index.status_code == 200
    assert index.headers["content-type"].startswith("text/html")
    csp = index.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert index.headers["x-content-type-options"] == "nosniff"
    again = api.client.get("/", headers={"If-None-Match": index.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    script = api.client.get("/ui/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    for path in ("/ui/nope.js", "/ui/../app.py", "/ui/%2e%2e/app.py", "/ui/pages/../../ui.py"):
        assert api.client.get(path).status_code == 404, path


def test_every_file_the_page_references_is_shipped_and_nothing_inline() -> None:
    """index.html and the modules reference files that exist; no inline script or style
    (the CSP would block it) and no URL to another host (it works offline)."""
    shipped = set(assets())
    html = (WEB / "index.html").read_text()
    for reference in re.findall(r'(?:href|src)="/(ui/[^"]+)"', html):
        assert reference in shipped, reference
    assert "<script>" not in html and "style=" not in html
    for name in shipped:
        if not name.endswith(".js"):
            continue
        text = (WEB / name).read_text()
        folder = Path(name).parent
        for target in re.findall(r'(?:from|import\()\s*"(\.[^"]+)"', text):
            resolved = (folder / target).as_posix()
            parts: list[str] = []
            for part in resolved.split("/"):
                if part == "..":
                    parts.pop()
                elif part != ".":
                    parts.append(part)
            assert "/".join(parts) in shipped, f"{name} imports {target}"
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), f"{name} names a remote URL"
        assert ".innerHTML" not in text, f"{name} writes innerHTML"


def test_session_names_the_scope(api: Api) -> None:
    assert api.get("/v1/ui/session").json() == {"scope": "deployment", "name": "admin", "account_id": None}
    assert api.get("/v1/ui/session", "acme").json()["account_id"] == "acme"
    assert api.client.get("/v1/ui/session").status_code == 401


def test_account_index_searches_and_scopes(api: Api) -> None:
    everything = api.get("/v1/ui/accounts").json()
    assert everything["total"] == 2
    assert [a["id"] for a in everything["accounts"]] == ["acme", "globex"]
    assert api.get("/v1/ui/accounts", q="GLOB").json()["accounts"] == [
        {"id": "globex", "name": "Globex", "plan": "free"}]
    assert api.get("/v1/ui/accounts", q="Corp").json()["accounts"][0]["id"] == "acme"
    assert api.get("/v1/ui/accounts", q="%").json() == {"total": 0, "accounts": []}  # literal
    assert api.get("/v1/ui/accounts", limit=1).json()["total"] == 2
    mine = api.get("/v1/ui/accounts", "acme").json()
    assert mine == {"total": 1, "accounts": [{"id": "acme", "name": "Acme Corp", "plan": "enterprise"}]}
    assert api.get("/v1/ui/accounts", "pop").status_code == 403


def test_pop_status_is_readable_by_account_tokens(api: Api) -> None:
    api.client.app.state.ctx.publisher.record_pop("las", 1)  # type: ignore[attr-defined]
    for who in ("admin", "acme"):
        status = api.get("/v1/ui/pops", who).json()
        assert status["version"] >= 1
        assert [pop["pop"] for pop in status["pops"]] == ["las"]
        assert "replica" not in status["pops"][0]
    assert api.get("/v1/version", "acme").status_code == 403  # the PoP endpoint stays closed


def test_quarantine_lists_the_accounts_released_addresses(api: Api) -> None:
    assert api.get("/v1/ui/accounts/acme/quarantine").json() == []
    headers = {"Authorization": f"Bearer {api.tokens['acme']}"}
    assert api.client.delete("/v1/accounts/acme/locations/jfk", headers=headers).status_code == 204
    released = api.get("/v1/ui/accounts/acme/quarantine", "acme").json()
    assert [(r["address"], r["family"], r["data_center"], r["city"]) for r in released] == [
        ("127.0.3.100", 4, "jfk", "New York"), ("2001:db8:200::/48", 6, "jfk", "New York")]
    assert api.get("/v1/ui/accounts/globex/quarantine", "acme").status_code == 403
    assert api.get("/v1/ui/accounts/nobody/quarantine").status_code == 404
