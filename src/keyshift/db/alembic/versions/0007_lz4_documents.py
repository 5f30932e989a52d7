"""the documents a migration writes are compressed with lz4 where PostgreSQL has it

A migration row's snapshot and plan (several KB each), the ledger's step details and the audit
events' details are written once per account per step and rarely read. Past about 2 KB
PostgreSQL compresses a value before storing it out of line, with pglz unless told otherwise;
lz4 does the same work for less CPU (measured with ``benchmarks/worker_cpu.py``: the
database's CPU per migrated account 750 → 676 µs, docs/benchmarks.md).

``SET COMPRESSION`` changes how new values are written: nothing is rewritten, the ALTER takes
a moment whatever the table's size, and values already stored stay readable as they are. Only
on PostgreSQL 14 or later built with lz4 (Debian's and the official images are); elsewhere,
and on SQLite, nothing changes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 21:30:00
"""

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (table, column) of the documents written per account per migration step.
DOCUMENTS = (
    ("migrations", "snapshot"),
    ("migrations", "plan"),
    ("migrations", "receipt"),
    ("migration_ledger", "details"),
    ("audit_events", "details"),
)


def _lz4_available() -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    found = bind.execute(
        text(
            "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression'"
            " AND 'lz4' = ANY(enumvals)"
        )
    ).first()
    return found is not None


def _compress(method: str) -> None:
    if not _lz4_available():
        return
    for table, column in DOCUMENTS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method}")


def upgrade() -> None:
    _compress("lz4")


def downgrade() -> None:
    _compress("pglz")
