"""The store itself: migrations match the schema, a deployment file round-trips through
the store into the same snapshot, and a bad import writes nothing."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select

from egressd.control.bootstrap import ensure_admin_token, import_deployment, is_empty
from egressd.control.db import make_engine, migrate, sessions
from egressd.control.document import build_document, current_version
from egressd.control.tables import AccountRow, ApiTokenRow, AuditRow, Base
from egressd.model.accounts import Account
from egressd.model.deployment import load_deployment, load_document
from egressd.model.errors import ValidationError

SEED = Path(__file__).parents[2] / "examples" / "seed.toml"


def test_migrations_create_exactly_the_declared_schema(store_url: str) -> None:
    engine = make_engine(store_url)
    migrate(engine)
    migrate(engine)  # idempotent
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert diff == [], "tables.py changed without a migration: " + repr(diff)


def test_a_deployment_file_round_trips_through_the_store(store_url: str) -> None:
    engine = make_engine(store_url)
    migrate(engine)
    text = SEED.read_text()
    version = import_deployment(engine, text)
    with sessions(engine)() as session:
        assert current_version(session) == version
        stored_version, document = build_document(session)
        entries = session.scalars(select(AuditRow)).all()
    engine.dispose()
    assert stored_version == version
    assert [entry.action for entry in entries] == ["import"]
    original = load_deployment(text)
    copy = load_document(document, version=version)
    assert copy.data_centers == original.data_centers
    # The store lists locations, users and devices by id; the file in its own order.
    assert {k: canonical(v.account) for k, v in copy.accounts.items()} == {
        k: canonical(v.account) for k, v in original.accounts.items()}
    assert copy.origins == original.origins
    assert copy.routes == original.routes
    assert copy.settings == original.settings


def canonical(account: Account) -> Account:
    return dataclasses.replace(
        account,
        locations=tuple(sorted(account.locations, key=lambda loc: loc.id)),
        users=tuple(sorted(account.users, key=lambda user: user.name)),
        devices=tuple(sorted(account.devices, key=lambda device: device.id)),
    )


def test_an_invalid_file_imports_nothing(store_url: str) -> None:
    engine = make_engine(store_url)
    migrate(engine)
    bad = SEED.read_text().replace('plan = "enterprise"', 'plan = "platinum"', 1)
    with pytest.raises(ValidationError):
        import_deployment(engine, bad)
    assert is_empty(engine)
    with sessions(engine)() as session:
        assert session.scalars(select(AccountRow)).all() == []
    engine.dispose()


def test_the_first_admin_token_is_written_once_and_privately(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    migrate(engine)
    path = tmp_path / "state" / "admin.token"
    assert ensure_admin_token(engine, path)
    token = path.read_text().strip()
    assert token.startswith("egd_") and len(token) > 30
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not ensure_admin_token(engine, path)
    with sessions(engine)() as session:
        rows = session.scalars(select(ApiTokenRow)).all()
    assert len(rows) == 1 and token not in rows[0].token_sha256
    engine.dispose()
