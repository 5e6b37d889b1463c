"""Enrollment: a device enrolls itself, without an admin token.

An administrator creates an enrollment token for a user (`POST .../enrollment-tokens`),
shown once and stored hashed, and hands it to the device. The device posts it to the
public `POST /v1/enroll`, which uses the token up (single use, even against a concurrent
enrollment), creates the device (a new snapshot version, as for any device) and returns
the device's credentials and the PoPs to measure. Enrollment-token changes are audited but
are not configuration, so they do not make a new snapshot version.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from egressd.control.api_accounts import get_account
from egressd.control.api_identity import device_dict, device_id_for, known_user, new_device
from egressd.control.auth import Principal, hash_token
from egressd.control.context import audit, problem_if, record
from egressd.control.deps import AccountId, Caller, Ctx, throttled
from egressd.control.document import aware
from egressd.control.problems import Problem, not_found
from egressd.control.tables import AddressRow, DataCenterRow, EnrollmentTokenRow

router = APIRouter(prefix="/v1", tags=["enrollment"])

DEVICE_NAME = r"^[a-z0-9][a-z0-9._-]{0,29}$"
ENROLLMENT_PREFIX = "egd_enroll_"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnrollmentTokenIn(Strict):
    user: str = Field(max_length=100, description="The user the enrolled device belongs to")
    expires_in_minutes: int = Field(default=60, ge=1, le=10080)


class EnrollmentTokenOut(BaseModel):
    id: str
    user: str
    expires_at: datetime
    status: Literal["unused", "used", "expired"]
    used_by_device: str | None


class EnrollmentTokenCreated(EnrollmentTokenOut):
    token: str = Field(description="Shown once; only its SHA-256 is stored")


class EnrollIn(Strict):
    token: str = Field(min_length=1, max_length=200, description="An enrollment token")
    device_name: str | None = Field(default=None, pattern=DEVICE_NAME, description=(
        "Names the device: its id becomes `<account>-<user>-<device_name>` "
        "(default: 6 random hex digits in place of the name)"))


class EnrolledPop(BaseModel):
    code: str
    city: str
    country: str
    latitude: float
    longitude: float
    shared_ipv4: str | None


class Enrolled(BaseModel):
    device_id: str = Field(description="The proxy user name")
    secret: str = Field(description="The proxy password. Shown once")
    account_id: str
    user: str
    pops: list[EnrolledPop]


# Enrollment tokens, and enrollment itself
# --------------------------------------------------------------------------------------


def _token_out(row: EnrollmentTokenRow, now: datetime) -> EnrollmentTokenOut:
    status: Literal["unused", "used", "expired"] = (
        "used" if row.used_by_device is not None
        else "expired" if aware(row.expires_at) <= now else "unused")
    return EnrollmentTokenOut(id=row.id, user=row.user_name, expires_at=aware(row.expires_at),
                              status=status, used_by_device=row.used_by_device)


def _token_dict(row: EnrollmentTokenRow) -> dict[str, Any]:
    return {"id": row.id, "user": row.user_name, "expires_at": aware(row.expires_at).isoformat()}


@router.get("/accounts/{account_id}/enrollment-tokens", response_model=list[EnrollmentTokenOut])
def list_enrollment_tokens(account_id: AccountId, ctx: Ctx, caller: Caller) -> list[EnrollmentTokenOut]:
    caller.require_account(account_id)
    now = datetime.now(UTC)
    with ctx.read() as session:
        get_account(session, account_id)
        rows = session.scalars(select(EnrollmentTokenRow).where(
            EnrollmentTokenRow.account_id == account_id).order_by(EnrollmentTokenRow.expires_at))
        return [_token_out(row, now) for row in rows]


@router.post("/accounts/{account_id}/enrollment-tokens", response_model=EnrollmentTokenCreated,
             status_code=201)
def create_enrollment_token(account_id: AccountId, body: EnrollmentTokenIn, ctx: Ctx,
                            caller: Caller) -> EnrollmentTokenCreated:
    """A single-use token with which one device of `user` enrolls itself (POST /v1/enroll)."""
    caller.require_account(account_id)
    token = ENROLLMENT_PREFIX + secrets.token_urlsafe(30)
    with ctx.change() as session:
        get_account(session, account_id)
        known_user(session, account_id, body.user)
        now = datetime.now(UTC)
        row = EnrollmentTokenRow(id=secrets.token_hex(8), account_id=account_id,
                                 user_name=body.user, token_sha256=hash_token(token),
                                 expires_at=now + timedelta(minutes=body.expires_in_minutes))
        session.add(row)
        session.flush()
        audit(session, caller, action="create",
              resource=f"accounts/{account_id}/enrollment-tokens/{row.id}",
              account_id=account_id, before=None, after=_token_dict(row))
        return EnrollmentTokenCreated(**_token_out(row, now).model_dump(), token=token)


@router.delete("/accounts/{account_id}/enrollment-tokens/{token_id}", status_code=204)
def revoke_enrollment_token(account_id: AccountId, token_id: Annotated[str, Path(max_length=32)],
                            ctx: Ctx, caller: Caller) -> Response:
    caller.require_account(account_id)
    with ctx.change() as session:
        get_account(session, account_id)
        row = session.get(EnrollmentTokenRow, token_id)
        if row is None or row.account_id != account_id:
            raise not_found("enrollment token", token_id)
        before = _token_dict(row)
        session.delete(row)
        audit(session, caller, action="delete",
              resource=f"accounts/{account_id}/enrollment-tokens/{token_id}",
              account_id=account_id, before=before, after=None)
    return Response(status_code=204)


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, field="token", kind="unauthorized")


def _pops(session: Session) -> list[EnrolledPop]:
    first: dict[str, ipaddress.IPv4Address] = {}
    for address, pop in session.execute(select(AddressRow.address, AddressRow.data_center).where(
            AddressRow.family == 4, AddressRow.kind == "shared")).all():
        parsed = ipaddress.IPv4Address(address)
        if pop not in first or parsed < first[pop]:
            first[pop] = parsed
    return [EnrolledPop(code=dc.code, city=dc.city, country=dc.country, latitude=dc.latitude,
                        longitude=dc.longitude,
                        shared_ipv4=str(first[dc.code]) if dc.code in first else None)
            for dc in session.scalars(select(DataCenterRow).order_by(DataCenterRow.slot))]


@router.post("/enroll", response_model=Enrolled, status_code=201, tags=["public"])
def enroll(body: EnrollIn, ctx: Ctx, request: Request) -> Enrolled:
    """A device enrolls itself with an enrollment token (no admin token): the token is used
    up, the device is created, and its credentials and the PoPs to measure are returned."""
    digest = hash_token(body.token)
    with throttled(request), ctx.change() as session:
        row = session.scalar(select(EnrollmentTokenRow)
                             .where(EnrollmentTokenRow.token_sha256 == digest))
        if row is None or not hmac.compare_digest(row.token_sha256, digest):
            raise _unauthorized("unknown or revoked enrollment token")
        problem_if(row.used_by_device is not None,
                   _unauthorized("this enrollment token was already used"))
        problem_if(aware(row.expires_at) <= datetime.now(UTC), _unauthorized(
            f"this enrollment token expired at {aware(row.expires_at).isoformat()}"))
        account_id, user = row.account_id, row.user_name
        device_id = device_id_for(account_id, user, body.device_name) if body.device_name else None
        device, secret = new_device(session, account_id, user, device_id, "device_name")
        # Single use even against a concurrent enrollment with the same token.
        claimed = session.scalar(
            update(EnrollmentTokenRow)
            .where(EnrollmentTokenRow.id == row.id, EnrollmentTokenRow.used_by_device.is_(None))
            .values(used_by_device=device.id).returning(EnrollmentTokenRow.id))
        problem_if(claimed is None, _unauthorized("this enrollment token was already used"))
        enrolling = Principal(token_id=row.id, name=f"enrollment of {user}", scope="account",
                              account_id=account_id)
        record(session, enrolling, action="enroll",
               resource=f"accounts/{account_id}/devices/{device.id}", account_id=account_id,
               before=None, after={**device_dict(device), "enrollment_token": row.id},
               validate=[account_id])
        return Enrolled(device_id=device.id, secret=secret, account_id=account_id, user=user,
                        pops=_pops(session))
