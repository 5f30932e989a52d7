"""usage: events, per-period counters, unique members and notices

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 20:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _when(name: str, *, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "usage_events",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("license_id", sa.String(length=36), nullable=True),
        sa.Column("meter", sa.String(length=64), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("member_hash", sa.String(length=64), nullable=True),
        _when("occurred_at"),
        _when("received_at"),
        _when("period_start"),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        _when("idempotency_expires_at"),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("response", JSON, nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_usage_events_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_events")),
        sa.UniqueConstraint("account_id", "idempotency_key", name="uq_usage_events_idempotency"),
    )
    op.create_index(
        "ix_usage_events_history",
        "usage_events",
        ["account_id", "meter", "period_start", "occurred_at"],
        unique=False,
    )
    op.create_table(
        "usage_counters",
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("meter", sa.String(length=64), nullable=False),
        _when("period_start"),
        _when("period_end"),
        sa.Column("used", sa.BigInteger(), nullable=False),
        _when("updated_at"),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_usage_counters_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "account_id", "meter", "period_start", name=op.f("pk_usage_counters")
        ),
    )
    op.create_table(
        "usage_unique_members",
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("meter", sa.String(length=64), nullable=False),
        _when("period_start"),
        sa.Column("member_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint(
            "account_id",
            "meter",
            "period_start",
            "member_hash",
            name=op.f("pk_usage_unique_members"),
        ),
    )
    op.create_table(
        "usage_notices",
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("meter", sa.String(length=64), nullable=False),
        _when("period_start"),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("threshold", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("used", sa.BigInteger(), nullable=False),
        _when("fired_at"),
        sa.PrimaryKeyConstraint(
            "account_id",
            "meter",
            "period_start",
            "kind",
            "threshold",
            name=op.f("pk_usage_notices"),
        ),
    )


def downgrade() -> None:
    op.drop_table("usage_notices")
    op.drop_table("usage_unique_members")
    op.drop_table("usage_counters")
    op.drop_index("ix_usage_events_history", table_name="usage_events")
    op.drop_table("usage_events")
