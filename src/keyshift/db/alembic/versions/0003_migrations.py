"""migrations: rules versions, per-account migrations, the ledger, data objects, overrides

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 22:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _when(name: str, *, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("preferences", JSON, nullable=False, server_default="{}"))
    with op.batch_alter_table("subscriptions") as batch:
        batch.add_column(sa.Column("overrides", JSON, nullable=False, server_default="{}"))

    op.create_table(
        "data_objects",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("quota", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("migration_id", sa.String(length=36), nullable=True),
        _when("created_at"),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name="fk_data_objects_account_id_accounts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_data_objects"),
    )
    op.create_index("ix_data_objects_account", "data_objects", ["account_id", "quota", "state"])

    op.create_table(
        "migration_rules",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("content", JSON, nullable=False),
        _when("registered_at"),
        sa.Column("registered_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_migration_rules"),
        sa.UniqueConstraint("key", "version", name="uq_migration_rules_ref"),
    )

    op.create_table(
        "migrations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("lock_account_id", sa.String(length=36), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("rules_ref", sa.String(length=100), nullable=False),
        sa.Column("rules_hash", sa.String(length=64), nullable=False),
        sa.Column("source_ref", sa.String(length=100), nullable=True),
        sa.Column("source_hash", sa.String(length=64), nullable=True),
        sa.Column("target_ref", sa.String(length=100), nullable=False),
        sa.Column("target_hash", sa.String(length=64), nullable=False),
        _when("effective_at", nullable=True),
        sa.Column("outcome_digest", sa.String(length=64), nullable=True),
        sa.Column("snapshot", JSON, nullable=True),
        sa.Column("snapshot_hash", sa.String(length=64), nullable=True),
        sa.Column("plan", JSON, nullable=True),
        sa.Column("receipt", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        _when("created_at"),
        _when("updated_at"),
        _when("cutover_at", nullable=True),
        _when("finished_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name="fk_migrations_account_id_accounts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_migrations"),
        sa.UniqueConstraint("lock_account_id", name="uq_migrations_lock_account_id"),
    )
    op.create_index("ix_migrations_account", "migrations", ["account_id", "created_at"])

    op.create_table(
        "migration_ledger",
        sa.Column("migration_id", sa.String(length=36), nullable=False),
        sa.Column("step", sa.String(length=32), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("snapshot_hash", sa.String(length=64), nullable=True),
        sa.Column("details", JSON, nullable=False),
        _when("at"),
        sa.ForeignKeyConstraint(
            ["migration_id"],
            ["migrations.id"],
            name="fk_migration_ledger_migration_id_migrations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("migration_id", "step", name="pk_migration_ledger"),
    )
    op.create_index(
        "ix_migration_ledger_account_id", "migration_ledger", ["account_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_migration_ledger_account_id", table_name="migration_ledger")
    op.drop_table("migration_ledger")
    op.drop_index("ix_migrations_account", table_name="migrations")
    op.drop_table("migrations")
    op.drop_table("migration_rules")
    op.drop_index("ix_data_objects_account", table_name="data_objects")
    op.drop_table("data_objects")
    with op.batch_alter_table("subscriptions") as batch:
        batch.drop_column("overrides")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("preferences")
