"""The store's schema (SQLAlchemy 2). Integrity lives here too, not only in the service code.

Unique constraints make address ownership a database fact: two replicas racing to assign
one address both try to insert a location row, and exactly one insert succeeds (R2).
Every mutating transaction also bumps `config_version`, which is the snapshot version.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[str]: JSON, datetime: DateTime(timezone=True)}


class ConfigVersion(Base):
    """One row: the version of the configuration, bumped by every change."""

    __tablename__ = "config_version"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, nullable=False)
    changed_at: Mapped[datetime]


class DeploymentSettingsRow(Base):
    __tablename__ = "deployment_settings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    quarantine_days: Mapped[int] = mapped_column(Integer, default=30)
    allow_destinations: Mapped[list[str]] = mapped_column(default=list)
    control_addresses: Mapped[list[str]] = mapped_column(default=list)


class DataCenterRow(Base):
    __tablename__ = "data_centers"
    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    city: Mapped[str] = mapped_column(String(100))
    country: Mapped[str] = mapped_column(String(2))
    region: Mapped[str] = mapped_column(String(10), default="")
    latitude: Mapped[float] = mapped_column(Float)
    longitude: Mapped[float] = mapped_column(Float)
    backbone: Mapped[str | None] = mapped_column(String(64), nullable=True)
    slot: Mapped[int] = mapped_column(Integer, unique=True)


class AddressRow(Base):
    """The address inventory: shared and dedicated IPv4 addresses and IPv6 prefixes of a PoP."""

    __tablename__ = "addresses"
    address: Mapped[str] = mapped_column(String(64), primary_key=True)  # canonical text
    family: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # shared | dedicated
    data_center: Mapped[str] = mapped_column(
        ForeignKey("data_centers.code", ondelete="RESTRICT"), index=True
    )
    __table_args__ = (
        CheckConstraint("family IN (4, 6)", name="family"),
        CheckConstraint("kind IN ('shared', 'dedicated')", name="kind"),
    )


class AccountRow(Base):
    __tablename__ = "accounts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    plan: Mapped[str] = mapped_column(String(16))
    proxy_tcp: Mapped[bool] = mapped_column(Boolean, default=True)
    proxy_udp: Mapped[bool] = mapped_column(Boolean, default=False)
    fallback: Mapped[str] = mapped_column(String(16), default="closed")
    created_at: Mapped[datetime]
    __table_args__ = (
        CheckConstraint("plan IN ('free', 'enterprise')", name="plan"),
        CheckConstraint("fallback IN ('closed', 'shared')", name="fallback"),
        CheckConstraint("proxy_tcp OR NOT proxy_udp", name="udp_needs_tcp"),
    )


class LocationRow(Base):
    """A dedicated location. The unique address columns are what makes ownership exclusive."""

    __tablename__ = "locations"
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    ipv4: Mapped[str] = mapped_column(ForeignKey("addresses.address"), unique=True)
    ipv6: Mapped[str | None] = mapped_column(
        ForeignKey("addresses.address"), unique=True, nullable=True
    )
    state: Mapped[str] = mapped_column(String(16))
    assigned_at: Mapped[datetime]
    __table_args__ = (CheckConstraint("state IN ('pending', 'active')", name="state"),)


class QuarantineRow(Base):
    __tablename__ = "quarantine"
    address: Mapped[str] = mapped_column(ForeignKey("addresses.address"), primary_key=True)
    released_by: Mapped[str] = mapped_column(String(64))
    until: Mapped[datetime]


class UserRow(Base):
    __tablename__ = "users"
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(100), primary_key=True)


class GroupRow(Base):
    __tablename__ = "groups"
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(100), primary_key=True)


class MembershipRow(Base):
    __tablename__ = "memberships"
    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(100), primary_key=True)
    group_name: Mapped[str] = mapped_column(String(100), primary_key=True)
    __table_args__ = (
        ForeignKeyConstraint(
            ["account_id", "user_name"], ["users.account_id", "users.name"], ondelete="CASCADE"
        ),
        ForeignKeyConstraint(
            ["account_id", "group_name"], ["groups.account_id", "groups.name"], ondelete="CASCADE"
        ),
    )


class DeviceRow(Base):
    """A device credential; only the SHA-256 of its secret is stored."""

    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    user_name: Mapped[str] = mapped_column(String(100))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    __table_args__ = (
        ForeignKeyConstraint(
            ["account_id", "user_name"], ["users.account_id", "users.name"], ondelete="CASCADE"
        ),
    )


class EnrollmentTokenRow(Base):
    __tablename__ = "enrollment_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    user_name: Mapped[str] = mapped_column(String(100))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[datetime]
    used_by_device: Mapped[str | None] = mapped_column(String(100), nullable=True)
    __table_args__ = (
        ForeignKeyConstraint(
            ["account_id", "user_name"], ["users.account_id", "users.name"], ondelete="CASCADE"
        ),
    )


class PolicyRow(Base):
    __tablename__ = "policies"
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]]  # the policy as in the deployment document


class PrivateRouteRow(Base):
    __tablename__ = "private_routes"
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    via: Mapped[str] = mapped_column(String(100))
    destinations: Mapped[list[str]]


class TunnelRow(Base):
    """A tunnel connector of an account (issue 6); only the SHA-256 of its token is kept.
    Ids are deployment-wide: the token names its connector, and a PoP finds it by id."""

    __tablename__ = "tunnels"
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"),
                                            index=True)
    token_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    token_issued_at: Mapped[datetime]


class OriginRow(Base):
    __tablename__ = "in_network_origins"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    destinations: Mapped[list[str]]


class ApiTokenRow(Base):
    """Admin and PoP tokens. Scope: `deployment`, `account` (with account_id) or `pop`."""

    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    scope: Mapped[str] = mapped_column(String(16))
    account_id: Mapped[str | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=True
    )
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    __table_args__ = (
        CheckConstraint("scope IN ('deployment', 'account', 'pop')", name="scope"),
        CheckConstraint("(scope = 'account') = (account_id IS NOT NULL)", name="account_scope"),
    )


class AuditRow(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(16))  # create | update | delete | ...
    resource: Mapped[str] = mapped_column(String(200))
    account_id: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    version: Mapped[int] = mapped_column(BigInteger)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class PopStatusRow(Base):
    """Which snapshot version each PoP confirmed, and when it was last heard from."""

    __tablename__ = "pop_status"
    pop: Mapped[str] = mapped_column(String(16), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)
    seen_at: Mapped[datetime]
    replica: Mapped[str] = mapped_column(String(100))
    # The PoP's own view, as it last reported it: {"up": [...], "rtt_ms": {peer: ms}, "at": iso}
    health: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


__all__ = ["Base", "UniqueConstraint"]
