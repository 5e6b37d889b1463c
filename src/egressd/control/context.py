"""What every request handler shares: the store, the publisher, and how a change is made.

A change is one transaction that (1) edits rows, (2) bumps the config version and appends
an audit entry, (3) re-validates the accounts it touched with the same code a PoP uses to
load the snapshot. A change that would make the snapshot invalid is rolled back whole, so
the PoPs never receive a configuration they must refuse.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from egressd.control.auth import Principal
from egressd.control.document import build_document, current_version
from egressd.control.problems import Problem, conflict, from_validation
from egressd.control.publisher import Publisher
from egressd.control.tables import AuditRow, ConfigVersion
from egressd.model.deployment import load_document
from egressd.model.errors import ValidationError


@dataclass
class ControlContext:
    sessions: sessionmaker[Session]
    publisher: Publisher

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    @contextmanager
    def change(self) -> Iterator[Session]:
        """A transaction whose integrity errors and lost races become 409 problems."""
        try:
            with self.sessions() as session, session.begin():
                yield session
        except IntegrityError as error:
            raise integrity_problem(error) from None
        except DBAPIError as error:
            if _lost_race(error):
                raise conflict("a concurrent change won; retry") from None
            raise
        self.publisher.nudge()


def _lost_race(error: DBAPIError) -> bool:
    """Serialization failures, deadlocks (PostgreSQL) and a busy database (SQLite)."""
    code = getattr(getattr(error.orig, "diag", None), "sqlstate", None) or getattr(
        error.orig, "sqlstate", None)
    if code in ("40001", "40P01", "55P03"):
        return True
    text = str(error.orig).lower()
    return "lock" in text or "serializ" in text or "busy" in text


# What a violated constraint means to the caller: (field, rule, what). The names are the
# constraints' names on PostgreSQL; SQLite reports the columns ("locations.ipv4") instead.
# Two requests racing past the service's own checks (two replicas, or two threads) end
# here: the database's constraint decides, and the loser gets the same 409 the checks give.
CONSTRAINTS: dict[str, tuple[str, str | None, str]] = {
    "uq_locations_ipv4": ("ipv4", "R2", "is already assigned to a dedicated location"),
    "locations.ipv4": ("ipv4", "R2", "is already assigned to a dedicated location"),
    "uq_locations_ipv6": ("ipv6", "R2", "is already assigned to a dedicated location"),
    "locations.ipv6": ("ipv6", "R2", "is already assigned to a dedicated location"),
    "pk_locations": ("id", None, "is already a location of this account"),
    "locations.account_id, locations.id": ("id", None, "is already a location of this account"),
    "pk_accounts": ("id", None, "already exists"),
    "accounts.id": ("id", None, "already exists"),
    "pk_data_centers": ("code", None, "already exists"),
    "data_centers.code": ("code", None, "already exists"),
    "uq_data_centers_slot": ("slot", "R9", "is already the slot of another data center"),
    "data_centers.slot": ("slot", "R9", "is already the slot of another data center"),
    "pk_addresses": ("address", None, "is already in the inventory"),
    "addresses.address": ("address", None, "is already in the inventory"),
}

_PG_KEY = re.compile(r"Key \((?P<columns>[^)]*)\)=\((?P<value>.*)\) already exists")


def _integrity_detail(error: IntegrityError) -> str:
    text = str(error.orig).lower()
    if "unique" in text or "duplicate" in text:
        return "it already exists or is already in use (unique constraint)"
    if "foreign key" in text:
        return "it refers to something that does not exist or is still in use (foreign key)"
    if "check" in text:
        return "a value breaks a rule of the store (check constraint)"
    return "the store refused the change (integrity)"


def integrity_problem(error: IntegrityError) -> Problem:
    """The 409 for a violated constraint, naming the field and rule where it is known."""
    diag = getattr(error.orig, "diag", None)
    name = getattr(diag, "constraint_name", None)
    value = None
    if name is None:  # SQLite: "UNIQUE constraint failed: locations.ipv4"
        message = str(error.orig)
        name = message.partition("constraint failed: ")[2] if message.startswith("UNIQUE") else ""
    elif (match := _PG_KEY.search(getattr(diag, "message_detail", None) or "")) is not None:
        value = match["value"] if "," not in match["columns"] else None
    known = CONSTRAINTS.get(name.strip())
    if known is None:
        return conflict(_integrity_detail(error))
    field, rule, what = known
    subject = value if value is not None else f"the {field}"
    return conflict(f"{subject} {what} (a concurrent change took it first)", field=field,
                    rule=rule)


def record(
    session: Session,
    principal: Principal,
    *,
    action: str,
    resource: str,
    account_id: str | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    validate: Iterable[str] | None = (),
) -> int:
    """Bump the version, write the audit entry, and validate; returns the new version.

    `validate` names the accounts to re-check; None re-checks the whole deployment (changes
    to data centers, inventory or deployment settings can affect every account).
    """
    session.flush()
    now = datetime.now(UTC)
    # The UPDATE takes the row lock: concurrent changes get consecutive versions.
    version = session.execute(
        update(ConfigVersion).where(ConfigVersion.id == 1)
        .values(version=ConfigVersion.version + 1, changed_at=now)
        .returning(ConfigVersion.version)
    ).scalar_one()
    audit(session, principal, action=action, resource=resource, account_id=account_id,
          before=before, after=after, version=int(version), at=now)
    check(session, None if validate is None else list(validate), version)
    return int(version)


def check(session: Session, account_ids: list[str] | None, version: int) -> None:
    session.flush()
    _, document = build_document(session, account_ids=account_ids)
    try:
        load_document(document, version=version, now=datetime.now(UTC))
    except ValidationError as error:
        raise from_validation(error) from None


def problem_if(condition: bool, problem: Problem) -> None:
    if condition:
        raise problem


def audit(
    session: Session,
    principal: Principal,
    *,
    action: str,
    resource: str,
    account_id: str | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    version: int | None = None,
    at: datetime | None = None,
) -> None:
    """An audit entry. Without `version` it records a change that is not configuration
    (tokens, enrollment tokens): the entry carries the version in force, none is made."""
    session.add(AuditRow(at=at or datetime.now(UTC), actor=principal.actor, action=action,
                         resource=resource, account_id=account_id,
                         version=current_version(session) if version is None else version,
                         before=before, after=after))
