"""Running the control plane's app inside our own event loop (uvicorn as a library).

`egressd control serve` and `egressd serve` both start it this way, so signals stay with
the command (uvicorn's own handlers would take Ctrl-C from the all-in-one stack).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("egressd.control")


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the command owns SIGINT/SIGTERM


@dataclass
class ControlServer:
    app: FastAPI
    host: str = "127.0.0.1"
    port: int = 18070
    log_level: str = "warning"

    def __post_init__(self) -> None:
        config = uvicorn.Config(
            self.app, host=self.host, port=self.port, log_level=self.log_level,
            lifespan="on", access_log=self.log_level == "debug", timeout_graceful_shutdown=5,
        )
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.bound_port}"

    @property
    def bound_port(self) -> int:
        for server in self._server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.port

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="egressd-control")
        while not self._server.started:
            if self._task.done():
                with contextlib.suppress(SystemExit):  # uvicorn exits on a bind error
                    self._task.result()
                raise OSError(f"control plane could not listen on {self.host}:{self.port} "
                              "(address in use?)")
            await asyncio.sleep(0.02)
        log.info("control plane listening on %s", self.url)

    async def stop(self) -> None:
        ctx = getattr(self.app.state, "ctx", None)
        if ctx is not None:
            await ctx.publisher.release_waiters()
        flows = getattr(self.app.state, "flows", None)
        if flows is not None:
            await flows.release_waiters()
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
