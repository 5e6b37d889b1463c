"""A running PoP: its runtime, its listeners, the relay sweeper, drain and reload.

`PopServer` is the unit both `egressd pop` (one per process, several processes sharing
the ports with SO_REUSEPORT) and `egressd serve` (three in one process) run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Sequence
from pathlib import Path

from egressd.pop.listeners import Listener, ListenerSpec
from egressd.pop.runtime import PopRuntime

log = logging.getLogger("egressd.pop")


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["http/1.1"])
    return context


class PopServer:
    def __init__(self, runtime: PopRuntime, specs: Sequence[ListenerSpec], *,
                 tls_context: ssl.SSLContext | None = None, reuse_port: bool = False) -> None:
        self.runtime = runtime
        self.listeners = [
            Listener(runtime, spec, tls_context=tls_context if spec.tls else None, reuse_port=reuse_port)
            for spec in specs
        ]
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        started: list[Listener] = []
        try:
            for listener in self.listeners:
                await listener.start()
                started.append(listener)
        except OSError:
            for listener in started:  # no half-started PoP
                await listener.close()
            raise
        self._sweeper = asyncio.ensure_future(self.runtime.relays.run_sweeper())
        _ = self.runtime.poller  # made now, with the listeners: not by the first flow
        for listener in self.listeners:
            log.info("PoP %s listening on %s", self.runtime.code, listener.url)

    def listener(self, *, tls: bool) -> Listener:
        return next(listener for listener in self.listeners if listener.spec.tls == tls)

    def stop_accepting(self) -> None:
        self.runtime.draining = True
        for listener in self.listeners:
            listener.stop_accepting()

    def busy(self) -> int:
        """Flows still in progress: tunnels, and connections still in their handshake."""
        return len(self.runtime.relays) + sum(len(listener.tasks) + len(listener.handshakes)
                                              for listener in self.listeners)

    async def drain(self, grace_seconds: float) -> None:
        """Stop accepting; let flows in progress finish for up to `grace_seconds`."""
        await drain_all([self], grace_seconds)

    async def close(self) -> None:
        for listener in self.listeners:
            await listener.close()
        self.runtime.relays.close_all()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        self.runtime.pipes.close()
        self.runtime.spares.clear()
        self.runtime.close_poller()
        self.runtime.deadlines.close()
        self.runtime.flow_metrics.flush()


async def drain_all(servers: Sequence[PopServer], grace_seconds: float) -> None:
    """Stop every server accepting at once, wait (one grace for all) and close them."""
    for server in servers:
        server.stop_accepting()
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(server.busy() for server in servers):  # noqa: ASYNC110 - a computed condition, polled
        await asyncio.sleep(0.1)
    for server in servers:
        await server.close()
