"""Deployment-wide resources: data centers, address inventory, settings, in-network
origins, PoP status, snapshot long-poll, and the geofeed. API tokens and the audit log
are in `control/api_tokens.py`."""

from __future__ import annotations

import asyncio
import ipaddress
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from egressd.control.api_tunnels import TunnelAttachmentIn
from egressd.control.context import problem_if, record
from egressd.control.deps import MAX_INT, SLUG, Caller, Ctx
from egressd.control.document import aware, current_version
from egressd.control.geofeed import geofeed_text
from egressd.control.problems import conflict, fields_of, invalid, not_found
from egressd.control.tables import (
    AddressRow,
    DataCenterRow,
    DeploymentSettingsRow,
    LocationRow,
    OriginRow,
)

router = APIRouter(prefix="/v1", tags=["deployment"])
public = APIRouter(tags=["public"])


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Data centers
# --------------------------------------------------------------------------------------


# Printable, without leading or trailing blanks: the geofeed (R10) carries it as it is.
CITY = r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?$"


def _region_problem(country: str, region: str) -> None:
    problem_if(bool(region) and not region.startswith(f"{country}-"), invalid(
        f"region {region!r} is not in country {country!r} (ISO 3166-2 codes start with the "
        "country's code)", field="region"))


class DataCenterIn(Strict):
    code: str = Field(pattern=r"^[a-z0-9]{2,16}$", description="Short code, e.g. 'lax'")
    city: str = Field(min_length=1, max_length=100, pattern=CITY)
    country: str = Field(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2")
    region: str = Field("", pattern=r"^([A-Z]{2}-[A-Z0-9]{1,3})?$", description="ISO 3166-2")
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    backbone: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    slot: int | None = Field(None, ge=1, le=65535,
                             description="Sub-range number in every IPv6 location range (R9)")
    shared_ipv4: list[ipaddress.IPv4Address] = Field(
        min_length=1, max_length=256, description="Shared egress addresses (R1): at least one")
    shared_ipv6: ipaddress.IPv6Network | None = Field(None, description="Shared IPv6 prefix")


class DataCenterPatch(Strict):
    city: str | None = Field(None, min_length=1, max_length=100, pattern=CITY)
    country: str | None = Field(None, pattern=r"^[A-Z]{2}$")
    region: str | None = Field(None, pattern=r"^([A-Z]{2}-[A-Z0-9]{1,3})?$")
    latitude: float | None = Field(None, ge=-90, le=90)
    longitude: float | None = Field(None, ge=-180, le=180)
    backbone: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None


class DataCenterOut(BaseModel):
    code: str
    city: str
    country: str
    region: str
    latitude: float
    longitude: float
    backbone: str | None
    slot: int


def _dc_out(row: DataCenterRow) -> DataCenterOut:
    return DataCenterOut(code=row.code, city=row.city, country=row.country, region=row.region,
                         latitude=row.latitude, longitude=row.longitude, backbone=row.backbone,
                         slot=row.slot)


def _dc_dict(row: DataCenterRow) -> dict[str, Any]:
    return _dc_out(row).model_dump()


Code = Annotated[str, Path(max_length=16)]


@router.get("/data-centers", response_model=list[DataCenterOut])
def list_data_centers(ctx: Ctx, caller: Caller) -> list[DataCenterOut]:
    with ctx.read() as session:
        return [_dc_out(row) for row in session.scalars(select(DataCenterRow).order_by(DataCenterRow.slot))]


@router.post("/data-centers", response_model=DataCenterOut, status_code=201)
def create_data_center(body: DataCenterIn, ctx: Ctx, caller: Caller) -> DataCenterOut:
    caller.require_deployment()
    _region_problem(body.country, body.region)
    with ctx.change() as session:
        problem_if(session.get(DataCenterRow, body.code) is not None,
                   conflict(f"data center {body.code!r} already exists", field="code"))
        slots = set(session.scalars(select(DataCenterRow.slot)))
        slot = body.slot or next(number for number in range(1, len(slots) + 2) if number not in slots)
        problem_if(slot in slots, conflict(f"slot {slot} is taken", field="slot", rule="R9"))
        row = DataCenterRow(code=body.code, city=body.city, country=body.country,
                            region=body.region, latitude=body.latitude, longitude=body.longitude,
                            backbone=str(body.backbone) if body.backbone else None, slot=slot)
        session.add(row)
        session.flush()
        shared = [(str(a), 4) for a in body.shared_ipv4]
        shared += [(str(body.shared_ipv6), 6)] if body.shared_ipv6 else []
        for address, family in shared:
            problem_if(session.get(AddressRow, address) is not None, conflict(
                f"{address} is already in the inventory", field="shared_ipv4"))
            session.add(AddressRow(address=address, family=family, kind="shared",
                                   data_center=body.code))
        record(session, caller, action="create", resource=f"data-centers/{row.code}",
               account_id=None, before=None, after=_dc_dict(row), validate=[])
        return _dc_out(row)


def _get_dc(session: Session, code: str) -> DataCenterRow:
    row = session.get(DataCenterRow, code)
    if row is None:
        raise not_found("data center", code)
    return row


@router.get("/data-centers/{code}", response_model=DataCenterOut)
def read_data_center(code: Code, ctx: Ctx, caller: Caller) -> DataCenterOut:
    with ctx.read() as session:
        return _dc_out(_get_dc(session, code))


@router.patch("/data-centers/{code}", response_model=DataCenterOut)
def update_data_center(code: Code, body: DataCenterPatch, ctx: Ctx, caller: Caller) -> DataCenterOut:
    caller.require_deployment()
    with ctx.change() as session:
        row = _get_dc(session, code)
        before = _dc_dict(row)
        for key, value in body.model_dump(exclude_unset=True).items():
            setattr(row, key, str(value) if key == "backbone" and value is not None else value)
        _region_problem(row.country, row.region)
        record(session, caller, action="update", resource=f"data-centers/{code}",
               account_id=None, before=before, after=_dc_dict(row), validate=None)
        return _dc_out(row)


@router.delete("/data-centers/{code}", status_code=204)
def delete_data_center(code: Code, ctx: Ctx, caller: Caller) -> Response:
    caller.require_deployment()
    with ctx.change() as session:
        row = _get_dc(session, code)
        in_use = session.scalar(select(AddressRow.address).where(AddressRow.data_center == code))
        problem_if(in_use is not None, conflict(
            f"data center {code!r} still has addresses in the inventory (e.g. {in_use})"))
        before = _dc_dict(row)
        session.delete(row)
        record(session, caller, action="delete", resource=f"data-centers/{code}",
               account_id=None, before=before, after=None, validate=None)
    return Response(status_code=204)


# Address inventory
# --------------------------------------------------------------------------------------


class AddressIn(Strict):
    address: str = Field(max_length=64, description="An IPv4 address, or an IPv6 prefix",
                         examples=["198.51.100.7", "2001:db8:100::/48"])
    data_center: str = Field(max_length=16)
    kind: Literal["shared", "dedicated"]


class AddressOut(BaseModel):
    address: str
    family: Literal[4, 6]
    kind: Literal["shared", "dedicated"]
    data_center: str
    assigned_to: str | None = Field(None, description="Account holding it (dedicated)")


def _parse_inventory_address(text: str) -> tuple[str, int]:
    try:
        if "/" in text:
            network = ipaddress.ip_network(text, strict=True)
            if network.version == 4:
                if network.prefixlen != 32:
                    raise ValueError("IPv4 inventory holds single addresses, not ranges")
                return str(network.network_address), 4
            return str(network), 6
        address = ipaddress.ip_address(text)
    except ValueError as error:
        raise invalid(f"not an IPv4 address or IPv6 prefix: {error}", field="address") from None
    if address.version == 6:
        raise invalid("IPv6 inventory holds prefixes (e.g. 2001:db8:100::/48)", field="address")
    return str(address), 4


@router.get("/addresses", response_model=list[AddressOut])
def list_addresses(
    ctx: Ctx, caller: Caller,
    data_center: Annotated[str | None, Query(max_length=16)] = None,
    kind: Literal["shared", "dedicated"] | None = None,
    free: Annotated[bool, Query(description="Only dedicated ones nobody holds")] = False,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> list[AddressOut]:
    caller.require_deployment()
    with ctx.read() as session:
        owners = dict(session.execute(select(LocationRow.ipv4, LocationRow.account_id)).all())
        owners.update(
            (v6, owner) for v6, owner in
            session.execute(select(LocationRow.ipv6, LocationRow.account_id)).all() if v6
        )
        query = select(AddressRow).order_by(AddressRow.data_center, AddressRow.family,
                                             AddressRow.address)
        if data_center:
            query = query.where(AddressRow.data_center == data_center)
        if kind:
            query = query.where(AddressRow.kind == kind)
        rows = [row for row in session.scalars(query)
                if not free or (row.kind == "dedicated" and row.address not in owners)]
        return [AddressOut(address=row.address, family=row.family,
                           kind=row.kind, data_center=row.data_center,
                           assigned_to=owners.get(row.address))
                for row in rows[offset:offset + limit]]


@router.post("/addresses", response_model=AddressOut, status_code=201)
def add_address(body: AddressIn, ctx: Ctx, caller: Caller) -> AddressOut:
    caller.require_deployment()
    address, family = _parse_inventory_address(body.address)
    with ctx.change() as session:
        _get_dc(session, body.data_center)
        problem_if(session.get(AddressRow, address) is not None,
                   conflict(f"{address} is already in the inventory", field="address"))
        if family == 6:
            new = ipaddress.IPv6Network(address)
            for other in session.scalars(select(AddressRow.address).where(AddressRow.family == 6)):
                problem_if(new.overlaps(ipaddress.IPv6Network(other)), conflict(
                    f"{address} overlaps {other}, already in the inventory", field="address"))
            if body.kind == "shared":
                taken = session.scalar(select(AddressRow.address).where(
                    AddressRow.family == 6, AddressRow.kind == "shared",
                    AddressRow.data_center == body.data_center))
                problem_if(taken is not None, conflict(
                    f"{body.data_center} already has the shared IPv6 prefix {taken}",
                    field="address"))
        row = AddressRow(address=address, family=family, kind=body.kind,
                         data_center=body.data_center)
        session.add(row)
        after = {"address": address, "kind": body.kind, "data_center": body.data_center}
        record(session, caller, action="create", resource=f"addresses/{address}",
               account_id=None, before=None, after=after, validate=[])
        return AddressOut(address=address, family=family, kind=body.kind,
                          data_center=body.data_center)


@router.delete("/addresses/{address:path}", status_code=204)
def remove_address(address: str, ctx: Ctx, caller: Caller) -> Response:
    caller.require_deployment()
    canonical, _ = _parse_inventory_address(address)
    with ctx.change() as session:
        row = session.get(AddressRow, canonical)
        if row is None:
            raise not_found("address", canonical)
        holder = session.scalar(select(LocationRow.account_id).where(
            (LocationRow.ipv4 == canonical) | (LocationRow.ipv6 == canonical)))
        problem_if(holder is not None, conflict(
            f"{canonical} is assigned to account {holder!r}: release it first", field="address",
            rule="R2"))
        before = {"address": row.address, "kind": row.kind, "data_center": row.data_center}
        session.delete(row)
        record(session, caller, action="delete", resource=f"addresses/{canonical}",
               account_id=None, before=before, after=None, validate=[])
    return Response(status_code=204)


# Deployment settings and in-network origins
# --------------------------------------------------------------------------------------


class DeploymentSettingsIO(Strict):
    quarantine_days: int = Field(30, ge=0, le=3650,
                                 description="Cool-down before a released address is reassigned (R2)")
    allow_destinations: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list, description="Special-purpose ranges the PoPs may reach anyway")
    control_addresses: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list, description="Infrastructure the PoPs must never reach (R13)")


def _settings_out(row: DeploymentSettingsRow) -> DeploymentSettingsIO:
    return DeploymentSettingsIO.model_validate({
        "quarantine_days": row.quarantine_days, "allow_destinations": row.allow_destinations,
        "control_addresses": row.control_addresses})


@router.get("/settings", response_model=DeploymentSettingsIO)
def read_settings(ctx: Ctx, caller: Caller) -> DeploymentSettingsIO:
    caller.require_deployment()
    with ctx.read() as session:
        row = session.get(DeploymentSettingsRow, 1)
        assert row is not None
        return _settings_out(row)


@router.put("/settings", response_model=DeploymentSettingsIO)
def replace_settings(body: DeploymentSettingsIO, ctx: Ctx, caller: Caller) -> DeploymentSettingsIO:
    caller.require_deployment()
    with ctx.change() as session:
        row = session.get(DeploymentSettingsRow, 1)
        assert row is not None
        before = _settings_out(row).model_dump(mode="json")
        row.quarantine_days = body.quarantine_days
        row.allow_destinations = [str(net) for net in body.allow_destinations]
        row.control_addresses = [str(net) for net in body.control_addresses]
        record(session, caller, action="update", resource="settings", account_id=None,
               before=before, after=body.model_dump(mode="json"), validate=None)
        return _settings_out(row)


class OriginIO(Strict):
    name: str = Field(pattern=SLUG)
    destinations: list[str] = Field(min_length=1, max_length=1000,
                                    description="CIDRs and hostname patterns (R8)")


@router.get("/in-network-origins", response_model=list[OriginIO])
def list_origins(ctx: Ctx, caller: Caller) -> list[OriginIO]:
    with ctx.read() as session:
        return [OriginIO(name=row.name, destinations=row.destinations)
                for row in session.scalars(select(OriginRow).order_by(OriginRow.name))]


@router.put("/in-network-origins/{name}", response_model=OriginIO)
def put_origin(name: Annotated[str, Path(max_length=64)], body: OriginIO, ctx: Ctx,
               caller: Caller) -> OriginIO:
    caller.require_deployment()
    problem_if(body.name != name, invalid("the name in the body differs from the path",
                                          field="name"))
    with ctx.change() as session:
        row = session.get(OriginRow, name)
        before = {"destinations": row.destinations} if row else None
        if row is None:
            row = OriginRow(name=name, destinations=body.destinations)
            session.add(row)
        else:
            row.destinations = body.destinations
        with fields_of(f"in_network_origins[{name}]"):
            record(session, caller, action="update" if before else "create",
                   resource=f"in-network-origins/{name}", account_id=None, before=before,
                   after={"destinations": body.destinations}, validate=[])
        return body


@router.delete("/in-network-origins/{name}", status_code=204)
def delete_origin(name: Annotated[str, Path(max_length=64)], ctx: Ctx, caller: Caller) -> Response:
    caller.require_deployment()
    with ctx.change() as session:
        row = session.get(OriginRow, name)
        if row is None:
            raise not_found("in-network origin", name)
        before = {"destinations": row.destinations}
        session.delete(row)
        record(session, caller, action="delete", resource=f"in-network-origins/{name}",
               account_id=None, before=before, after=None, validate=[])
    return Response(status_code=204)


class PopViewIn(Strict):
    """A PoP's own view of its peers: which it can reach, and the backbone RTTs it measured."""

    up: list[Annotated[str, Field(pattern=r"^[a-z0-9]{2,16}$")]] = Field(max_length=1000)
    rtt_ms: dict[Annotated[str, Field(pattern=r"^[a-z0-9]{2,16}$")],
                 Annotated[float, Field(ge=0, le=600_000)]] = Field(max_length=1000)
    tunnels: list[TunnelAttachmentIn] = Field(default=[], max_length=10_000,
                                              description="Connectors attached to this PoP")
    tunnel_listen: str | None = Field(default=None, max_length=300,
                                      pattern=r"^([A-Za-z0-9.-]+@)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$",
                                      description="[NAME@]HOST:PORT where connectors attach "
                                                  "(NAME: what the PoP's certificate names)")


class PopView(PopViewIn):
    reported_at: datetime
    seconds_since_reported: float


class PopStatusOut(BaseModel):
    pop: str
    version: int
    current: bool = Field(description="Runs the newest version")
    seen_at: datetime
    seconds_since_seen: float
    replica: str
    view: PopView | None = Field(None, description="Its peers and RTTs, as it last reported")


def pop_view(health: dict[str, Any] | None, now: datetime) -> PopView | None:
    if not health or "at" not in health:
        return None
    at = aware(datetime.fromisoformat(str(health["at"])))
    return PopView(up=list(health.get("up", [])), rtt_ms=dict(health.get("rtt_ms", {})),
                   tunnels=list(health.get("tunnels", [])),
                   tunnel_listen=health.get("tunnel_listen"),
                   reported_at=at, seconds_since_reported=round((now - at).total_seconds(), 3))


class VersionOut(BaseModel):
    version: int
    published_at: datetime | None
    build_ms: float | None
    pops: list[PopStatusOut]


@router.get("/version", response_model=VersionOut)
def version(ctx: Ctx, caller: Caller) -> VersionOut:
    """The newest snapshot version, and which version each PoP confirmed."""
    caller.require_pop()
    published = ctx.publisher.current
    now = datetime.now(UTC)
    with ctx.read() as session:
        newest = current_version(session)
    pops = [PopStatusOut(pop=row.pop, version=row.version, current=row.version >= newest,
                         seen_at=aware(row.seen_at),
                         seconds_since_seen=round((now - aware(row.seen_at)).total_seconds(), 3),
                         replica=row.replica, view=pop_view(row.health, now))
            for row in ctx.publisher.pop_statuses()]
    return VersionOut(version=newest, published_at=published.published_at if published else None,
                      build_ms=round(published.built_ms, 1) if published else None, pops=pops)


@router.put("/pops/{pop}/health", status_code=204)
async def report_health(
    pop: Annotated[str, Path(pattern=r"^[a-z0-9]{2,16}$")], body: PopViewIn, ctx: Ctx,
    caller: Caller,
) -> Response:
    """A PoP reports the peers it reaches and its backbone RTTs (every few seconds)."""
    caller.require_pop()
    health = {"up": sorted(set(body.up)), "rtt_ms": body.rtt_ms,
              "tunnels": [item.model_dump() for item in body.tunnels],
              "tunnel_listen": body.tunnel_listen,
              "at": datetime.now(UTC).isoformat()}
    await asyncio.to_thread(ctx.publisher.record_health, pop, health)
    return Response(status_code=204)


@router.get("/snapshot", responses={204: {"description": "No newer version within `wait`"}})
async def snapshot(
    request: Request, ctx: Ctx, caller: Caller,
    after: Annotated[int, Query(ge=0, le=MAX_INT, description="The version the PoP runs (its confirmation)")] = 0,
    pop: Annotated[str | None, Query(pattern=r"^[a-z0-9]{2,16}$")] = None,
    wait: Annotated[float, Query(ge=0, le=30, description="Seconds to wait for a newer one")] = 0,
) -> Response:
    """Long poll: the deployment document once its version is newer than `after`."""
    caller.require_pop()
    if pop is not None:
        await asyncio.to_thread(ctx.publisher.record_pop, pop, after)
    published = await ctx.publisher.wait_newer(after, wait)
    if published is None:
        return Response(status_code=204)
    headers = {"X-Egressd-Version": str(published.version), "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return Response(published.gzipped, media_type="application/json", headers=headers)
    return Response(published.body, media_type="application/json", headers=headers)


@public.get("/geofeed.csv", response_class=PlainTextResponse)
def geofeed(ctx: Ctx) -> PlainTextResponse:
    """RFC 8805 geofeed of every shared and dedicated address and range (R10). Public."""
    with ctx.read() as session:
        text = geofeed_text(session)
    return PlainTextResponse(text, media_type="text/csv; charset=utf-8")


@public.get("/health")
def health(ctx: Ctx) -> dict[str, Any]:
    published = ctx.publisher.current
    return {"status": "ok", "replica": ctx.publisher.replica,
            "version": published.version if published else None}
