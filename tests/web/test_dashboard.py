"""The dashboard end to end in headless Chromium, against `egressd serve`.

What the issue asks, each through the page as a person would use it:
- Settings › Network: toggle UDP, save, and see las, lax and jfk apply the new version;
- Egress IPs: assign a dedicated address, see "needs a second city" until a second city
  is active, then see it clear; the API's R2 refusals shown with their detail;
- Flow log and Overview: a flow appears live after a curl through a PoP;
- sign-in (admin and account tokens), sign-out; policies reordered by keyboard; a device
  enrolled with the token the page shows once.
Every page is written to artifacts/screenshots/.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import httpx
import pytest

from .browser import curl_through, open_page, screenshot, sign_in, unlabelled_controls
from .conftest import Gateway

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = pytest.mark.slow
POPS = ("las", "lax", "jfk")


async def test_sign_in_rejects_a_bad_token_and_signs_out(page: Page, gateway: Gateway) -> None:
    await page.goto("/")
    await page.wait_for_selector("main[data-ready=sign-in]")
    assert await unlabelled_controls(page) == []
    await page.fill("#token", "egd_not-a-token")
    await page.keyboard.press("Enter")
    alert = page.locator("#sign-in-error")
    await alert.filter(has_text="refused").wait_for()
    assert "unknown or revoked token" in await alert.inner_text()
    assert await page.evaluate("sessionStorage.getItem('egressd.token')") is None

    await sign_in(page, gateway.admin_token)
    assert "(admin)" in await page.inner_text("#who")
    # An account page without an account offers the accounts to choose from.
    await open_page(page, "egress")
    assert "Choose an account" in await page.inner_text("main")
    await page.get_by_role("link", name="globex").click()
    await page.get_by_role("heading", name="Egress IPs — globex").wait_for()
    assert await page.evaluate("sessionStorage.getItem('egressd.token')") == gateway.admin_token
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_selector("main[data-ready=sign-in]")
    assert await page.evaluate("sessionStorage.getItem('egressd.token')") is None
    assert await page.locator("#top").is_hidden()


async def test_account_token_sees_its_own_account_only(page: Page, gateway: Gateway) -> None:
    token = await gateway.token_for("globex")
    await sign_in(page, token)
    assert "account globex" in await page.inner_text("#who")
    assert await page.locator("#account-input").get_attribute("readonly") is not None
    # The fragment names acme, but an account token is held to its own account.
    await open_page(page, "egress", "acme")
    assert "Egress IPs — globex" in await page.inner_text("h1")
    banner = page.locator("#dedicated-status")
    assert await banner.get_attribute("data-status") == "none"
    assert "Free plan" in await banner.inner_text()
    # Assigning is refused by the API (R2): its detail is shown as it is.
    await page.fill("#assign-ipv4", "127.0.2.100")
    await page.get_by_role("button", name="Assign").click()
    problem = page.locator("#assign .problem")
    await problem.wait_for()
    text = await problem.inner_text()
    assert "dedicated egress IPs are for enterprise accounts only" in text
    assert "rule R2" in text
    await open_page(page, "flows")
    assert await page.input_value("#filter-account") == "globex"


async def test_udp_toggle_is_applied_by_every_pop(page: Page, gateway: Gateway) -> None:
    await sign_in(page, gateway.admin_token)
    await open_page(page, "network", "acme")
    assert await unlabelled_controls(page) == []
    udp = page.locator("#proxy-udp")
    assert await udp.is_checked()  # egressd serve starts acme with UDP on
    assert "UDP on: HTTP/3" in await page.inner_text("#proxy-udp-effect")
    await screenshot(page, "settings-network")

    # Keyboard only: focus the toggle, Space flips it, Enter on Save submits.
    await udp.focus()
    await page.keyboard.press("Space")
    assert not await udp.is_checked()
    assert "UDP off: HTTP/3 (QUIC) and other UDP flows leave from the PoPs' shared addresses" in \
        await page.inner_text("#proxy-udp-effect")
    await page.get_by_role("button", name="Save").focus()
    await page.keyboard.press("Enter")

    status = page.locator("#save-status")
    await status.filter(has_text="applied by every PoP").wait_for()
    version = int(await status.get_attribute("data-version") or 0)
    for pop in POPS:
        line = page.locator(f"#propagation li[data-pop={pop}]")
        assert await line.get_attribute("data-state") == "applied"
        assert re.search(rf"{pop} \(.+\): applied version {version} \(\d+\.\d s after saving\)",
                         await line.inner_text()), await line.inner_text()
    network = (await gateway.api.get("/v1/accounts/acme/settings/network")).json()
    assert network == {"proxy_tcp": True, "proxy_udp": False, "fallback": "closed"}
    confirmed = (await gateway.api.get("/v1/version")).json()
    assert {pop["pop"]: pop["version"] >= version for pop in confirmed["pops"]} == dict.fromkeys(POPS, True)
    await screenshot(page, "settings-network-applied")

    # TCP off takes UDP with it (R3): the page says so and disables the UDP toggle.
    await page.locator("#proxy-tcp").uncheck()
    assert await udp.is_disabled()
    assert "UDP needs TCP" in await page.inner_text("#proxy-udp-effect")
    await page.locator("#proxy-tcp").check()
    await udp.check()
    await page.get_by_role("button", name="Save").click()
    await status.filter(has_text="applied by every PoP").wait_for()
    assert int(await status.get_attribute("data-version") or 0) > version
    assert (await gateway.api.get("/v1/accounts/acme/settings/network")).json()["proxy_udp"] is True


async def _inventory(api: httpx.AsyncClient, address: str, pop: str) -> None:
    response = await api.post("/v1/addresses", json={"address": address, "data_center": pop,
                                                     "kind": "dedicated"})
    assert response.status_code == 201, response.text


async def test_second_city_activates_dedicated_egress(page: Page, gateway: Gateway) -> None:
    api = gateway.api
    for address, pop in (("127.0.2.101", "lax"), ("2001:db8:300::/48", "lax"),
                         ("127.0.3.101", "jfk"), ("127.0.2.102", "lax")):
        await _inventory(api, address, pop)
    created = await api.post("/v1/accounts", json={"id": "initech", "name": "Initech",
                                                   "plan": "enterprise"})
    assert created.status_code == 201, created.text

    await sign_in(page, gateway.admin_token)
    await open_page(page, "egress", "initech")
    banner = page.locator("#dedicated-status")
    assert await banner.get_attribute("data-status") == "none"

    # Los Angeles, confirmed at once: one city is not enough (R2).
    await page.select_option("#assign-pop", "lax")
    await page.locator("#assign-ipv4 option[value='127.0.2.101']").wait_for(state="attached")
    assert "127.0.2.100" not in await page.inner_text("#assign-ipv4")  # acme's: not free
    await page.select_option("#assign-ipv4", "127.0.2.101")
    await page.select_option("#assign-ipv6", "2001:db8:300::/48")
    await page.check("#assign-confirmed")
    await page.get_by_role("button", name="Assign").click()
    await page.locator("#egress-status").filter(has_text="Assigned 127.0.2.101").wait_for()
    assert await banner.get_attribute("data-status") == "needs-second-city"
    assert "needs a second city" in await banner.inner_text()
    assert "2001:db8:300::/48" in await page.inner_text("#ipv6")
    await screenshot(page, "egress-ips-needs-second-city")

    # New York, pending: still one active city.
    await page.select_option("#assign-pop", "jfk")
    await page.locator("#assign-ipv4 option[value='127.0.3.101']").wait_for(state="attached")
    await page.select_option("#assign-ipv4", "127.0.3.101")
    await page.get_by_role("button", name="Assign").click()
    await page.locator("#egress-status").filter(has_text="Assigned 127.0.3.101").wait_for()
    assert await banner.get_attribute("data-status") == "needs-second-city"
    row = page.locator("tr[data-location=jfk]")
    assert await row.locator("[data-state=pending]").count() == 1

    # Confirming the allowlists clears it: active in two cities.
    await page.get_by_role("button", name="Confirm allowlists updated for jfk").click()
    await page.locator("#egress-status").filter(has_text="confirmed").wait_for()
    assert await banner.get_attribute("data-status") == "active"
    assert "active in Los Angeles, New York" in await banner.inner_text()
    assert (await api.get("/v1/accounts/initech")).json()["dedicated"]["status"] == "active"
    await screenshot(page, "egress-ips")

    # Another account's address, typed by an account token: the API's 409 is shown.
    token = await gateway.token_for("initech")
    await sign_in(page, token)
    await open_page(page, "egress", "initech")
    await page.fill("#assign-ipv4", "127.0.2.100")
    await page.get_by_role("button", name="Assign").click()
    problem = page.locator("#assign .problem")
    await problem.wait_for()
    assert "127.0.2.100 is already assigned to another account" in await problem.inner_text()
    assert "field ipv4, rule R2" in await problem.inner_text()

    # Release (with the dialog): the addresses show as quarantined, and one city is left.
    await page.get_by_role("button", name="Release jfk").click()
    dialog = page.get_by_role("dialog")
    assert "quarantine" in await dialog.inner_text()
    await dialog.get_by_role("button", name="Release").click()
    await page.locator("#egress-status").filter(has_text="released").wait_for()
    assert await page.locator("tr[data-quarantined='127.0.3.101'] [data-state=quarantined]").count() == 1
    assert await banner.get_attribute("data-status") == "needs-second-city"


async def test_flow_appears_live_in_the_log_and_on_the_map(page: Page, gateway: Gateway) -> None:
    await sign_in(page, gateway.admin_token)
    await open_page(page, "flows", "acme")
    assert await unlabelled_controls(page) == []
    rows = page.locator("#flows tbody tr[data-flow]")
    before = await rows.count()

    # acme through Las Vegas leaves from its Los Angeles address (R6, R7).
    assert await curl_through(gateway.info, "acme") == gateway.info["accounts"]["acme"]["dedicated"]["lax"]
    await rows.nth(before).wait_for()  # one more row (the page's CSP forbids wait_for_function)
    newest = rows.first
    text = await newest.inner_text()
    assert "acme" in text and "echo.egressd.test" in text and "las → lax" in text
    assert "127.0.2.100" in text and "backbone" in text and "ok" in text
    await screenshot(page, "flow-log")

    # The filter on outcome hides it; the filter on PoP keeps it.
    await page.select_option("#filter-outcome", "refused")
    await page.locator("#flows tbody tr.empty-row").wait_for()
    await page.select_option("#filter-outcome", "")
    await page.select_option("#filter-pop", "las")
    await rows.first.wait_for()

    # Devices attached in New York and Los Angeles leave where they attached (R6: the
    # most performant location for the connected PoP): rings on the map.
    for pop in ("jfk", "lax", "las"):
        await curl_through(gateway.info, "acme", pop)
    await open_page(page, "overview", "acme")
    await page.locator("#traffic tr[data-arc='jfk>jfk']").wait_for()
    arc = page.locator("#traffic tr[data-arc='las>lax']")
    await arc.wait_for()
    assert int(await arc.locator("td.num").first.inner_text()) >= 1
    assert await page.locator("svg.map path.arc").count() >= 1
    for pop in POPS:
        assert await page.locator(f"#pops tr[data-pop={pop}] .badge").inner_text() == "healthy"
    # Each PoP's backbone RTTs to its peers, as it reported them (serve: simulated delays).
    rtt = await page.locator("#pops td[data-rtt=las]").inner_text()
    assert "lax" in rtt and "jfk" in rtt and " ms" in rtt, rtt
    assert await unlabelled_controls(page) == []
    await screenshot(page, "overview")


async def test_policies_by_keyboard_and_device_enrollment(page: Page, gateway: Gateway) -> None:
    await sign_in(page, gateway.admin_token)
    await open_page(page, "policies", "acme")
    assert await unlabelled_controls(page) == []

    async def add(policy_id: str, destinations: str, dedicated: bool) -> None:
        await page.fill("#policy-id", policy_id)
        await page.fill("#policy-destinations", destinations)
        if dedicated:
            await page.check("#policy-action-dedicated")
            await page.select_option("#policy-primary", "jfk")
            await page.select_option("#policy-secondary", "lax")
        await page.get_by_role("button", name="Add policy").click()
        await page.locator("#policies-status").filter(has_text=f"Policy {policy_id} added").wait_for()

    await add("updates", "*.updates.example", dedicated=False)
    await add("bank", "*.bank.example, 198.51.100.0/24", dedicated=True)
    order = [row["id"] for row in (await gateway.api.get("/v1/accounts/acme/policies")).json()]
    assert order == ["updates", "bank"]

    # The API's refusal of a duplicate id is shown with its detail.
    await page.fill("#policy-id", "bank")
    await page.get_by_role("button", name="Add policy").click()
    problem = page.locator("#policy-form .problem")
    await problem.wait_for()
    assert "policy 'bank' already exists" in await problem.inner_text()

    # Reorder with the keyboard: focus stays on the moved policy's buttons.
    await page.get_by_role("button", name="Move bank up").focus()
    await page.keyboard.press("Enter")
    await page.locator("#policies-status").filter(has_text="bank moved to position 0").wait_for()
    order = [row["id"] for row in (await gateway.api.get("/v1/accounts/acme/policies")).json()]
    assert order == ["bank", "updates"]
    assert await page.evaluate("document.activeElement.getAttribute('aria-label')") == "Move bank down"
    assert "dedicated jfk, else lax" in await page.inner_text("#policies tbody tr:first-child")
    await screenshot(page, "policies")

    # Delete through the dialog, by keyboard: Cancel has the focus; Tab, Enter deletes.
    await page.get_by_role("button", name="Delete updates").focus()
    await page.keyboard.press("Enter")
    await page.get_by_role("dialog").wait_for()
    await page.keyboard.press("Tab")
    await page.keyboard.press("Enter")
    await page.locator("#policies-status").filter(has_text="Policy updates deleted").wait_for()
    order = [row["id"] for row in (await gateway.api.get("/v1/accounts/acme/policies")).json()]
    assert order == ["bank"]

    # Devices: the enrollment token is shown once, and enrolls a device.
    await open_page(page, "devices", "acme")
    assert await unlabelled_controls(page) == []
    await page.get_by_role("button", name="Create enrollment token").click()
    secret = page.locator("#enrollment-token")
    await secret.wait_for()
    token = await secret.input_value()
    assert token.startswith("egd_enroll_")
    await screenshot(page, "devices-enrollment")
    async with httpx.AsyncClient(base_url=gateway.url) as anonymous:
        enrolled = await anonymous.post("/v1/enroll", json={"token": token, "device_name": "phone"})
    assert enrolled.status_code == 201, enrolled.text
    device = enrolled.json()["device_id"]
    await open_page(page, "devices", "acme")
    assert await page.locator(f"tr[data-device='{device}']").count() == 1
    assert await page.locator("#enrollment-token").count() == 0  # never shown again
    await screenshot(page, "devices")
    await page.get_by_role("button", name=f"Delete device {device}").click()
    await page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    await page.locator("#devices-status").filter(has_text=f"Device {device} deleted").wait_for()
    assert await page.locator(f"tr[data-device='{device}']").count() == 0
