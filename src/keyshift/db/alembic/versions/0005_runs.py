"""runs: migration runs (rules x a cohort) and their per-account queue; migrations.run_id

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 12:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _when(name: str, *, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("migrations") as batch:
        batch.add_column(sa.Column("run_id", sa.String(length=36), nullable=True))
        batch.create_index("ix_migrations_run_id", ["run_id"])

    op.create_table(
        "migration_runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("strategy", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("rules_ref", sa.String(length=100), nullable=False),
        sa.Column("rules_hash", sa.String(length=64), nullable=False),
        sa.Column("cohort", JSON, nullable=False),
        sa.Column("options", JSON, nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("report", JSON, nullable=True),
        sa.Column("report_hash", sa.String(length=64), nullable=True),
        sa.Column("approved_hash", sa.String(length=64), nullable=True),
        sa.Column("halted_reason", sa.Text(), nullable=True),
        _when("rate_cursor", nullable=True),
        _when("cutoff_at", nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("approved_by", sa.String(length=200), nullable=True),
        _when("approved_at", nullable=True),
        _when("created_at"),
        _when("updated_at"),
        _when("started_at", nullable=True),
        _when("finished_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_migration_runs"),
    )
    op.create_table(
        "run_accounts",
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("hold_account_id", sa.String(length=36), nullable=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=True),
        sa.Column("expected_digest", sa.String(length=64), nullable=True),
        sa.Column("migration_id", sa.String(length=36), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("batch_id", sa.String(length=36), nullable=True),
        sa.Column("lease_owner", sa.String(length=100), nullable=True),
        _when("lease_expires_at", nullable=True),
        _when("updated_at"),
        _when("done_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["migration_runs.id"],
            name="fk_run_accounts_run_id_migration_runs",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name="fk_run_accounts_account_id_accounts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "account_id", name="pk_run_accounts"),
        sa.UniqueConstraint("hold_account_id", name="uq_run_accounts_hold_account_id"),
    )
    op.create_index(
        "ix_run_accounts_queue",
        "run_accounts",
        ["run_id", "state", "wave", "priority", "position"],
    )


def downgrade() -> None:
    op.drop_index("ix_run_accounts_queue", table_name="run_accounts")
    op.drop_table("run_accounts")
    op.drop_table("migration_runs")
    with op.batch_alter_table("migrations") as batch:
        batch.drop_index("ix_migrations_run_id")
        batch.drop_column("run_id")
