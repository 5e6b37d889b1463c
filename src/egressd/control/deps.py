"""FastAPI dependencies shared by the routers: the context and the authenticated caller."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from egressd.control.auth import Principal, authenticate
from egressd.control.context import ControlContext
from egressd.control.problems import Problem
from egressd.throttle import AuthThrottle

log = logging.getLogger("egressd.control")

bearer = HTTPBearer(auto_error=False, description="An admin, account or PoP token (egd_...)")

SLUG = r"^[a-z0-9][a-z0-9_-]{0,62}$"
SLUG_RE = re.compile(SLUG)
NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$"
MAX_INT = 2**63 - 1  # the store's BIGINT: larger numbers in a query are refused, not a 500


def get_ctx(request: Request) -> ControlContext:
    ctx: ControlContext = request.app.state.ctx
    return ctx


def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    header = f"Bearer {credentials.credentials}" if credentials else None
    with throttled(request, counts=header is not None), get_ctx(request).read() as session:
        return authenticate(session, header)


@contextmanager
def throttled(request: Request, *, counts: bool = True) -> Iterator[None]:
    """Refuse a source past its limit of failed authentications (429, Retry-After), and
    count the 401s raised inside. A missing token is not a guess: it is not counted."""
    throttle: AuthThrottle = request.app.state.auth_throttle
    source = request.client.host if request.client else "?"
    wait = throttle.retry_after(source)
    if wait > 0:
        raise Problem(429, "Too many requests", f"too many failed authentications from "
                      f"{source}; retry in {math.ceil(wait)} s", kind="rate-limited",
                      headers={"Retry-After": str(math.ceil(wait))})
    try:
        yield
    except Problem as problem:
        if problem.status == 401 and counts and throttle.failed(source):
            log.warning("control: %s reached %d failed authentications in %g s; refusing "
                        "its attempts until the window ends", source, throttle.limit,
                        throttle.window)
        raise


Ctx = Annotated[ControlContext, Depends(get_ctx)]
Caller = Annotated[Principal, Depends(get_principal)]
AccountId = Annotated[str, Path(description="Account id", max_length=64)]
