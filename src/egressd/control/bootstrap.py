"""Direct store operations for the operator at the machine: the first admin token, and
importing a deployment file. Everything else goes through the REST API."""

from __future__ import annotations

import os
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from egressd.control.auth import create_token
from egressd.control.context import check
from egressd.control.db import lock_store, sessions
from egressd.control.document import current_version, import_document
from egressd.control.tables import (
    AccountRow,
    ApiTokenRow,
    AuditRow,
    ConfigVersion,
    DataCenterRow,
)
from egressd.model.deployment import load_deployment


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def ensure_admin_token(engine: Engine, path: Path) -> bool:
    """If the store has no deployment token yet, make one and write it to `path` (0600).

    Returns True when a token was created. An existing file is kept if its token is valid.
    """
    with sessions(engine)() as session, session.begin():
        lock_store(session)  # replicas starting together make one token, not one each
        exists = session.scalar(select(ApiTokenRow.id).where(ApiTokenRow.scope == "deployment"))
        if exists is not None:
            return False
        _, token = create_token(session, name="bootstrap-admin", scope="deployment")
        write_private(path, token + "\n")
        return True


def issue_token(engine: Engine, *, name: str, scope: str, account_id: str | None) -> str:
    with sessions(engine)() as session, session.begin():
        if account_id is not None and session.get(AccountRow, account_id) is None:
            raise ValueError(f"account {account_id!r} does not exist")
        _, token = create_token(session, name=name, scope=scope, account_id=account_id)
        return token


def is_empty(engine: Engine) -> bool:
    with sessions(engine)() as session:
        return session.scalar(select(DataCenterRow.code).limit(1)) is None


def import_deployment(
    engine: Engine, text: str, *, replace: bool = False, source: str = "deployment file"
) -> int:
    """Validate a deployment file and load it; returns the new config version.

    Raises DeploymentError (with line numbers) before touching the store if it is invalid.
    """
    load_deployment(text)  # every issue, located, before anything is written
    raw: dict[str, Any] = tomllib.loads(text)
    with sessions(engine)() as session, session.begin():
        import_document(session, raw, replace=replace)
        row = session.get(ConfigVersion, 1)
        assert row is not None
        row.version += 1
        session.add(AuditRow(
            at=datetime.now(UTC), actor="local import", action="import", resource="deployment",
            account_id=None, version=row.version, before=None,
            after={"source": source, "replace": replace,
                   "accounts": len(raw.get("accounts", [])),
                   "data_centers": len(raw.get("data_centers", []))},
        ))
        session.flush()
        check(session, None, row.version)
        return current_version(session)
