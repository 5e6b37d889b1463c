"""Engine, sessions and migrations. SQLite (embedded default) or PostgreSQL (replicas)."""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from egressd.control.tables import ConfigVersion, DeploymentSettingsRow

log = logging.getLogger("egressd.control")


def normalise_url(url: str) -> str:
    """Accept plain `postgresql://` URLs and use psycopg 3 for them."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=True
        )

        @event.listens_for(engine, "connect")
        def _pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration, then make sure the singleton rows exist."""
    config = Config()
    config.set_main_option(
        "script_location", str(importlib.resources.files("egressd.control") / "migrations")
    )
    with engine.begin() as connection:
        # Replicas started together on a fresh database would otherwise race to create the
        # same tables (and the singleton rows): one migrates, the others wait and find it done.
        lock_store(connection)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        if connection.scalar(select(ConfigVersion.id).where(ConfigVersion.id == 1)) is None:
            connection.execute(insert(ConfigVersion).values(
                id=1, version=1, changed_at=datetime.now(UTC)))
        if connection.scalar(
            select(DeploymentSettingsRow.id).where(DeploymentSettingsRow.id == 1)
        ) is None:
            connection.execute(insert(DeploymentSettingsRow).values(
                id=1, quarantine_days=30, allow_destinations=[], control_addresses=[]))
    with Session(engine) as session:
        version = session.scalar(select(ConfigVersion.version).where(ConfigVersion.id == 1))
    log.info("control: store ready at %s (config version %s)", engine.url.render_as_string(), version)


STORE_LOCK = 0x65677265  # "egre": the advisory lock of store-wide start-up work


def lock_store(connection: Connection | Session) -> None:
    """Serialise start-up work (migrations, the first admin token) between replicas.

    PostgreSQL: a transaction-scoped advisory lock, released at commit. SQLite has one
    writer at a time anyway.
    """
    bind = connection.get_bind() if isinstance(connection, Session) else connection
    if bind.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": STORE_LOCK})


def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as session, session.begin():
        yield session
