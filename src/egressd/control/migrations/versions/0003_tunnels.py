"""Tunnel connectors of accounts (issue 6): id, account, SHA-256 of the token

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 19:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tunnels",
        sa.Column("id", sa.String(length=63), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("token_issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"],
                                name=op.f("fk_tunnels_account_id_accounts"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tunnels")),
    )
    with op.batch_alter_table("tunnels", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tunnels_account_id"), ["account_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("tunnels", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tunnels_account_id"))
    op.drop_table("tunnels")
