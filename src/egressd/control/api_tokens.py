"""API tokens and the audit log: who may call the API, and what every change did."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from egressd.control.api_infra import Strict
from egressd.control.auth import create_token
from egressd.control.context import audit, problem_if
from egressd.control.deps import MAX_INT, NAME, Caller, Ctx
from egressd.control.document import aware
from egressd.control.problems import invalid, not_found
from egressd.control.tables import AccountRow, ApiTokenRow, AuditRow

router = APIRouter(prefix="/v1", tags=["deployment"])


# API tokens
# --------------------------------------------------------------------------------------


class TokenIn(Strict):
    name: str = Field(pattern=NAME)
    scope: Literal["deployment", "account", "pop"]
    account_id: str | None = Field(None, max_length=64)


class TokenOut(BaseModel):
    id: str
    name: str
    scope: str
    account_id: str | None
    created_at: datetime


class TokenCreated(TokenOut):
    token: str = Field(description="Shown once; only its SHA-256 is stored")


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(ctx: Ctx, caller: Caller) -> list[TokenOut]:
    with ctx.read() as session:
        query = select(ApiTokenRow).order_by(ApiTokenRow.created_at)
        if caller.scope != "deployment":
            caller.require_account(caller.account_id or "")
            query = query.where(ApiTokenRow.account_id == caller.account_id)
        return [TokenOut(id=row.id, name=row.name, scope=row.scope, account_id=row.account_id,
                         created_at=aware(row.created_at)) for row in session.scalars(query)]


@router.post("/tokens", response_model=TokenCreated, status_code=201)
def new_token(body: TokenIn, ctx: Ctx, caller: Caller) -> TokenCreated:
    """Deployment tokens make any token; an account token makes tokens of its own account."""
    problem_if((body.scope == "account") != (body.account_id is not None), invalid(
        "account_id is required for scope 'account' and only for it", field="account_id"))
    if body.scope == "account":
        caller.require_account(body.account_id or "")
    else:
        caller.require_deployment()
    with ctx.change() as session:
        if body.account_id is not None and session.get(AccountRow, body.account_id) is None:
            raise not_found("account", body.account_id)
        row, token = create_token(session, name=body.name, scope=body.scope,
                                  account_id=body.account_id)
        session.flush()
        audit(session, caller, action="create", resource=f"tokens/{row.id}",
              account_id=body.account_id, before=None,
              after={"name": row.name, "scope": row.scope})
        return TokenCreated(id=row.id, name=row.name, scope=row.scope, account_id=row.account_id,
                            created_at=aware(row.created_at), token=token)


@router.delete("/tokens/{token_id}", status_code=204)
def revoke_token(token_id: Annotated[str, Path(max_length=32)], ctx: Ctx, caller: Caller) -> Response:
    with ctx.change() as session:
        row = session.get(ApiTokenRow, token_id)
        if row is None or (caller.scope != "deployment" and row.account_id != caller.account_id):
            raise not_found("token", token_id)
        if row.account_id is not None:
            caller.require_account(row.account_id)
        else:
            caller.require_deployment()
        before = {"name": row.name, "scope": row.scope}
        session.delete(row)
        audit(session, caller, action="delete", resource=f"tokens/{token_id}",
              account_id=row.account_id, before=before, after=None)
    return Response(status_code=204)


# Audit log, PoP status, snapshot distribution
# --------------------------------------------------------------------------------------


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    resource: str
    account_id: str | None
    version: int
    before: dict[str, Any] | None
    after: dict[str, Any] | None


@router.get("/audit", response_model=list[AuditOut])
def audit_log(
    ctx: Ctx, caller: Caller,
    account_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_INT, description="Page: entries older than this id")] = None,
) -> list[AuditOut]:
    """Newest first. Account tokens see their own account's entries only."""
    if caller.scope != "deployment":
        caller.require_account(account_id or caller.account_id or "")
        account_id = caller.account_id
    with ctx.read() as session:
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if account_id is not None:
            query = query.where(AuditRow.account_id == account_id)
        if before_id is not None:
            query = query.where(AuditRow.id < before_id)
        return [AuditOut(id=row.id, at=aware(row.at), actor=row.actor, action=row.action,
                         resource=row.resource, account_id=row.account_id, version=row.version,
                         before=row.before, after=row.after) for row in session.scalars(query)]
