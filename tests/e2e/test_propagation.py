"""R14 end to end: a control plane and three `egressd pop --control` processes.

A change to `proxy.udp` made through the API is in force on all three PoPs within 2 s
(measured and printed); with the control plane stopped the PoPs keep serving, and a PoP
restarted meanwhile comes up from its disk copy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from egressd.echo.server import EchoServer
from egressd.serve import ECHO_HOST, embedded_deployment

from .helpers import reserve_port, socks5_udp
from .processes import EgressdProcess, Start, egressd_command, wait_healthy

pytestmark = pytest.mark.slow

SECRETS = {"acme": "acme-propagation-secret", "globex": "globex-propagation-secret"}
POPS = ("las", "lax", "jfk")
ACME_LAX, LAX_SHARED = "127.0.2.100", "127.0.2.1"


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start(ECHO_HOST, http_port=0, udp_port=0)
    try:
        yield server
    finally:
        await server.close()


class Lab:
    def __init__(self, egressd_process: Start, tmp_path: Path) -> None:
        self.start_process = egressd_process
        self.tmp = tmp_path
        self.control_state = tmp_path / "control"
        self.control: EgressdProcess | None = None
        self.pops: dict[str, EgressdProcess] = {}
        self.addresses: dict[str, tuple[str, int]] = {}
        self.url = ""

    @property
    def admin(self) -> dict[str, str]:
        token = (self.control_state / "admin.token").read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    async def start_control(self) -> None:
        deployment = self.tmp / "deployment.toml"
        deployment.write_text(embedded_deployment(
            {account: secret for account, secret in SECRETS.items()}, acme_proxy_udp=False))
        if not self.url:
            reservation = reserve_port()
            port = reservation.getsockname()[1]
            reservation.close()
            self.url = f"http://127.0.0.1:{port}"
        self.control = await self.start_process([
            "control", "serve", "--state-dir", str(self.control_state), "--listen",
            self.url.removeprefix("http://"), "-d", str(deployment), "--log-level", "warning"])
        async with httpx.AsyncClient() as client:
            for _ in range(200):
                try:
                    if (await client.get(self.url + "/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"control plane did not start: {self.control.stderr()}")

    async def start_pop(self, code: str) -> None:
        token_file = self.tmp / "pop.token"
        if not token_file.exists():
            await asyncio.to_thread(
                subprocess.run,
                [*egressd_command(), "control", "token", "--scope", "pop", "--name", "pops",
                 "--state-dir", str(self.control_state), "-o", str(token_file)],
                check=True, capture_output=True, timeout=60)
        if code not in self.addresses:
            reservation = reserve_port()
            self.addresses[code] = reservation.getsockname()[:2]
            reservation.close()
        host, port = self.addresses[code]
        self.pops[code] = await self.start_process([
            "pop", "--pop", code, "--control", self.url, "--control-token-file", str(token_file),
            "--state-dir", str(self.tmp / f"pop-{code}"), "--listen", f"{host}:{port}",
            "--first-snapshot-wait", "30"])
        await wait_healthy(self.addresses[code])

    async def health(self, code: str) -> dict[str, Any]:
        return await wait_healthy(self.addresses[code], within=5.0)


async def udp_source(proxy: tuple[str, int], echo: EchoServer) -> str:
    async with socks5_udp(proxy, ("acme-laptop", SECRETS["acme"])) as udp:
        udp.send(ECHO_HOST, echo.udp_port, b"where am I")
        _host, _port, payload = await udp.recv()
    return payload.decode().split()[0]


async def test_a_change_reaches_three_pops_within_two_seconds_and_survives_the_control_plane(
    egressd_process: Start, tmp_path: Path, echo: EchoServer
) -> None:
    lab = Lab(egressd_process, tmp_path)
    await lab.start_control()
    for code in POPS:
        await lab.start_pop(code)
    lax = lab.addresses["lax"]
    assert await udp_source(lax, echo) == LAX_SHARED  # proxy.udp off: UDP leaves shared

    async with httpx.AsyncClient(base_url=lab.url, headers=lab.admin) as api:
        started = time.monotonic()
        response = await api.patch("/v1/accounts/acme/settings/network", json={"proxy_udp": True})
        assert response.status_code == 200, response.text
        version = (await api.get("/v1/version")).json()["version"]
        in_force: dict[str, float] = {}
        while len(in_force) < len(POPS) and time.monotonic() - started < 10:
            for code in POPS:
                if code not in in_force and (await lab.health(code))["config"]["version"] >= version:
                    in_force[code] = time.monotonic() - started
            await asyncio.sleep(0.01)
        print("\nR14 propagation of proxy.udp (s):", json.dumps(
            {code: round(seconds, 3) for code, seconds in in_force.items()}))
        assert set(in_force) == set(POPS), f"not applied everywhere within 10 s: {in_force}"
        assert max(in_force.values()) < 2.0, in_force
        # In force means flows use it: acme's UDP now leaves from its Los Angeles address.
        assert await udp_source(lax, echo) == ACME_LAX
        pops = {row["pop"]: row for row in (await api.get("/v1/version")).json()["pops"]}
        assert all(pops[code]["version"] >= version for code in POPS), pops
        # Each PoP reports its own view too (standalone PoPs: no backbone, only themselves).
        assert all(pops[code]["view"]["up"] == [code] for code in POPS), pops

    # The control plane goes away: the PoPs keep serving the last good configuration.
    assert lab.control is not None
    await lab.control.stop()
    assert await settle_async(lambda: all_unreachable(lab), 10.0)
    assert await udp_source(lax, echo) == ACME_LAX
    # A PoP restarted meanwhile comes up from its disk copy, and serves.
    await lab.pops["lax"].stop()
    await lab.start_pop("lax")
    config = (await lab.health("lax"))["config"]
    assert (config["source"], config["version"]) == ("disk", version)
    assert config["control_plane"].startswith(("unreachable", "connecting"))
    assert await udp_source(lax, echo) == ACME_LAX
    # And it follows the control plane again once it is back.
    await lab.start_control()
    async with httpx.AsyncClient(base_url=lab.url, headers=lab.admin) as api:
        response = await api.patch("/v1/accounts/acme/settings/network", json={"proxy_udp": False})
        assert response.status_code == 200
        newest = (await api.get("/v1/version")).json()["version"]
    assert await settle_async(lambda: versions_at_least(lab, newest), 10.0)
    assert await udp_source(lax, echo) == LAX_SHARED
    assert ipaddress.ip_address(LAX_SHARED).is_loopback


async def all_unreachable(lab: Lab) -> bool:
    for code in POPS:
        state = (await lab.health(code))["config"].get("control_plane", "")
        if not state.startswith("unreachable"):
            return False
    return True


async def versions_at_least(lab: Lab, version: int) -> bool:
    return all([(await lab.health(code))["config"]["version"] >= version for code in POPS])


async def settle_async(condition: Any, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.1)
    return False


