"""What a device may read about its own account: `GET /v1/device` (R12, `egressd verify`).

A device holds no API token, only its enrollment credential (device id and secret), so
this endpoint authenticates with HTTP Basic (`device_id:secret`), checked against the
stored SHA-256 in constant time and throttled per client address like every other login.
It answers with what verify compares against: the account's network settings, its
dedicated locations (R2 state spelled out) and every PoP's shared addresses, so the device
can name the PoP an echo saw it leave from.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import APIRouter, Request
from pydantic import BaseModel
from sqlalchemy import select

from egressd.control.api_accounts import (
    Dedicated,
    LocationOut,
    NetworkSettings,
    dedicated_status,
    location_out,
)
from egressd.control.deps import Ctx, throttled
from egressd.control.problems import Problem
from egressd.control.tables import AccountRow, AddressRow, DataCenterRow, DeviceRow, LocationRow
from egressd.protocols.masque import parse_basic

router = APIRouter(prefix="/v1", tags=["public"])

_UNKNOWN = "0" * 64  # compared against, so an unknown device id costs the same time


class DevicePop(BaseModel):
    code: str
    city: str
    shared: list[str]


class DeviceView(BaseModel):
    device_id: str
    account_id: str
    user: str
    plan: str
    network: NetworkSettings
    dedicated: Dedicated
    locations: list[LocationOut]
    pops: list[DevicePop]


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, kind="unauthorized",
                   headers={"WWW-Authenticate": 'Basic realm="egressd device"'})


@router.get("/device", response_model=DeviceView)
def read_device(ctx: Ctx, request: Request) -> DeviceView:
    """The calling device's account as verify needs it (HTTP Basic: device id, secret)."""
    header = request.headers.get("authorization") or ""
    if header and not header.lower().startswith("basic "):
        raise Problem(403, "Forbidden", "this endpoint takes a device's credentials (HTTP "
                      "Basic: device id, secret), not an API token", kind="forbidden")
    credentials = parse_basic(header)
    with throttled(request, counts=credentials is not None), ctx.read() as session:
        if credentials is None:
            raise _unauthorized("device credentials required (HTTP Basic: device id, secret)")
        device = session.get(DeviceRow, credentials[0])
        digest = hashlib.sha256(credentials[1].encode("utf-8", "surrogateescape")).hexdigest()
        expected = device.secret_sha256 if device is not None else _UNKNOWN
        if not hmac.compare_digest(digest, expected) or device is None:
            raise _unauthorized("unknown device or wrong secret")
        account = session.get(AccountRow, device.account_id)
        if account is None:
            raise _unauthorized("the device's account is gone")
        locations = [location_out(session, row) for row in session.scalars(
            select(LocationRow).where(LocationRow.account_id == account.id).order_by(LocationRow.id))]
        shared: dict[str, list[str]] = {}
        for address, pop in session.execute(select(AddressRow.address, AddressRow.data_center)
                                            .where(AddressRow.kind == "shared")).all():
            shared.setdefault(pop, []).append(address)
        pops = [DevicePop(code=dc.code, city=dc.city, shared=sorted(shared.get(dc.code, [])))
                for dc in session.scalars(select(DataCenterRow).order_by(DataCenterRow.slot))]
        return DeviceView(
            device_id=device.id, account_id=account.id, user=device.user_name, plan=account.plan,
            network=NetworkSettings(proxy_tcp=account.proxy_tcp, proxy_udp=account.proxy_udp,
                                    fallback=account.fallback),
            dedicated=dedicated_status(session, account), locations=locations, pops=pops)
