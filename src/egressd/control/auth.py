"""API tokens: scoped to the whole deployment, to one account, or to a PoP. Stored hashed."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from egressd.control.problems import Problem
from egressd.control.tables import ApiTokenRow

TOKEN_PREFIX = "egd_"  # noqa: S105 - a prefix that makes leaked tokens recognisable


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(30)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. `name` goes to the audit log; the token itself never does."""

    token_id: str
    name: str
    scope: str  # deployment | account | pop
    account_id: str | None = None

    @property
    def actor(self) -> str:
        return f"{self.name} ({self.token_id})"

    def require_deployment(self) -> None:
        if self.scope != "deployment":
            raise Problem(
                403, "Forbidden", "this needs a deployment-wide admin token",
                kind="forbidden",
            )

    def require_account(self, account_id: str) -> None:
        """An account token reaches its own account only (R13 for the control plane)."""
        if self.scope == "deployment":
            return
        if self.scope == "account" and self.account_id == account_id:
            return
        raise Problem(
            403, "Forbidden",
            f"this token is scoped to account {self.account_id!r}" if self.scope == "account"
            else "a PoP token cannot manage accounts",
            field="account_id", kind="forbidden",
        )

    def require_pop(self) -> None:
        if self.scope not in ("pop", "deployment"):
            raise Problem(403, "Forbidden", "this needs a PoP or deployment token", kind="forbidden")


def create_token(
    session: Session, *, name: str, scope: str, account_id: str | None = None
) -> tuple[ApiTokenRow, str]:
    """A new token; the secret is returned once and only its hash is stored."""
    token = new_token()
    row = ApiTokenRow(
        id=secrets.token_hex(8),
        name=name,
        scope=scope,
        account_id=account_id,
        token_sha256=hash_token(token),
        created_at=datetime.now(UTC),
    )
    session.add(row)
    return row, token


def authenticate(session: Session, authorization: str | None) -> Principal:
    if not authorization:
        raise Problem(401, "Unauthorized", "missing 'Authorization: Bearer <token>'",
                      kind="unauthorized")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Problem(401, "Unauthorized", "expected 'Authorization: Bearer <token>'",
                      kind="unauthorized")
    digest = hash_token(token.strip())
    row = session.scalar(select(ApiTokenRow).where(ApiTokenRow.token_sha256 == digest))
    # The lookup is by hash; compare again in constant time so timing says nothing more.
    if row is None or not hmac.compare_digest(row.token_sha256, digest):
        raise Problem(401, "Unauthorized", "unknown or revoked token", kind="unauthorized")
    return Principal(token_id=row.id, name=row.name, scope=row.scope, account_id=row.account_id)
