"""Accounts, Settings › Network, and dedicated locations with the R2 rules."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from egressd.control.context import problem_if, record
from egressd.control.deps import MAX_INT, SLUG, AccountId, Caller, Ctx
from egressd.control.document import aware
from egressd.control.problems import conflict, invalid, not_found
from egressd.control.tables import (
    AccountRow,
    AddressRow,
    DataCenterRow,
    DeploymentSettingsRow,
    LocationRow,
    QuarantineRow,
)

router = APIRouter(prefix="/v1", tags=["accounts"])

Plan = Literal["free", "enterprise"]
FallbackName = Literal["closed", "shared"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NetworkSettings(Strict):
    """Settings › Network. `proxy_udp` needs `proxy_tcp` (R3)."""

    proxy_tcp: bool = Field(True, description="Route TCP through the dedicated egress IPs")
    proxy_udp: bool = Field(False, description="Route UDP (HTTP/3) too; needs proxy_tcp")
    fallback: FallbackName = Field("closed", description="No dedicated location usable: "
                                   "'closed' refuses the flow, 'shared' leaves from shared")


class NetworkPatch(Strict):
    proxy_tcp: bool | None = None
    proxy_udp: bool | None = None
    fallback: FallbackName | None = None


class AccountIn(Strict):
    id: str = Field(pattern=SLUG, description="Stable id: lower case, digits, - and _")
    name: str = Field(min_length=1, max_length=200)
    plan: Plan = "free"
    network: NetworkSettings = NetworkSettings()


class AccountPatch(Strict):
    name: str | None = Field(None, min_length=1, max_length=200)
    plan: Plan | None = None


class Dedicated(BaseModel):
    status: Literal["active", "needs-second-city", "none"]
    cities: list[str]
    detail: str


class AccountOut(BaseModel):
    id: str
    name: str
    plan: Plan
    network: NetworkSettings
    dedicated: Dedicated
    created_at: datetime


class LocationIn(Strict):
    id: str | None = Field(None, pattern=SLUG, description="Defaults to the PoP's code")
    ipv4: ipaddress.IPv4Address = Field(description="A dedicated IPv4 address of the inventory")
    ipv6: ipaddress.IPv6Network | None = Field(
        None, description="A dedicated IPv6 range of the inventory, at the same PoP")
    confirmed: bool = Field(False, description="Allowlists are already updated (or need none): "
                            "use the address at once instead of after confirmation (R2)")


class LocationOut(BaseModel):
    id: str
    account_id: str
    pop: str
    city: str
    ipv4: str
    ipv6: str | None
    state: Literal["pending", "active"]
    assigned_at: datetime


def account_out(session: Session, row: AccountRow) -> AccountOut:
    return AccountOut(
        id=row.id, name=row.name, plan=row.plan,
        network=NetworkSettings(proxy_tcp=row.proxy_tcp, proxy_udp=row.proxy_udp,
                                fallback=row.fallback),
        dedicated=dedicated_status(session, row), created_at=aware(row.created_at),
    )


def dedicated_status(session: Session, row: AccountRow) -> Dedicated:
    """R2 spelled out: active only with active locations in two different cities."""
    rows = session.execute(
        select(LocationRow.state, DataCenterRow.city)
        .join(AddressRow, AddressRow.address == LocationRow.ipv4)
        .join(DataCenterRow, DataCenterRow.code == AddressRow.data_center)
        .where(LocationRow.account_id == row.id)
    ).all()
    if not rows:
        return Dedicated(status="none", cities=[], detail="no dedicated locations")
    cities = sorted({city for state, city in rows if state == "active"})
    pending = sum(1 for state, _ in rows if state == "pending")
    waiting = f"; {pending} pending allowlist confirmation" if pending else ""
    if row.plan != "enterprise":
        return Dedicated(status="needs-second-city", cities=cities,
                         detail="dedicated egress needs the enterprise plan")
    if len(cities) >= 2:
        return Dedicated(status="active", cities=cities,
                         detail=f"active in {', '.join(cities)}{waiting}")
    return Dedicated(status="needs-second-city", cities=cities,
                     detail=f"inactive: needs active locations in at least two cities "
                     f"(has {len(cities)}){waiting}")


def account_dict(row: AccountRow) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "plan": row.plan, "proxy_tcp": row.proxy_tcp,
            "proxy_udp": row.proxy_udp, "fallback": row.fallback}


def get_account(session: Session, account_id: str) -> AccountRow:
    row = session.get(AccountRow, account_id)
    if row is None:
        raise not_found("account", account_id)
    return row


@router.get("/accounts", response_model=list[AccountOut])
def list_accounts(
    ctx: Ctx, caller: Caller,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> list[AccountOut]:
    with ctx.read() as session:
        query = select(AccountRow).order_by(AccountRow.id).limit(limit).offset(offset)
        if caller.scope != "deployment":
            caller.require_account(caller.account_id or "")
            query = query.where(AccountRow.id == caller.account_id)
        return [account_out(session, row) for row in session.scalars(query)]


@router.post("/accounts", response_model=AccountOut, status_code=201)
def create_account(body: AccountIn, ctx: Ctx, caller: Caller) -> AccountOut:
    caller.require_deployment()
    _check_r3(body.network.proxy_tcp, body.network.proxy_udp)
    with ctx.change() as session:
        problem_if(session.get(AccountRow, body.id) is not None,
                   conflict(f"account {body.id!r} already exists", field="id"))
        row = AccountRow(id=body.id, name=body.name, plan=body.plan,
                         proxy_tcp=body.network.proxy_tcp, proxy_udp=body.network.proxy_udp,
                         fallback=body.network.fallback, created_at=datetime.now(UTC))
        session.add(row)
        record(session, caller, action="create", resource=f"accounts/{row.id}",
               account_id=row.id, before=None, after=account_dict(row), validate=[row.id])
        return account_out(session, row)


@router.get("/accounts/{account_id}", response_model=AccountOut)
def read_account(account_id: AccountId, ctx: Ctx, caller: Caller) -> AccountOut:
    caller.require_account(account_id)
    with ctx.read() as session:
        return account_out(session, get_account(session, account_id))


@router.patch("/accounts/{account_id}", response_model=AccountOut)
def update_account(account_id: AccountId, body: AccountPatch, ctx: Ctx, caller: Caller) -> AccountOut:
    caller.require_account(account_id)
    if body.plan is not None:
        caller.require_deployment()  # an account cannot change its own plan
    with ctx.change() as session:
        row = get_account(session, account_id)
        before = account_dict(row)
        if body.name is not None:
            row.name = body.name
        if body.plan is not None:
            has_locations = session.scalar(
                select(func.count()).select_from(LocationRow)
                .where(LocationRow.account_id == account_id))
            problem_if(body.plan != "enterprise" and bool(has_locations), invalid(
                "dedicated egress is enterprise-only: release the account's dedicated "
                "locations before leaving the enterprise plan", field="plan", rule="R2"))
            row.plan = body.plan
        record(session, caller, action="update", resource=f"accounts/{account_id}",
               account_id=account_id, before=before, after=account_dict(row),
               validate=[account_id])
        return account_out(session, row)


@router.delete("/accounts/{account_id}", status_code=204)
def delete_account(account_id: AccountId, ctx: Ctx, caller: Caller) -> Response:
    caller.require_deployment()
    with ctx.change() as session:
        row = get_account(session, account_id)
        before = account_dict(row)
        for location in session.scalars(
            select(LocationRow).where(LocationRow.account_id == account_id)
        ):
            _quarantine(session, location, account_id)
            session.delete(location)
        session.flush()
        session.delete(row)
        record(session, caller, action="delete", resource=f"accounts/{account_id}",
               account_id=account_id, before=before, after=None, validate=[])
    return Response(status_code=204)


@router.get("/accounts/{account_id}/settings/network", response_model=NetworkSettings)
def read_network(account_id: AccountId, ctx: Ctx, caller: Caller) -> NetworkSettings:
    caller.require_account(account_id)
    with ctx.read() as session:
        row = get_account(session, account_id)
        return NetworkSettings(proxy_tcp=row.proxy_tcp, proxy_udp=row.proxy_udp,
                               fallback=row.fallback)


@router.patch("/accounts/{account_id}/settings/network", response_model=NetworkSettings)
def update_network(
    account_id: AccountId, body: NetworkPatch, ctx: Ctx, caller: Caller
) -> NetworkSettings:
    caller.require_account(account_id)
    with ctx.change() as session:
        row = get_account(session, account_id)
        before = account_dict(row)
        tcp = row.proxy_tcp if body.proxy_tcp is None else body.proxy_tcp
        udp = row.proxy_udp if body.proxy_udp is None else body.proxy_udp
        if body.proxy_tcp is False and body.proxy_udp is None:
            udp = False  # turning TCP off turns UDP off with it (R3)
        _check_r3(tcp, udp)
        row.proxy_tcp, row.proxy_udp = tcp, udp
        if body.fallback is not None:
            row.fallback = body.fallback
        record(session, caller, action="update",
               resource=f"accounts/{account_id}/settings/network", account_id=account_id,
               before=before, after=account_dict(row), validate=[account_id])
        return NetworkSettings(proxy_tcp=row.proxy_tcp, proxy_udp=row.proxy_udp,
                               fallback=row.fallback)


def _check_r3(tcp: bool, udp: bool) -> None:
    problem_if(udp and not tcp, invalid(
        "proxy.udp needs proxy.tcp: UDP through dedicated IPs is only offered with TCP",
        field="proxy_udp", rule="R3"))


# Dedicated locations (R2)
# --------------------------------------------------------------------------------------


def location_out(session: Session, row: LocationRow) -> LocationOut:
    address = session.get(AddressRow, row.ipv4)
    pop = address.data_center if address else "?"
    dc = session.get(DataCenterRow, pop)
    return LocationOut(id=row.id, account_id=row.account_id, pop=pop, city=dc.city if dc else "?",
                       ipv4=row.ipv4, ipv6=row.ipv6, state=row.state,
                       assigned_at=aware(row.assigned_at))


def location_dict(row: LocationRow) -> dict[str, Any]:
    return {"id": row.id, "ipv4": row.ipv4, "ipv6": row.ipv6, "state": row.state}


@router.get("/accounts/{account_id}/locations", response_model=list[LocationOut])
def list_locations(account_id: AccountId, ctx: Ctx, caller: Caller) -> list[LocationOut]:
    caller.require_account(account_id)
    with ctx.read() as session:
        get_account(session, account_id)
        rows = session.scalars(select(LocationRow).where(LocationRow.account_id == account_id)
                               .order_by(LocationRow.id))
        return [location_out(session, row) for row in rows]


def _inventory(session: Session, address: str, family: int, field: str) -> AddressRow:
    # FOR UPDATE (PostgreSQL): concurrent assignments of one address queue here, so the
    # ownership check below sees the winner's row and answers with its R2 conflict.
    row = session.get(AddressRow, address, with_for_update=True)
    if row is None or row.kind != "dedicated" or row.family != family:
        raise invalid(f"{address} is not a dedicated {'IPv4 address' if family == 4 else 'IPv6 range'}"
                      " of the address inventory", field=field, rule="R2")
    return row


def _check_quarantine(session: Session, address: str, account_id: str, field: str) -> None:
    row = session.get(QuarantineRow, address)
    if row is not None and aware(row.until) > datetime.now(UTC) and row.released_by != account_id:
        raise conflict(f"{address} was released and is quarantined until "
                       f"{aware(row.until).isoformat()}; it cannot be reassigned before then",
                       field=field, rule="R2")


@router.post("/accounts/{account_id}/locations", response_model=LocationOut, status_code=201)
def assign_location(account_id: AccountId, body: LocationIn, ctx: Ctx, caller: Caller) -> LocationOut:
    """Assign a dedicated IPv4 address (and IPv6 range) of the inventory to the account."""
    caller.require_account(account_id)
    with ctx.change() as session:
        account = get_account(session, account_id)
        problem_if(account.plan != "enterprise", invalid(
            "dedicated egress IPs are for enterprise accounts only", field="plan", rule="R2"))
        ipv4 = str(body.ipv4)
        v4_row = _inventory(session, ipv4, 4, "ipv4")
        ipv6 = str(body.ipv6) if body.ipv6 is not None else None
        if ipv6 is not None:
            v6_row = _inventory(session, ipv6, 6, "ipv6")
            problem_if(v6_row.data_center != v4_row.data_center, invalid(
                f"the IPv6 range is at {v6_row.data_center}, the IPv4 address at "
                f"{v4_row.data_center}: a location lives at one PoP", field="ipv6", rule="R2"))
        for address, field in ((ipv4, "ipv4"), (ipv6, "ipv6")):
            if address is None:
                continue
            owner = session.scalar(select(LocationRow.account_id).where(
                (LocationRow.ipv4 == address) | (LocationRow.ipv6 == address)))
            problem_if(owner is not None, conflict(
                f"{address} is already assigned" + (" to this account" if owner == account_id
                                                    else " to another account"),
                field=field, rule="R2"))
            _check_quarantine(session, address, account_id, field)
        location_id = body.id or _free_location_id(session, account_id, v4_row.data_center)
        problem_if(session.get(LocationRow, (account_id, location_id)) is not None,
                   conflict(f"location {location_id!r} already exists", field="id"))
        row = LocationRow(account_id=account_id, id=location_id, ipv4=ipv4, ipv6=ipv6,
                          state="active" if body.confirmed else "pending",
                          assigned_at=datetime.now(UTC))
        session.add(row)
        for address in (ipv4, ipv6):
            if address is not None and (q := session.get(QuarantineRow, address)) is not None:
                session.delete(q)  # the same account taking its address back
        record(session, caller, action="assign", resource=f"accounts/{account_id}/locations/"
               f"{location_id}", account_id=account_id, before=None, after=location_dict(row),
               validate=[account_id])
        return location_out(session, row)


def _free_location_id(session: Session, account_id: str, pop: str) -> str:
    taken = set(session.scalars(select(LocationRow.id).where(LocationRow.account_id == account_id)))
    candidate, number = pop, 2
    while candidate in taken:
        candidate, number = f"{pop}-{number}", number + 1
    return candidate


LocationId = Annotated[str, Path(max_length=64)]


def _get_location(session: Session, account_id: str, location_id: str) -> LocationRow:
    get_account(session, account_id)
    row = session.get(LocationRow, (account_id, location_id))
    if row is None:
        raise not_found("location", location_id)
    return row


@router.get("/accounts/{account_id}/locations/{location_id}", response_model=LocationOut)
def read_location(account_id: AccountId, location_id: LocationId, ctx: Ctx, caller: Caller) -> LocationOut:
    caller.require_account(account_id)
    with ctx.read() as session:
        return location_out(session, _get_location(session, account_id, location_id))


@router.post("/accounts/{account_id}/locations/{location_id}/confirm", response_model=LocationOut)
def confirm_location(
    account_id: AccountId, location_id: LocationId, ctx: Ctx, caller: Caller
) -> LocationOut:
    """The administrator confirms allowlists are updated: the address goes into use (R2)."""
    caller.require_account(account_id)
    with ctx.change() as session:
        row = _get_location(session, account_id, location_id)
        before = location_dict(row)
        row.state = "active"
        record(session, caller, action="confirm",
               resource=f"accounts/{account_id}/locations/{location_id}",
               account_id=account_id, before=before, after=location_dict(row),
               validate=[account_id])
        return location_out(session, row)


@router.delete("/accounts/{account_id}/locations/{location_id}", status_code=204)
def release_location(
    account_id: AccountId, location_id: LocationId, ctx: Ctx, caller: Caller
) -> Response:
    """Release: the addresses go into quarantine for the deployment's cool-down (R2)."""
    caller.require_account(account_id)
    with ctx.change() as session:
        row = _get_location(session, account_id, location_id)
        before = location_dict(row)
        _quarantine(session, row, account_id)
        session.delete(row)
        record(session, caller, action="release",
               resource=f"accounts/{account_id}/locations/{location_id}",
               account_id=account_id, before=before, after=None, validate=[account_id])
    return Response(status_code=204)


def _quarantine(session: Session, row: LocationRow, account_id: str) -> None:
    settings = session.get(DeploymentSettingsRow, 1)
    days = settings.quarantine_days if settings else 30
    until = datetime.now(UTC) + timedelta(days=days)
    for address in (row.ipv4, row.ipv6):
        if address is None:
            continue
        existing = session.get(QuarantineRow, address)
        if existing is not None:
            existing.released_by, existing.until = account_id, until
        else:
            session.add(QuarantineRow(address=address, released_by=account_id, until=until))
