"""Users, groups and devices: who may send traffic through an account.

Membership has one place: a user's `groups` list (POST or PATCH the user). Groups are
declared first, so a misspelt group name is an error instead of a new group that no
policy selects. Devices are the proxy credentials the PoPs check (the device id is the
proxy user name, unique in the whole deployment): the secret is generated here, returned
once, and only its SHA-256 is stored and published, so every device change is a new
snapshot version. Devices can also enroll themselves: see `api_enrollment`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from egressd.control.api_accounts import get_account
from egressd.control.context import problem_if, record
from egressd.control.deps import NAME, AccountId, Caller, Ctx
from egressd.control.document import aware
from egressd.control.problems import Problem, conflict, invalid, not_found
from egressd.control.tables import (
    DeviceRow,
    EnrollmentTokenRow,
    GroupRow,
    MembershipRow,
    PolicyRow,
    UserRow,
)

router = APIRouter(prefix="/v1", tags=["identity"])

DEVICE_ID = r"^[a-z0-9][a-z0-9._-]{0,99}$"
GroupName = Annotated[str, Field(pattern=NAME)]
UserName = Annotated[str, Path(max_length=100)]
GroupPath = Annotated[str, Path(max_length=100)]
DeviceId = Annotated[str, Path(max_length=100)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserIn(Strict):
    name: str = Field(pattern=NAME, description="Unique in the account; the `users` selector "
                      "and the R6 tie-break use it")
    groups: list[GroupName] = Field(default_factory=list, max_length=100,
                                    description="Groups (declared first) the user is in")


class UserPatch(Strict):
    groups: list[GroupName] = Field(max_length=100, description="Replaces the user's groups")


class UserOut(BaseModel):
    name: str
    groups: list[str]
    devices: list[str] = Field(description="Ids of the user's devices")


class GroupIn(Strict):
    name: str = Field(pattern=NAME)


class GroupOut(BaseModel):
    name: str
    members: list[str]


class DeviceIn(Strict):
    user: str = Field(max_length=100, description="The user of the account who owns it")
    id: str | None = Field(default=None, pattern=DEVICE_ID, description="The proxy user name, "
                           "unique in the deployment; default `<account>-<user>-<6 hex>`")


class DeviceOut(BaseModel):
    id: str
    account_id: str
    user: str
    created_at: datetime


class DeviceCreated(DeviceOut):
    secret: str = Field(description="The proxy password. Shown once; only its SHA-256 is kept")


# Helpers
# --------------------------------------------------------------------------------------


def _get_user(session: Session, account_id: str, name: str) -> UserRow:
    get_account(session, account_id)
    row = session.get(UserRow, (account_id, name))
    if row is None:
        raise not_found("user", name)
    return row


def known_user(session: Session, account_id: str, name: str) -> UserRow:
    """A user named in a request body: unknown is a bad value (422), not a missing page."""
    row = session.get(UserRow, (account_id, name))
    if row is None:
        raise invalid(f"unknown user {name!r} of account {account_id!r}", field="user")
    return row


def _groups_of(session: Session, account_id: str, user: str) -> list[str]:
    return sorted(session.scalars(select(MembershipRow.group_name).where(
        MembershipRow.account_id == account_id, MembershipRow.user_name == user)))


def _devices_of(session: Session, account_id: str, user: str) -> list[str]:
    return sorted(session.scalars(select(DeviceRow.id).where(
        DeviceRow.account_id == account_id, DeviceRow.user_name == user)))


def _user_out(session: Session, row: UserRow) -> UserOut:
    return UserOut(name=row.name, groups=_groups_of(session, row.account_id, row.name),
                   devices=_devices_of(session, row.account_id, row.name))


def _set_groups(session: Session, account_id: str, user: str, groups: list[str]) -> None:
    wanted = sorted(set(groups))
    known = set(session.scalars(select(GroupRow.name).where(GroupRow.account_id == account_id)))
    unknown = [name for name in wanted if name not in known]
    problem_if(bool(unknown), invalid(
        f"unknown group(s) {', '.join(map(repr, unknown))}: create them first "
        f"(POST /v1/accounts/{account_id}/groups)", field="groups"))
    session.execute(delete(MembershipRow).where(
        MembershipRow.account_id == account_id, MembershipRow.user_name == user))
    session.add_all(MembershipRow(account_id=account_id, user_name=user, group_name=name)
                    for name in wanted)
    session.flush()


def policies_selecting(session: Session, account_id: str, key: str, names: set[str]) -> list[str]:
    """Ids of the account's policies whose selector `key` names any of `names`."""
    rows = session.scalars(select(PolicyRow).where(PolicyRow.account_id == account_id)
                           .order_by(PolicyRow.position))
    return [row.id for row in rows if names & set(row.body.get(key, []))]


def _still_selected(what: str, policies: list[str], field: str) -> Problem:
    return conflict(f"{what} is selected by policy {', '.join(map(repr, policies))}: "
                    "change the policy first", field=field)


def _device_out(row: DeviceRow) -> DeviceOut:
    return DeviceOut(id=row.id, account_id=row.account_id, user=row.user_name,
                     created_at=aware(row.created_at))


def device_dict(row: DeviceRow) -> dict[str, Any]:
    """What the audit log keeps of a device: never the secret nor its hash."""
    return {"id": row.id, "user": row.user_name}


def device_id_for(account_id: str, user: str, suffix: str) -> str:
    """`<account>-<user>-<suffix>`, the user made to fit the device id pattern and 100 chars."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", user.lower()).strip("-._")
    slug = slug[:max(0, 100 - len(account_id) - len(suffix) - 2)].rstrip("-._")
    return "-".join(part for part in (account_id, slug, suffix) if part)


def new_device(session: Session, account_id: str, user: str, device_id: str | None,
                field: str) -> tuple[DeviceRow, str]:
    """A device with a fresh secret; returns the row and the secret (shown once)."""
    if device_id is None:
        device_id = device_id_for(account_id, user, secrets.token_hex(3))
        for _ in range(5):
            if session.get(DeviceRow, device_id) is None:
                break
            device_id = device_id_for(account_id, user, secrets.token_hex(3))
    # Device ids are global (the proxy user name): the 409 says so, not who holds it.
    problem_if(session.get(DeviceRow, device_id) is not None, conflict(
        f"device id {device_id!r} is already in use (device ids are deployment-wide)",
        field=field))
    secret = secrets.token_urlsafe(24)
    row = DeviceRow(id=device_id, account_id=account_id, user_name=user,
                    secret_sha256=hashlib.sha256(secret.encode()).hexdigest(),
                    created_at=datetime.now(UTC))
    session.add(row)
    session.flush()
    return row, secret


# Users
# --------------------------------------------------------------------------------------


@router.get("/accounts/{account_id}/users", response_model=list[UserOut])
def list_users(account_id: AccountId, ctx: Ctx, caller: Caller) -> list[UserOut]:
    caller.require_account(account_id)
    with ctx.read() as session:
        get_account(session, account_id)
        rows = session.scalars(select(UserRow).where(UserRow.account_id == account_id)
                               .order_by(UserRow.name))
        return [_user_out(session, row) for row in rows]


@router.post("/accounts/{account_id}/users", response_model=UserOut, status_code=201)
def create_user(account_id: AccountId, body: UserIn, ctx: Ctx, caller: Caller) -> UserOut:
    caller.require_account(account_id)
    with ctx.change() as session:
        get_account(session, account_id)
        problem_if(session.get(UserRow, (account_id, body.name)) is not None,
                   conflict(f"user {body.name!r} already exists", field="name"))
        row = UserRow(account_id=account_id, name=body.name)
        session.add(row)
        session.flush()
        _set_groups(session, account_id, body.name, body.groups)
        out = _user_out(session, row)
        record(session, caller, action="create", resource=f"accounts/{account_id}/users/{row.name}",
               account_id=account_id, before=None, after={"name": row.name, "groups": out.groups},
               validate=[account_id])
        return out


@router.get("/accounts/{account_id}/users/{name}", response_model=UserOut)
def read_user(account_id: AccountId, name: UserName, ctx: Ctx, caller: Caller) -> UserOut:
    caller.require_account(account_id)
    with ctx.read() as session:
        return _user_out(session, _get_user(session, account_id, name))


@router.patch("/accounts/{account_id}/users/{name}", response_model=UserOut)
def update_user(account_id: AccountId, name: UserName, body: UserPatch, ctx: Ctx,
                caller: Caller) -> UserOut:
    caller.require_account(account_id)
    with ctx.change() as session:
        row = _get_user(session, account_id, name)
        before = {"name": name, "groups": _groups_of(session, account_id, name)}
        _set_groups(session, account_id, name, body.groups)
        out = _user_out(session, row)
        record(session, caller, action="update", resource=f"accounts/{account_id}/users/{name}",
               account_id=account_id, before=before, after={"name": name, "groups": out.groups},
               validate=[account_id])
        return out


@router.delete("/accounts/{account_id}/users/{name}", status_code=204)
def delete_user(account_id: AccountId, name: UserName, ctx: Ctx, caller: Caller) -> Response:
    """Deletes the user's devices and enrollment tokens with it."""
    caller.require_account(account_id)
    with ctx.change() as session:
        row = _get_user(session, account_id, name)
        devices = _devices_of(session, account_id, name)
        selecting = policies_selecting(session, account_id, "users", {name})
        selecting += policies_selecting(session, account_id, "devices", set(devices))
        problem_if(bool(selecting), _still_selected(
            f"user {name!r} (or one of their devices)", sorted(set(selecting)), "name"))
        before = {"name": name, "groups": _groups_of(session, account_id, name),
                  "devices": devices}
        for table in (MembershipRow, DeviceRow, EnrollmentTokenRow):
            session.execute(delete(table).where(table.account_id == account_id,
                                                table.user_name == name))
        session.delete(row)
        record(session, caller, action="delete", resource=f"accounts/{account_id}/users/{name}",
               account_id=account_id, before=before, after=None, validate=[account_id])
    return Response(status_code=204)


# Groups
# --------------------------------------------------------------------------------------


def _members(session: Session, account_id: str, group: str) -> list[str]:
    return sorted(session.scalars(select(MembershipRow.user_name).where(
        MembershipRow.account_id == account_id, MembershipRow.group_name == group)))


def _get_group(session: Session, account_id: str, name: str) -> GroupRow:
    get_account(session, account_id)
    row = session.get(GroupRow, (account_id, name))
    if row is None:
        raise not_found("group", name)
    return row


@router.get("/accounts/{account_id}/groups", response_model=list[GroupOut])
def list_groups(account_id: AccountId, ctx: Ctx, caller: Caller) -> list[GroupOut]:
    caller.require_account(account_id)
    with ctx.read() as session:
        get_account(session, account_id)
        members: dict[str, list[str]] = {}
        for member in session.scalars(select(MembershipRow).where(
                MembershipRow.account_id == account_id).order_by(MembershipRow.user_name)):
            members.setdefault(member.group_name, []).append(member.user_name)
        names = session.scalars(select(GroupRow.name).where(GroupRow.account_id == account_id)
                                .order_by(GroupRow.name))
        return [GroupOut(name=name, members=members.get(name, [])) for name in names]


@router.post("/accounts/{account_id}/groups", response_model=GroupOut, status_code=201)
def create_group(account_id: AccountId, body: GroupIn, ctx: Ctx, caller: Caller) -> GroupOut:
    """Members join through the user's `groups` list."""
    caller.require_account(account_id)
    with ctx.change() as session:
        get_account(session, account_id)
        problem_if(session.get(GroupRow, (account_id, body.name)) is not None,
                   conflict(f"group {body.name!r} already exists", field="name"))
        session.add(GroupRow(account_id=account_id, name=body.name))
        record(session, caller, action="create",
               resource=f"accounts/{account_id}/groups/{body.name}", account_id=account_id,
               before=None, after={"name": body.name}, validate=[account_id])
        return GroupOut(name=body.name, members=[])


@router.get("/accounts/{account_id}/groups/{name}", response_model=GroupOut)
def read_group(account_id: AccountId, name: GroupPath, ctx: Ctx, caller: Caller) -> GroupOut:
    caller.require_account(account_id)
    with ctx.read() as session:
        _get_group(session, account_id, name)
        return GroupOut(name=name, members=_members(session, account_id, name))


@router.delete("/accounts/{account_id}/groups/{name}", status_code=204)
def delete_group(account_id: AccountId, name: GroupPath, ctx: Ctx, caller: Caller) -> Response:
    """Its members leave it; refused while a policy selects it."""
    caller.require_account(account_id)
    with ctx.change() as session:
        row = _get_group(session, account_id, name)
        selecting = policies_selecting(session, account_id, "groups", {name})
        problem_if(bool(selecting), _still_selected(f"group {name!r}", selecting, "name"))
        before = {"name": name, "members": _members(session, account_id, name)}
        session.execute(delete(MembershipRow).where(MembershipRow.account_id == account_id,
                                                    MembershipRow.group_name == name))
        session.delete(row)
        record(session, caller, action="delete",
               resource=f"accounts/{account_id}/groups/{name}", account_id=account_id,
               before=before, after=None, validate=[account_id])
    return Response(status_code=204)


# Devices
# --------------------------------------------------------------------------------------


def _get_device(session: Session, account_id: str, device_id: str) -> DeviceRow:
    get_account(session, account_id)
    row = session.get(DeviceRow, device_id)
    if row is None or row.account_id != account_id:  # another account's is not ours to show
        raise not_found("device", device_id)
    return row


@router.get("/accounts/{account_id}/devices", response_model=list[DeviceOut])
def list_devices(
    account_id: AccountId, ctx: Ctx, caller: Caller,
    user: Annotated[str | None, Query(max_length=100, description="Only this user's")] = None,
) -> list[DeviceOut]:
    caller.require_account(account_id)
    with ctx.read() as session:
        get_account(session, account_id)
        query = select(DeviceRow).where(DeviceRow.account_id == account_id).order_by(DeviceRow.id)
        if user is not None:
            query = query.where(DeviceRow.user_name == user)
        return [_device_out(row) for row in session.scalars(query)]


@router.post("/accounts/{account_id}/devices", response_model=DeviceCreated, status_code=201)
def create_device(account_id: AccountId, body: DeviceIn, ctx: Ctx, caller: Caller) -> DeviceCreated:
    """A device credential: `id` is the proxy user name, `secret` the password (shown once)."""
    caller.require_account(account_id)
    with ctx.change() as session:
        get_account(session, account_id)
        known_user(session, account_id, body.user)
        row, secret = new_device(session, account_id, body.user, body.id, "id")
        record(session, caller, action="create",
               resource=f"accounts/{account_id}/devices/{row.id}", account_id=account_id,
               before=None, after=device_dict(row), validate=[account_id])
        return DeviceCreated(**_device_out(row).model_dump(), secret=secret)


@router.get("/accounts/{account_id}/devices/{device_id}", response_model=DeviceOut)
def read_device(account_id: AccountId, device_id: DeviceId, ctx: Ctx, caller: Caller) -> DeviceOut:
    caller.require_account(account_id)
    with ctx.read() as session:
        return _device_out(_get_device(session, account_id, device_id))


@router.delete("/accounts/{account_id}/devices/{device_id}", status_code=204)
def delete_device(account_id: AccountId, device_id: DeviceId, ctx: Ctx, caller: Caller) -> Response:
    """The PoPs refuse the device from the next snapshot version on."""
    caller.require_account(account_id)
    with ctx.change() as session:
        row = _get_device(session, account_id, device_id)
        selecting = policies_selecting(session, account_id, "devices", {device_id})
        problem_if(bool(selecting), _still_selected(f"device {device_id!r}", selecting, "id"))
        before = device_dict(row)
        session.delete(row)
        record(session, caller, action="delete",
               resource=f"accounts/{account_id}/devices/{device_id}", account_id=account_id,
               before=before, after=None, validate=[account_id])
    return Response(status_code=204)
