"""`egressd serve` runs on its control plane: the API changes what the PoPs do, and the
flows they carry show up in the control plane's live feed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from .helpers import curl


def admin(serve: dict[str, Any]) -> httpx.AsyncClient:
    token = Path(serve["control"]["admin_token"]).read_text().strip()
    return httpx.AsyncClient(base_url=serve["control"]["url"],
                             headers={"Authorization": f"Bearer {token}"}, trust_env=False)


async def through_las(serve: dict[str, Any], account: str) -> bytes:
    result = await curl("-K", serve["accounts"][account]["curlrc"], "-x",
                        serve["pops"]["las"]["http_proxy"], serve["echo"]["http"])
    return result.body


async def test_a_flow_through_a_pop_appears_in_the_live_feed(serve: dict[str, Any]) -> None:
    async with admin(serve) as api:
        cursor = (await api.get("/v1/flows")).json()["next"]
        assert await through_las(serve, "acme") == b"127.0.2.100\n"
        page = (await api.get("/v1/flows", params={"after": cursor, "wait": 10,
                                                     "account": "acme"})).json()
    flow = page["flows"][0]
    assert (flow["connected_pop"], flow["egress_pop"], flow["source"].split(":")[0]) == (
        "las", "lax", "127.0.2.100")
    assert flow["outcome"] == "ok" and flow["rule"] == "R6"


async def test_settings_changed_through_the_api_apply_to_the_next_flow(
    serve: dict[str, Any],
) -> None:
    async with admin(serve) as api:
        response = await api.patch("/v1/accounts/acme/settings/network", json={"proxy_tcp": False})
        assert response.status_code == 200, response.text
        version = (await api.get("/v1/version")).json()["version"]
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            pops = (await api.get("/v1/version")).json()["pops"]
            if all(pop["version"] >= version for pop in pops) and len(pops) == 3:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"PoPs did not confirm version {version} within 2 s: {pops}")
    # proxy.tcp off: acme's TCP leaves from the shared addresses of the connected PoP.
    assert await through_las(serve, "acme") in (b"127.0.1.1\n", b"127.0.1.2\n")
