"""Reports each PoP's view of its peers (reachable PoPs, backbone RTTs) to the control
plane every few seconds, for `/v1/version` and the dashboard's map. The decision never
waits on it: R6 and R11 use the PoP's own view."""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections.abc import Callable, Mapping
from typing import Any, Final

import httpx

from egressd.pop.background import BackgroundTask
from egressd.pop.runtime import StateHolder

log = logging.getLogger("egressd.pop.health")

INTERVAL: Final = 2.0


def view_of(code: str, holder: StateHolder) -> dict[str, Any]:
    view = holder.view
    return {
        "up": sorted(view.up | {code}),
        "rtt_ms": {target: round(ms, 3) for (source, target), ms in view.rtt_ms.items()
                   if source == code and math.isfinite(ms)},
    }


class HealthReporter:
    def __init__(self, control_url: str, token: str, holders: Mapping[str, StateHolder], *,
                 interval: float = INTERVAL, verify: ssl.SSLContext | bool = True,
                 tunnels: Mapping[str, Callable[[], dict[str, Any]]] | None = None) -> None:
        self._base = control_url.rstrip("/")
        self._holders = dict(holders)
        self._tunnels = dict(tunnels or {})  # per PoP: the connectors attached to it now
        self._interval = interval
        self._client = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=5.0, verify=verify,
            trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))
        self._background = BackgroundTask(self._run, "health-reporter")
        self._failing = False

    def start(self) -> None:
        self._background.start()

    async def close(self) -> None:
        await self._background.stop()
        await self._client.aclose()

    async def report_once(self) -> None:
        for code, holder in self._holders.items():
            view = view_of(code, holder)
            if code in self._tunnels:  # attached connectors, where they attach
                view.update(self._tunnels[code]())
            response = await self._client.put(f"{self._base}/v1/pops/{code}/health", json=view)
            response.raise_for_status()

    async def _run(self) -> None:
        while True:
            try:
                await self.report_once()
                self._failing = False
            except httpx.HTTPError as error:
                if not self._failing:
                    log.warning("cannot report PoP health to %s: %s", self._base,
                                error or type(error).__name__)
                self._failing = True
            await asyncio.sleep(self._interval)
