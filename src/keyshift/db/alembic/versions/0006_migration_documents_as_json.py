"""migrations: snapshot, plan and receipt stored as json (text), not jsonb

A migration row's snapshot, plan and receipt are documents written once and read whole, by
every step of the migration; nothing queries inside them. PostgreSQL renders jsonb as text on
every read (measured: 83 to 128 ms for a batch of 250 rows of ~9 KB, against 15 ms as json),
which was most of a batch step's time. ``json`` keeps the text as written.

On PostgreSQL the ALTER rewrites the table: on a large ``migrations`` table run it in a
maintenance window. SQLite stores JSON as text already: nothing to do.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 15:55:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("snapshot", "plan", "receipt")


def _retype(to: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "ALTER TABLE migrations "
        + ", ".join(f"ALTER COLUMN {c} TYPE {to} USING {c}::{to}" for c in COLUMNS)
    )


def upgrade() -> None:
    _retype("json")


def downgrade() -> None:
    _retype("jsonb")
