"""usage_events: the answer in narrow columns instead of a JSON copy per event

An event row carried its whole answer as JSON (about 450 bytes, most of the row). Since this
revision the answer is rebuilt from the row, and only what the rest of the row cannot say is
stored: counted, used, included, policy, period_end, overage_flagged, notices. Rows written
before keep their ``response`` (now nullable) and are replayed from it; nothing is rewritten
on upgrade, so the upgrade is instant on a large history.

Downgrade writes ``response`` for the rows that lack it (in batches), then drops the columns.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 01:15:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
COLUMNS = ("counted", "used", "included", "policy", "period_end", "overage_flagged", "notices")


def upgrade() -> None:
    with op.batch_alter_table("usage_events") as batch:
        batch.add_column(sa.Column("counted", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("used", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("included", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("policy", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("period_end", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("overage_flagged", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("notices", sa.Text(), nullable=True))
        batch.alter_column("response", existing_type=JSON, nullable=True)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite hands back text
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return orjson.dumps(value.astimezone(UTC), option=orjson.OPT_UTC_Z).decode().strip('"')


def downgrade() -> None:
    # The answer as revision 0003 stored it, rebuilt exactly as keyshift.metering.service
    # builds it (kept here, frozen, so the migration does not depend on today's code).
    bind = op.get_bind()
    events = sa.table(
        "usage_events",
        *(sa.column(c) for c in ("id", "account_id", "license_id", "meter", "quantity")),
        *(sa.column(c) for c in ("occurred_at", "received_at", "period_start")),
        sa.column("response", JSON),
        *(sa.column(c) for c in COLUMNS),
    )
    last = ""
    while True:
        # Keyset pages by id: each page is one index range, whatever the history's size.
        rows = bind.execute(
            sa.select(events)
            .where(events.c.response.is_(None), events.c.id > last)
            .order_by(events.c.id)
            .limit(1000)
        ).mappings()
        batch = list(rows)
        if not batch:
            break
        last = batch[-1]["id"]
        for row in batch:
            used, included = row["used"] or 0, row["included"] or 0
            answer = {
                "id": row["id"],
                "account_id": row["account_id"],
                "license_id": row["license_id"],
                "meter": row["meter"],
                "quantity": row["quantity"],
                "counted": row["counted"],
                "occurred_at": _iso(row["occurred_at"]),
                "received_at": _iso(row["received_at"]),
                "period": {"start": _iso(row["period_start"]), "end": _iso(row["period_end"])},
                "used": used,
                "included": included,
                "remaining": max(included - used, 0),
                "policy": row["policy"],
                "over": used > included,
                "overage_flagged": bool(row["overage_flagged"]),
                "notices": [int(n) for n in (row["notices"] or "").split(",") if n],
            }
            bind.execute(events.update().where(events.c.id == row["id"]).values(response=answer))
    with op.batch_alter_table("usage_events") as batch_op:
        batch_op.alter_column("response", existing_type=JSON, nullable=False)
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
