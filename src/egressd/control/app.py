"""The control plane's ASGI app: REST API under /v1, geofeed, snapshot long-poll."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from sqlalchemy import Engine

from egressd import __version__
from egressd.control import (
    api_accounts,
    api_device,
    api_enrollment,
    api_flows,
    api_identity,
    api_infra,
    api_policies,
    api_tokens,
    api_tunnels,
    api_ui,
    problems,
    ui,
)
from egressd.control.context import ControlContext
from egressd.control.db import make_engine, migrate, sessions
from egressd.control.flowfeed import FlowFeed
from egressd.control.publisher import Publisher
from egressd.throttle import AuthThrottle

log = logging.getLogger("egressd.control")


@dataclass
class ControlSettings:
    database_url: str = "sqlite:///.egressd/control.db"
    replica: str = ""  # shown in PoP status; defaults to host:pid
    poll_interval: float = 0.2
    auth_failures_per_source: int = 20  # failed token checks per minute; 0: no limit


def create_app(settings: ControlSettings, *, engine: Engine | None = None) -> FastAPI:
    engine = engine or make_engine(settings.database_url)
    migrate(engine)
    factory = sessions(engine)
    replica = settings.replica or f"{socket.gethostname()}:{os.getpid()}"
    publisher = Publisher(factory, replica=replica, poll_interval=settings.poll_interval)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await publisher.start()
        try:
            yield
        finally:
            await publisher.stop()

    app = FastAPI(
        title="egressd control plane",
        version=__version__,
        description="Accounts, dedicated egress IPs, policies and devices of an egressd "
        "deployment. Every change produces a new snapshot version that the PoPs apply "
        "within 2 seconds. Errors are RFC 9457 problem documents.",
        lifespan=lifespan,
    )
    app.state.ctx = ControlContext(sessions=factory, publisher=publisher)
    app.state.engine = engine
    app.state.flows = FlowFeed()
    app.state.auth_throttle = AuthThrottle(settings.auth_failures_per_source, 60.0)
    problems.install(app)
    app.include_router(api_infra.router)
    app.include_router(api_tokens.router)
    app.include_router(api_infra.public)
    app.include_router(api_accounts.router)
    app.include_router(api_identity.router)
    app.include_router(api_enrollment.router)
    app.include_router(api_device.router)
    app.include_router(api_policies.router)
    app.include_router(api_tunnels.router)
    app.include_router(api_ui.router)
    app.include_router(ui.router)
    app.include_router(api_flows.router)
    return app

