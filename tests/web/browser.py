"""Helpers of the dashboard tests: where Chromium is, why a test must skip, and small
page actions (sign in, open a page and wait until its data is rendered, screenshots,
accessibility checks)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.async_api import Page

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
VIEWPORT = {"width": 1400, "height": 900}
ROUTES = {"overview": "overview", "egress": "egress", "network": "settings/network",
          "policies": "policies", "devices": "devices", "flows": "flows"}


def skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (pip install -e '.[test]')"
    if not CHROMIUM.exists():
        root = os.geteuid() == 0
        return ("no Chromium at /usr/bin/chromium" + (
            ": install Debian's chromium (./scripts/test does, as root)" if root else
            ": ./scripts/test installs Debian's chromium when run as root; not root here"))
    return None


async def sign_in(page: Page, token: str, *, expect: str = "overview") -> None:
    await page.goto("/")
    if await page.evaluate("sessionStorage.getItem('egressd.token')") is not None:
        await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_selector("main[data-ready=sign-in]")
    await page.fill("#token", token)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_selector(f"main[data-ready={expect}]")


async def open_page(page: Page, name: str, account: str | None = None, **params: str) -> None:
    """Go to a page (fragment route) and wait until it has rendered its data."""
    wanted = {**({"account": account} if account else {}), **params}
    query = "&".join(f"{key}={value}" for key, value in wanted.items())
    fragment = f"#/{ROUTES[name]}" + (f"?{query}" if query else "")
    await page.evaluate("""(fragment) => {
        document.querySelector('main').dataset.ready = '';
        if (location.hash === fragment) window.dispatchEvent(new HashChangeEvent('hashchange'));
        else location.hash = fragment;
    }""", fragment)
    await page.wait_for_selector(f"main[data-ready={name}]")


async def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


UNLABELLED = """() => {
  const name = (el) => (el.getAttribute('aria-label') || el.textContent || '').trim()
    || (el.getAttribute('aria-labelledby') || '').split(' ').map((id) => document.getElementById(id)?.textContent || '').join('').trim();
  const bad = [];
  for (const el of document.querySelectorAll('main input, main select, main textarea, header input')) {
    if (el.type === 'hidden') continue;
    if (!(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.getAttribute('aria-labelledby')) bad.push(el.outerHTML.slice(0, 120));
  }
  for (const el of document.querySelectorAll('button, a[href]')) {
    if (!name(el)) bad.push(el.outerHTML.slice(0, 120));
  }
  return bad;
}"""


async def unlabelled_controls(page: Page) -> list[str]:
    """Form controls without a label and buttons or links without a name."""
    found: list[str] = await page.evaluate(UNLABELLED)
    return found


async def curl_through(info: dict[str, Any], account: str, pop: str = "las") -> str:
    """One request through a PoP with the account's curlrc (as tests/e2e do); the body."""
    binary = shutil.which("curl")
    assert binary is not None, "curl is needed (./scripts/test installs it as root)"
    env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
    process = await asyncio.create_subprocess_exec(
        binary, "-q", "-sS", "--max-time", "10", "-K", info["accounts"][account]["curlrc"],
        "-x", info["pops"][pop]["http_proxy"], info["echo"]["name"],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    async with asyncio.timeout(15):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode(errors="replace")
    return out.decode().strip()
