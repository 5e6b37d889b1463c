"""FastAPI dependencies shared by the routers: the context and the authenticated caller."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from egressd.control.auth import Principal, authenticate
from egressd.control.context import ControlContext

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
    with get_ctx(request).read() as session:
        return authenticate(session, header)


Ctx = Annotated[ControlContext, Depends(get_ctx)]
Caller = Annotated[Principal, Depends(get_principal)]
AccountId = Annotated[str, Path(description="Account id", max_length=64)]
