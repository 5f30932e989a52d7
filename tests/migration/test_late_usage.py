"""A usage event that happened before a migration's cutover but arrives after it counts in the
plan and period it belongs to."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import UsageCounter
from keyshift.metering import service as metering
from keyshift.metering import subjects
from keyshift.metering.errors import UnknownMeter
from keyshift.migration.executor import Executor
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers


async def _record(db: Database, account_id: str, *events: metering.UsageIn) -> list:
    async def once(session):
        subject = await subjects.subject_for_account(session, account_id)
        return await metering.record_batch(session, SYSTEM, subject, list(events))

    return await metering.in_transaction(db, once)


async def test_an_event_from_before_the_cutover_counts_under_the_old_plan(
    db: Database, secrets: Secrets
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets, exports=7)
    row = await Executor(db, secrets.signing).apply(SYSTEM, helpers.rules(), account_id)
    assert row.state == "completed" and row.cutover_at is not None
    before = row.cutover_at - timedelta(milliseconds=1)
    assert (await helpers.subscription(db, account_id)).started_at < before

    recorded = await _record(
        db,
        account_id,
        metering.UsageIn("legacy_jobs", 3, "late-1", before),
        metering.UsageIn("exports", 2, "late-2", before),
    )

    assert [r.to_dict()["meter"] for r in recorded] == ["legacy_jobs", "exports"]
    async with db.transaction() as session:
        counters = {
            c.meter: (c.used, c.period_end - c.period_start)
            for c in (await session.execute(select(UsageCounter))).scalars()
        }
    # legacy_jobs: only the old plan meters it, daily — counted in that day's period.
    assert counters["legacy_jobs"] == (3, timedelta(days=1))
    assert counters["exports"][0] == 9
    # The same meter for a time after the cutover is unknown: the new plan does not meter it.
    with pytest.raises(UnknownMeter):
        await _record(db, account_id, metering.UsageIn("legacy_jobs", 1, "now-1"))
