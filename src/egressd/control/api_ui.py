"""Read-only aggregates the dashboard needs and the resource endpoints do not give cheaply.

Everything the dashboard changes goes through the ordinary endpoints; these four only read:

- `GET /v1/ui/session`: who the token is (scope, account), so the page knows what to show.
- `GET /v1/ui/accounts?q=`: an account picker over thousands of accounts — id, name and
  plan of the first matches, one query, no per-account dedicated status (GET /v1/accounts
  computes that per account).
- `GET /v1/ui/pops`: which snapshot version each PoP confirmed, for admin *and* account
  tokens (GET /v1/version is for PoP and deployment tokens): an account administrator
  sees the change they just saved reach the PoPs. Replica names are left out.
- `GET /v1/ui/accounts/{id}/quarantine`: the account's released addresses still in their
  cool-down (R2), which no other endpoint lists.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import func, or_, select

from egressd.control.api_accounts import get_account
from egressd.control.api_infra import PopView, pop_view
from egressd.control.auth import Principal
from egressd.control.deps import AccountId, Caller, Ctx
from egressd.control.document import aware, current_version
from egressd.control.problems import Problem
from egressd.control.tables import AccountRow, AddressRow, DataCenterRow, QuarantineRow

router = APIRouter(prefix="/v1/ui", tags=["dashboard"])


class SessionOut(BaseModel):
    scope: Literal["deployment", "account", "pop"]
    name: str
    account_id: str | None


class AccountBrief(BaseModel):
    id: str
    name: str
    plan: Literal["free", "enterprise"]


class AccountIndex(BaseModel):
    total: int = Field(description="How many accounts match (all of them without `q`)")
    accounts: list[AccountBrief]


class PopHealth(BaseModel):
    pop: str
    version: int = Field(description="The version the PoP confirmed (runs)")
    current: bool = Field(description="Runs the newest version")
    seen_at: datetime
    seconds_since_seen: float
    view: PopView | None = Field(None, description="Its peers and RTTs, as it last reported")


class PopsOut(BaseModel):
    version: int = Field(description="The newest snapshot version")
    pops: list[PopHealth]


class QuarantinedOut(BaseModel):
    address: str
    family: Literal[4, 6]
    data_center: str
    city: str
    until: datetime


def _dashboard_caller(caller: Principal) -> None:
    if caller.scope == "pop":
        raise Problem(403, "Forbidden", "the dashboard needs an admin or account token, "
                      "not a PoP token", kind="forbidden")


@router.get("/session", response_model=SessionOut)
def session_info(caller: Caller) -> SessionOut:
    return SessionOut(scope=caller.scope,
                      name=caller.name, account_id=caller.account_id)


@router.get("/accounts", response_model=AccountIndex)
def account_index(
    ctx: Ctx, caller: Caller,
    q: Annotated[str, Query(max_length=64, description="Part of the id or name")] = "",
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> AccountIndex:
    """Accounts by id whose id or name contains `q`; an account token sees its own."""
    _dashboard_caller(caller)
    with ctx.read() as session:
        query = select(AccountRow.id, AccountRow.name, AccountRow.plan)
        if caller.scope != "deployment":
            query = query.where(AccountRow.id == caller.account_id)
        if q:
            pattern = "%" + q.lower().replace("\\", "\\\\").replace("%", "\\%").replace(
                "_", "\\_") + "%"
            query = query.where(or_(AccountRow.id.like(pattern, escape="\\"),
                                    func.lower(AccountRow.name).like(pattern, escape="\\")))
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.execute(query.order_by(AccountRow.id).limit(limit)).all()
        return AccountIndex(total=total, accounts=[
            AccountBrief(id=row.id, name=row.name, plan=row.plan)
            for row in rows])


@router.get("/pops", response_model=PopsOut)
def pops(ctx: Ctx, caller: Caller) -> PopsOut:
    """The newest version and the version each PoP confirmed, with when it was last heard."""
    _dashboard_caller(caller)
    now = datetime.now(UTC)
    with ctx.read() as session:
        newest = current_version(session)
    return PopsOut(version=newest, pops=[
        PopHealth(pop=row.pop, version=row.version, current=row.version >= newest,
                  seen_at=aware(row.seen_at),
                  seconds_since_seen=round((now - aware(row.seen_at)).total_seconds(), 3),
                  view=pop_view(row.health, now))
        for row in ctx.publisher.pop_statuses()])


@router.get("/accounts/{account_id}/quarantine", response_model=list[QuarantinedOut])
def quarantine(account_id: AccountId, ctx: Ctx, caller: Caller) -> list[QuarantinedOut]:
    """Addresses this account released that cannot be given to another before `until`."""
    caller.require_account(account_id)
    now = datetime.now(UTC)
    with ctx.read() as session:
        get_account(session, account_id)
        rows = session.execute(
            select(QuarantineRow.address, QuarantineRow.until, AddressRow.family,
                   AddressRow.data_center, DataCenterRow.city)
            .join(AddressRow, AddressRow.address == QuarantineRow.address)
            .join(DataCenterRow, DataCenterRow.code == AddressRow.data_center)
            .where(QuarantineRow.released_by == account_id)
            .order_by(AddressRow.data_center, AddressRow.family, QuarantineRow.address)
        ).all()
        return [QuarantinedOut(address=row.address, family=row.family,
                               data_center=row.data_center, city=row.city,
                               until=aware(row.until))
                for row in rows if aware(row.until) > now]
