"""Fixtures of the dashboard tests: the whole gateway in-process (`ServeStack` on ephemeral
ports, as in tests/e2e), a headless Chromium (Debian's, never a downloaded one) driven by
Playwright's async API in the same event loop, and an HTTP client for the API.

Every test that needs the browser skips, with the reason, when Playwright or
/usr/bin/chromium is missing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from egressd.serve import ServeSettings, ServeStack

from .browser import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, skip_reason

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

REASON = skip_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if REASON is None:
        return
    for item in items:
        if {"page", "browser"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.skip(reason=REASON))


@dataclass
class Gateway:
    info: dict[str, Any]  # serve.json
    url: str  # the control plane
    admin_token: str
    api: httpx.AsyncClient  # with the admin token

    async def token_for(self, account: str) -> str:
        """A new account-scoped API token, made through the API."""
        response = await self.api.post("/v1/tokens", json={
            "name": f"{account}-dashboard", "scope": "account", "account_id": account})
        assert response.status_code == 201, response.text
        token: str = response.json()["token"]
        return token


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    """`egressd serve` in-process: PoPs las, lax, jfk, the echo, acme and globex."""
    stack = ServeStack(ServeSettings(state_dir=tmp_path / "state", port_base=0))
    info = await stack.start()
    try:
        url = info["control"]["url"]
        token = (await asyncio.to_thread(Path(info["control"]["admin_token"]).read_text)).strip()
        async with httpx.AsyncClient(base_url=url, timeout=10,
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            yield Gateway(info, url, token, client)
    finally:
        await stack.close()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                    args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Browser, gateway: Gateway) -> AsyncIterator[Page]:
    """A fresh tab (its own sessionStorage) on the control plane. A script error in the
    page fails the test."""
    context = await browser.new_context(base_url=gateway.url, viewport=VIEWPORT)
    tab = await context.new_page()
    tab.set_default_timeout(15_000)
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield tab
    finally:
        await context.close()
    assert not errors, f"script errors in the page: {errors}"
