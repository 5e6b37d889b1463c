"""Ships finished flows to the control plane's live feed (the dashboard's flow log tail).

Best effort by design: the flow log file on the PoP is the record. Records wait in a
bounded queue and go out in batches every half second; when the control plane is away the
oldest are dropped (and counted) rather than growing the PoP's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from typing import Final

import httpx

from egressd.pop.background import BackgroundTask

log = logging.getLogger("egressd.pop.flows")

QUEUE_LIMIT: Final = 10_000
BATCH: Final = 1000
INTERVAL: Final = 0.5


class FlowShipper:
    def __init__(self, control_url: str, token: str, *, interval: float = INTERVAL,
                 verify: ssl.SSLContext | bool = True,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._endpoint = control_url.rstrip("/") + "/v1/flows"
        self._queue: deque[str] = deque(maxlen=QUEUE_LIMIT)  # flow log lines (JSON objects)
        self._interval = interval
        self._wake = asyncio.Event()
        self._client = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=10.0, transport=transport,
            verify=verify, trust_env=False,
            # No idle connection between batches: nothing held open on either side.
            limits=httpx.Limits(max_keepalive_connections=0))
        self._background = BackgroundTask(self._run, "flow-shipper")
        self.sent = 0
        self.dropped = 0
        self._failing = False

    def __call__(self, line: str) -> None:
        """A FlowLog sink: called on the event loop with every finished flow's log line."""
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(line)
        if len(self._queue) >= BATCH:
            self._wake.set()

    def start(self) -> None:
        self._background.start()

    async def close(self) -> None:
        await self._background.stop()
        with contextlib.suppress(httpx.HTTPError):
            await self._send()  # what is left, once
        await self._client.aclose()

    async def _run(self) -> None:
        delay = self._interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._send()
            except httpx.HTTPError as error:
                if not self._failing:
                    log.warning("cannot ship flows to %s: %s (retrying; the flow log file "
                                "keeps every flow)", self._endpoint, error or type(error).__name__)
                self._failing = True
                delay = min(delay * 2, 5.0)
                continue
            if self._failing:
                log.info("shipping flows to %s again", self._endpoint)
            self._failing = False
            delay = self._interval

    async def _send(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            try:
                # The lines are JSON objects already: the body is joined, not encoded again.
                body = ('{"flows":[' + ",".join(batch) + "]}").encode()
                response = await self._client.post(self._endpoint, content=body,
                                                   headers={"Content-Type": "application/json"})
                if response.status_code >= 400:
                    raise httpx.HTTPStatusError(f"HTTP {response.status_code}",
                                                request=response.request, response=response)
            except BaseException:
                self._queue.extendleft(reversed(batch))  # back in front, in order
                raise
            self.sent += len(batch)

