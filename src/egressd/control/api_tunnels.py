"""Tunnel connectors of an account (issue 6): create, token, status, delete.

A tunnel is a connector that runs inside the account's private network
(`egressd tunnel run --token T`), dials out to the nearest PoPs and carries the flows of
the account's private routes whose `via` is its id (R4). Its token is shown once, at
creation or when replaced; only its SHA-256 is stored and sent to the PoPs in the
snapshot, so creating, re-issuing and deleting are configuration changes (a new version,
audited). Replacing the token or deleting the tunnel makes the PoPs drop its links.

Status comes from the PoPs: each reports, with its health, the connectors attached to it
and the routes it accepted from them; a report older than `STALE_AFTER` counts for
nothing (that PoP is gone or cannot reach the control plane).
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, Header, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from egressd.control.api_accounts import get_account
from egressd.control.context import problem_if, record
from egressd.control.deps import AccountId, Caller, Ctx, throttled
from egressd.control.document import aware
from egressd.control.problems import Problem, conflict, not_found
from egressd.control.tables import PopStatusRow, PrivateRouteRow, TunnelRow
from egressd.protocols.tunnel import connector_of, new_token, token_digest

router = APIRouter(prefix="/v1", tags=["tunnels"])

TUNNEL_ID: Final = r"^[a-z0-9][a-z0-9-]{0,62}$"
STALE_AFTER: Final = 15.0  # seconds; PoPs report every 2 s
TunnelId = Annotated[str, Path(pattern=TUNNEL_ID, description="Tunnel (connector) id")]


class TunnelAttachmentIn(BaseModel):
    """A tunnel connector attached to a PoP, with the routes it accepted (the PoP's report)."""

    model_config = ConfigDict(extra="forbid")
    connector: str = Field(pattern=TUNNEL_ID)
    account: str = Field(max_length=64)
    peer: str = Field(max_length=100)
    since: float = Field(ge=0, le=10_000_000_000)
    routes: list[Annotated[str, Field(max_length=253)]] = Field(max_length=256)


class TunnelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=TUNNEL_ID, description="Connector id, unique in the deployment; "
                    "private routes of kind tunnel name it in `via`")


class Attachment(BaseModel):
    pop: str
    peer: str = Field(description="The connector's address as the PoP saw it")
    since: datetime
    routes: list[str] = Field(description="Routes the PoP accepted from the connector")


class TunnelOut(BaseModel):
    id: str
    account_id: str
    created_at: datetime
    token_issued_at: datetime
    status: str = Field(description="`connected` (attached to at least one PoP) or `disconnected`")
    attached: list[Attachment]
    announced: list[str] = Field(description="Routes accepted at any PoP")
    declared_routes: list[str] = Field(description="Private routes (kind tunnel) via this connector")


class TunnelPop(BaseModel):
    pop: str
    address: str = Field(description="[NAME@]HOST:PORT of the PoP's tunnel listener (NAME: "
                         "what its certificate names, else HOST)")


class TunnelCreated(TunnelOut):
    token: str = Field(description="Shown once; only its SHA-256 is stored")


def _attachments(statuses: list[PopStatusRow], now: datetime) -> dict[str, list[Attachment]]:
    found: dict[str, list[Attachment]] = {}
    for row in statuses:
        health = row.health or {}
        try:
            at = aware(datetime.fromisoformat(str(health.get("at"))))
        except ValueError:
            continue
        if (now - at).total_seconds() > STALE_AFTER:
            continue
        for item in health.get("tunnels", []):
            found.setdefault(str(item["connector"]), []).append(Attachment(
                pop=row.pop, peer=str(item.get("peer", "")),
                since=datetime.fromtimestamp(float(item.get("since", 0)), UTC),
                routes=[str(route) for route in item.get("routes", [])]))
    return found


def _out(row: TunnelRow, attached: list[Attachment], declared: list[str]) -> TunnelOut:
    announced = sorted({route for item in attached for route in item.routes})
    return TunnelOut(id=row.id, account_id=row.account_id, created_at=aware(row.created_at),
                     token_issued_at=aware(row.token_issued_at),
                     status="connected" if attached else "disconnected",
                     attached=sorted(attached, key=lambda item: item.pop), announced=announced,
                     declared_routes=declared)


def _declared(session: Session, account_id: str) -> dict[str, list[str]]:
    routes: dict[str, list[str]] = {}
    for route in session.scalars(select(PrivateRouteRow).where(
            PrivateRouteRow.account_id == account_id, PrivateRouteRow.kind == "tunnel")
            .order_by(PrivateRouteRow.id)):
        routes.setdefault(route.via, []).append(route.id)
    return routes


def _audit_view(row: TunnelRow) -> dict[str, Any]:
    """What the audit log keeps: never the token nor its digest."""
    return {"id": row.id, "account_id": row.account_id,
            "token_issued_at": aware(row.token_issued_at).isoformat()}


def _get(session: Session, account_id: str, tunnel_id: str) -> TunnelRow:
    get_account(session, account_id)
    row = session.get(TunnelRow, tunnel_id)
    if row is None or row.account_id != account_id:
        raise not_found("tunnel", tunnel_id)
    return row


@router.get("/accounts/{account_id}/tunnels", response_model=list[TunnelOut])
def list_tunnels(account_id: AccountId, ctx: Ctx, caller: Caller) -> list[TunnelOut]:
    caller.require_account(account_id)
    attached = _attachments(ctx.publisher.pop_statuses(), datetime.now(UTC))
    with ctx.read() as session:
        get_account(session, account_id)
        declared = _declared(session, account_id)
        rows = session.scalars(select(TunnelRow).where(TunnelRow.account_id == account_id)
                               .order_by(TunnelRow.id))
        return [_out(row, attached.get(row.id, []), declared.get(row.id, [])) for row in rows]


@router.post("/accounts/{account_id}/tunnels", response_model=TunnelCreated, status_code=201)
def create_tunnel(account_id: AccountId, body: TunnelIn, ctx: Ctx, caller: Caller) -> TunnelCreated:
    """A connector for the account, and its token (shown once)."""
    caller.require_account(account_id)
    token = new_token(body.id)
    with ctx.change() as session:
        get_account(session, account_id)
        problem_if(session.get(TunnelRow, body.id) is not None,
                   conflict(f"tunnel {body.id!r} already exists (ids are deployment-wide)",
                            field="id"))
        now = datetime.now(UTC)
        row = TunnelRow(id=body.id, account_id=account_id, token_sha256=token_digest(token),
                        created_at=now, token_issued_at=now)
        session.add(row)
        record(session, caller, action="create", resource=f"accounts/{account_id}/tunnels/{body.id}",
               account_id=account_id, before=None, after=_audit_view(row), validate=[account_id])
        declared = _declared(session, account_id).get(row.id, [])
        return TunnelCreated(**_out(row, [], declared).model_dump(), token=token)


@router.get("/accounts/{account_id}/tunnels/{tunnel_id}", response_model=TunnelOut)
def read_tunnel(account_id: AccountId, tunnel_id: TunnelId, ctx: Ctx, caller: Caller) -> TunnelOut:
    caller.require_account(account_id)
    attached = _attachments(ctx.publisher.pop_statuses(), datetime.now(UTC))
    with ctx.read() as session:
        row = _get(session, account_id, tunnel_id)
        return _out(row, attached.get(row.id, []), _declared(session, account_id).get(row.id, []))


@router.post("/accounts/{account_id}/tunnels/{tunnel_id}/token", response_model=TunnelCreated)
def reissue_token(account_id: AccountId, tunnel_id: TunnelId, ctx: Ctx,
                  caller: Caller) -> TunnelCreated:
    """A new token (shown once); the old one stops working and its links are dropped."""
    caller.require_account(account_id)
    with ctx.change() as session:
        row = _get(session, account_id, tunnel_id)
        before = _audit_view(row)
        token = new_token(row.id)
        row.token_sha256 = token_digest(token)
        row.token_issued_at = datetime.now(UTC)
        record(session, caller, action="update",
               resource=f"accounts/{account_id}/tunnels/{tunnel_id}/token",
               account_id=account_id, before=before, after=_audit_view(row),
               validate=[account_id])
        declared = _declared(session, account_id).get(row.id, [])
        return TunnelCreated(**_out(row, [], declared).model_dump(), token=token)


@router.delete("/accounts/{account_id}/tunnels/{tunnel_id}", status_code=204)
def delete_tunnel(account_id: AccountId, tunnel_id: TunnelId, ctx: Ctx, caller: Caller) -> Response:
    """Revokes the connector: PoPs drop its links once they apply the new version. Its
    private routes stay (their flows then fail: the connector is not connected)."""
    caller.require_account(account_id)
    with ctx.change() as session:
        row = _get(session, account_id, tunnel_id)
        before = _audit_view(row)
        session.delete(row)
        record(session, caller, action="delete",
               resource=f"accounts/{account_id}/tunnels/{tunnel_id}", account_id=account_id,
               before=before, after=None, validate=[account_id])
    return Response(status_code=204)


@router.get("/tunnel/pops", response_model=list[TunnelPop], tags=["public"])
def tunnel_pops(ctx: Ctx, request: Request,
                authorization: Annotated[str | None, Header()] = None) -> list[TunnelPop]:
    """For a connector (`egressd tunnel run --control URL`), authenticated by its own token:
    the PoPs with a tunnel listener that reported in the last `STALE_AFTER` seconds."""
    scheme, _, token = (authorization or "").partition(" ")
    connector = connector_of(token.strip()) if scheme.lower() == "bearer" else None
    with throttled(request, counts=authorization is not None), ctx.read() as session:
        row = session.get(TunnelRow, connector) if connector else None
        digest = token_digest(token.strip())
        if row is None or not hmac.compare_digest(row.token_sha256, digest):
            raise Problem(401, "Unauthorized", "unknown connector or wrong token "
                          "(Authorization: Bearer <connector token>)", kind="unauthorized")
    now = datetime.now(UTC)
    found = []
    for status in ctx.publisher.pop_statuses():
        health = status.health or {}
        address = health.get("tunnel_listen")
        try:
            fresh = (now - aware(datetime.fromisoformat(str(health.get("at"))))).total_seconds()
        except ValueError:
            continue
        if address and fresh <= STALE_AFTER:
            found.append(TunnelPop(pop=status.pop, address=str(address)))
    return found
