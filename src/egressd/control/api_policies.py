"""Egress policies (R6) and private routes (R4) of an account.

Policies are an ordered list; the first match wins; they only choose the egress. Each is
stored as its table in the deployment file's schema (`PolicyRow.body`, see
`egressd.model.deployment._policy`), so the API accepts exactly what a PoP loads.
References (users, devices, locations, PoPs), CIDRs, ports and the R2/R4/R6 rules are
checked by the loader the PoPs run, inside the change's transaction (`record(...,
validate=[account])`); its issues come back against the request's own fields (`primary`),
with the full document paths in `errors`. Group names are checked here, because the
document has no list of groups.

Private routes: destinations reached through a tunnel connector or a WAN link; flows to
them always leave from shared addresses (R4).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from egressd.control.api_accounts import get_account
from egressd.control.auth import Principal
from egressd.control.context import problem_if, record
from egressd.control.deps import NAME, SLUG, AccountId, Caller, Ctx
from egressd.control.problems import conflict, fields_of, invalid, not_found
from egressd.control.tables import AccountRow, GroupRow, PolicyRow, PrivateRouteRow

router = APIRouter(prefix="/v1", tags=["policies"])

SELECTORS = ("users", "groups", "devices", "destinations", "ports", "protocols",
             "connected_pops")
ACTION_KEYS = ("primary", "secondary", "ipv6")
RESERVED_IDS = frozenset({"order"})  # PUT .../policies/order reorders
PolicyId = Annotated[str, Path(max_length=64)]
RouteId = Annotated[str, Path(max_length=64)]
Item = Annotated[str, Field(min_length=1, max_length=253)]


def _items(description: str = "", max_length: int = 1000) -> Any:
    return Field(default_factory=list, max_length=max_length, description=description)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicyFields(Strict):
    """A policy as in the deployment file; an empty selector list matches anything."""

    name: str = Field(default="", max_length=200, description="A description")
    users: list[Item] = _items("User names of the account")
    groups: list[Item] = _items("Group names of the account (any of them)")
    devices: list[Item] = _items("Device ids of the account")
    destinations: list[Item] = _items(
        "CIDRs and hostname patterns (`example.com`, `*.example.com`) in one list")
    ports: list[Annotated[str, Field(max_length=11)] | int] = _items('`443` or `"8000-8099"`')
    protocols: list[Item] = _items("`tcp`, `udp` (`dns` is never policy-decided, R4)", 3)
    connected_pops: list[Item] = _items("Codes of the PoPs the device is attached to")
    action: Literal["shared", "dedicated"]
    primary: str | None = Field(default=None, max_length=64,
                                description="dedicated: the IPv4 location id")
    secondary: str | None = Field(default=None, max_length=64, description=(
        "dedicated: another location id, or `shared`; the IPv4 failover (R11)"))
    ipv6: str | None = Field(default=None, max_length=64, description=(
        "dedicated: the IPv6 location id (default: `primary`)"))


class PolicyIn(PolicyFields):
    id: str = Field(pattern=SLUG)
    position: int | None = Field(default=None, ge=0, description="0 is first; default: last")


class PolicyReplace(PolicyFields):
    id: str | None = Field(default=None, max_length=64, description="If given, the path's id")


class PolicyPatch(Strict):
    name: str | None = Field(default=None, max_length=200)
    users: list[Item] | None = Field(default=None, max_length=1000)
    groups: list[Item] | None = Field(default=None, max_length=1000)
    devices: list[Item] | None = Field(default=None, max_length=1000)
    destinations: list[Item] | None = Field(default=None, max_length=1000)
    ports: list[Annotated[str, Field(max_length=11)] | int] | None = Field(
        default=None, max_length=1000)
    protocols: list[Item] | None = Field(default=None, max_length=3)
    connected_pops: list[Item] | None = Field(default=None, max_length=1000)
    action: Literal["shared", "dedicated"] | None = None
    primary: str | None = Field(default=None, max_length=64)
    secondary: str | None = Field(default=None, max_length=64)
    ipv6: str | None = Field(default=None, max_length=64)


class PolicyOut(BaseModel):
    id: str
    position: int = Field(description="0 is evaluated first")
    name: str
    users: list[str]
    groups: list[str]
    devices: list[str]
    destinations: list[str]
    ports: list[str]
    protocols: list[str]
    connected_pops: list[str]
    action: Literal["shared", "dedicated"]
    primary: str | None
    secondary: str | None
    ipv6: str | None = Field(description="Set, or null to follow `primary`")


class PolicyOrder(Strict):
    ids: list[Annotated[str, Field(max_length=64)]] = Field(
        max_length=10000, description="Every policy id of the account, in the new order")


class RouteFields(Strict):
    kind: Literal["tunnel", "wan"] = "tunnel"
    via: str = Field(pattern=NAME, description="The connector id (tunnel) or WAN link name")
    destinations: list[Item] = Field(min_length=1, max_length=1000,
                                     description="CIDRs and hostname patterns")


class RouteIn(RouteFields):
    id: str = Field(pattern=SLUG)


class RouteReplace(RouteFields):
    id: str | None = Field(default=None, max_length=64, description="If given, the path's id")


class RouteOut(BaseModel):
    id: str
    kind: Literal["tunnel", "wan"]
    via: str
    destinations: list[str]


# Policies
# --------------------------------------------------------------------------------------


def _lock_account(session: Session, account_id: str) -> AccountRow:
    """Row-lock the account (PostgreSQL) so concurrent edits of one list serialise."""
    row = session.scalar(select(AccountRow).where(AccountRow.id == account_id).with_for_update())
    if row is None:
        raise not_found("account", account_id)
    return row


def _ordered(session: Session, account_id: str) -> list[PolicyRow]:
    return list(session.scalars(select(PolicyRow).where(PolicyRow.account_id == account_id)
                                .order_by(PolicyRow.position, PolicyRow.id)))


def _get_policy(session: Session, account_id: str, policy_id: str) -> PolicyRow:
    get_account(session, account_id)
    row = session.get(PolicyRow, (account_id, policy_id))
    if row is None:
        raise not_found("policy", policy_id)
    return row


def _fields(body: dict[str, Any]) -> dict[str, Any]:
    """A stored body with every field present (defaults for the absent ones)."""
    return {"name": body.get("name", ""),
            **{key: list(body.get(key, [])) for key in SELECTORS},
            "action": body.get("action", "shared"),
            **{key: body.get(key) for key in ACTION_KEYS}}


def _policy_out(row: PolicyRow, position: int) -> PolicyOut:
    fields = _fields(row.body)
    fields["ports"] = [str(port) for port in fields["ports"]]
    return PolicyOut(id=row.id, position=position, **fields)


def _audit(row: PolicyRow, position: int) -> dict[str, Any]:
    return {"id": row.id, "position": position, **row.body}


def _body(session: Session, account_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The policy's table in the deployment file's schema; empty selectors are left out."""
    action = fields["action"]
    for key in ACTION_KEYS:
        problem_if(action == "shared" and fields.get(key) is not None, invalid(
            f"{key!r} applies to action 'dedicated' only", field=key, rule="R6"))
    for key in ("primary", "secondary"):
        problem_if(action == "dedicated" and not fields.get(key), invalid(
            f"action 'dedicated' needs {key!r}" + (
                " (a location id, or 'shared')" if key == "secondary" else " (a location id)"),
            field=key, rule="R6"))
    groups = set(fields.get("groups") or [])
    known = set(session.scalars(select(GroupRow.name).where(GroupRow.account_id == account_id)))
    unknown = sorted(groups - known)
    problem_if(bool(unknown), invalid(
        f"unknown group(s) {', '.join(map(repr, unknown))} of account {account_id!r}",
        field="groups"))
    body: dict[str, Any] = {"name": fields["name"]} if fields.get("name") else {}
    for key in SELECTORS:
        values = fields.get(key) or []
        if values:
            body[key] = [str(value) for value in values] if key == "ports" else list(values)
    body["action"] = action
    body.update({key: fields[key] for key in ACTION_KEYS if fields.get(key) is not None})
    return body


def _renumber(rows: list[PolicyRow]) -> None:
    for position, row in enumerate(rows):
        if row.position != position:
            row.position = position


@router.get("/accounts/{account_id}/policies", response_model=list[PolicyOut])
def list_policies(account_id: AccountId, ctx: Ctx, caller: Caller) -> list[PolicyOut]:
    """In evaluation order: the first that matches a flow decides its egress."""
    caller.require_account(account_id)
    with ctx.read() as session:
        get_account(session, account_id)
        return [_policy_out(row, n) for n, row in enumerate(_ordered(session, account_id))]


@router.post("/accounts/{account_id}/policies", response_model=PolicyOut, status_code=201)
def create_policy(account_id: AccountId, body: PolicyIn, ctx: Ctx, caller: Caller) -> PolicyOut:
    caller.require_account(account_id)
    problem_if(body.id in RESERVED_IDS, invalid(f"{body.id!r} is reserved", field="id"))
    with ctx.change() as session:
        _lock_account(session, account_id)
        rows = _ordered(session, account_id)
        problem_if(any(row.id == body.id for row in rows),
                   conflict(f"policy {body.id!r} already exists", field="id"))
        position = len(rows) if body.position is None else body.position
        problem_if(position > len(rows), invalid(
            f"position {position} is past the end: 0 to {len(rows)}", field="position"))
        stored = _body(session, account_id, body.model_dump(exclude={"id", "position"}))
        row = PolicyRow(account_id=account_id, id=body.id, position=position, body=stored)
        rows.insert(position, row)
        session.add(row)
        _renumber(rows)
        with fields_of(f"accounts[{account_id}].policies[{body.id}]"):
            record(session, caller, action="create",
                   resource=f"accounts/{account_id}/policies/{body.id}", account_id=account_id,
                   before=None, after=_audit(row, position), validate=[account_id])
        return _policy_out(row, position)


@router.put("/accounts/{account_id}/policies/order", response_model=list[PolicyOut])
def reorder_policies(account_id: AccountId, body: PolicyOrder, ctx: Ctx,
                     caller: Caller) -> list[PolicyOut]:
    """Set the evaluation order: `ids` must name every policy of the account exactly once."""
    caller.require_account(account_id)
    with ctx.change() as session:
        _lock_account(session, account_id)
        rows = _ordered(session, account_id)
        current = [row.id for row in rows]
        duplicates = sorted({pid for pid in body.ids if body.ids.count(pid) > 1})
        problem_if(bool(duplicates), invalid(
            f"listed more than once: {', '.join(duplicates)}", field="ids"))
        unknown = [pid for pid in body.ids if pid not in current]
        missing = [pid for pid in current if pid not in body.ids]
        problem_if(bool(unknown or missing), invalid(
            "ids must be a permutation of the account's policy ids"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(missing)}" if missing else ""), field="ids"))
        by_id = {row.id: row for row in rows}
        ordered = [by_id[pid] for pid in body.ids]
        _renumber(ordered)
        record(session, caller, action="reorder", resource=f"accounts/{account_id}/policies",
               account_id=account_id, before={"order": current}, after={"order": body.ids},
               validate=[account_id])
        return [_policy_out(row, n) for n, row in enumerate(ordered)]


@router.get("/accounts/{account_id}/policies/{policy_id}", response_model=PolicyOut)
def read_policy(account_id: AccountId, policy_id: PolicyId, ctx: Ctx, caller: Caller) -> PolicyOut:
    caller.require_account(account_id)
    with ctx.read() as session:
        row = _get_policy(session, account_id, policy_id)
        return _policy_out(row, row.position)


def _change_policy(session: Session, caller: Principal, account_id: str, row: PolicyRow,
                   fields: dict[str, Any]) -> PolicyOut:
    before = _audit(row, row.position)
    row.body = _body(session, account_id, fields)
    with fields_of(f"accounts[{account_id}].policies[{row.id}]"):
        record(session, caller, action="update",
               resource=f"accounts/{account_id}/policies/{row.id}", account_id=account_id,
               before=before, after=_audit(row, row.position), validate=[account_id])
    return _policy_out(row, row.position)


@router.put("/accounts/{account_id}/policies/{policy_id}", response_model=PolicyOut)
def replace_policy(account_id: AccountId, policy_id: PolicyId, body: PolicyReplace, ctx: Ctx,
                   caller: Caller) -> PolicyOut:
    """Replace the whole policy, keeping its place in the order."""
    caller.require_account(account_id)
    problem_if(body.id is not None and body.id != policy_id, invalid(
        "the id in the body differs from the path (a policy cannot be renamed)", field="id"))
    with ctx.change() as session:
        _lock_account(session, account_id)
        row = _get_policy(session, account_id, policy_id)
        return _change_policy(session, caller, account_id, row, body.model_dump(exclude={"id"}))


@router.patch("/accounts/{account_id}/policies/{policy_id}", response_model=PolicyOut)
def update_policy(account_id: AccountId, policy_id: PolicyId, body: PolicyPatch, ctx: Ctx,
                  caller: Caller) -> PolicyOut:
    """Change the given fields; switching to action `shared` drops primary/secondary/ipv6."""
    caller.require_account(account_id)
    with ctx.change() as session:
        _lock_account(session, account_id)
        row = _get_policy(session, account_id, policy_id)
        fields = _fields(row.body)
        changes = body.model_dump(exclude_unset=True)
        if changes.get("action") == "shared":
            fields.update(dict.fromkeys(ACTION_KEYS))
        problem_if("action" in changes and changes["action"] is None,
                   invalid("action cannot be null", field="action"))
        for key, value in changes.items():
            # null clears: a selector matches anything again, ipv6 follows primary again.
            empty: Any = [] if key in SELECTORS else "" if key == "name" else None
            fields[key] = empty if value is None else value
        return _change_policy(session, caller, account_id, row, fields)


@router.delete("/accounts/{account_id}/policies/{policy_id}", status_code=204)
def delete_policy(account_id: AccountId, policy_id: PolicyId, ctx: Ctx, caller: Caller) -> Response:
    caller.require_account(account_id)
    with ctx.change() as session:
        _lock_account(session, account_id)
        row = _get_policy(session, account_id, policy_id)
        before = _audit(row, row.position)
        rows = [other for other in _ordered(session, account_id) if other.id != policy_id]
        session.delete(row)
        session.flush()
        _renumber(rows)
        record(session, caller, action="delete",
               resource=f"accounts/{account_id}/policies/{policy_id}", account_id=account_id,
               before=before, after=None, validate=[account_id])
    return Response(status_code=204)


# Private routes (R4)
# --------------------------------------------------------------------------------------


def _route_out(row: PrivateRouteRow) -> RouteOut:
    return RouteOut(id=row.id, kind=row.kind, via=row.via,
                    destinations=list(row.destinations))


def _get_route(session: Session, account_id: str, route_id: str) -> PrivateRouteRow:
    get_account(session, account_id)
    row = session.get(PrivateRouteRow, (account_id, route_id))
    if row is None:
        raise not_found("private route", route_id)
    return row


@router.get("/accounts/{account_id}/private-routes", response_model=list[RouteOut])
def list_routes(account_id: AccountId, ctx: Ctx, caller: Caller) -> list[RouteOut]:
    caller.require_account(account_id)
    with ctx.read() as session:
        get_account(session, account_id)
        rows = session.scalars(select(PrivateRouteRow).where(
            PrivateRouteRow.account_id == account_id).order_by(PrivateRouteRow.id))
        return [_route_out(row) for row in rows]


@router.post("/accounts/{account_id}/private-routes", response_model=RouteOut, status_code=201)
def create_route(account_id: AccountId, body: RouteIn, ctx: Ctx, caller: Caller) -> RouteOut:
    """Flows to these destinations go through `via` and always leave from shared addresses."""
    caller.require_account(account_id)
    with ctx.change() as session:
        get_account(session, account_id)
        problem_if(session.get(PrivateRouteRow, (account_id, body.id)) is not None,
                   conflict(f"private route {body.id!r} already exists", field="id"))
        row = PrivateRouteRow(account_id=account_id, id=body.id, kind=body.kind, via=body.via,
                              destinations=list(body.destinations))
        session.add(row)
        with fields_of(f"accounts[{account_id}].private_routes[{body.id}]"):
            record(session, caller, action="create",
                   resource=f"accounts/{account_id}/private-routes/{body.id}",
                   account_id=account_id, before=None, after=_route_out(row).model_dump(),
                   validate=[account_id])
        return _route_out(row)


@router.get("/accounts/{account_id}/private-routes/{route_id}", response_model=RouteOut)
def read_route(account_id: AccountId, route_id: RouteId, ctx: Ctx, caller: Caller) -> RouteOut:
    caller.require_account(account_id)
    with ctx.read() as session:
        return _route_out(_get_route(session, account_id, route_id))


@router.put("/accounts/{account_id}/private-routes/{route_id}", response_model=RouteOut)
def replace_route(account_id: AccountId, route_id: RouteId, body: RouteReplace, ctx: Ctx,
                  caller: Caller) -> RouteOut:
    """Change a route in one version (delete + create would publish a version without it,
    in which its destinations would leave to the Internet)."""
    caller.require_account(account_id)
    problem_if(body.id is not None and body.id != route_id, invalid(
        "the id in the body differs from the path", field="id"))
    with ctx.change() as session:
        row = _get_route(session, account_id, route_id)
        before = _route_out(row).model_dump()
        row.kind, row.via, row.destinations = body.kind, body.via, list(body.destinations)
        with fields_of(f"accounts[{account_id}].private_routes[{route_id}]"):
            record(session, caller, action="update",
                   resource=f"accounts/{account_id}/private-routes/{route_id}",
                   account_id=account_id, before=before, after=_route_out(row).model_dump(),
                   validate=[account_id])
        return _route_out(row)


@router.delete("/accounts/{account_id}/private-routes/{route_id}", status_code=204)
def delete_route(account_id: AccountId, route_id: RouteId, ctx: Ctx, caller: Caller) -> Response:
    caller.require_account(account_id)
    with ctx.change() as session:
        row = _get_route(session, account_id, route_id)
        before = _route_out(row).model_dump()
        session.delete(row)
        record(session, caller, action="delete",
               resource=f"accounts/{account_id}/private-routes/{route_id}",
               account_id=account_id, before=before, after=None, validate=[account_id])
    return Response(status_code=204)
