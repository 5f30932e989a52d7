"""An event's answer is stored as narrow columns and rebuilt from its row (revision 0004): every
kind of answer replays exactly as first given, rows stored whole before 0004 still replay, and
the downgrade writes the whole answer back. Event ids are time-ordered (UUIDv7)."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.engine import Connection

from keyshift.catalog import service as catalog
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import UsageEvent
from keyshift.metering import service as metering
from keyshift.metering import subjects
from keyshift.security.secrets_store import Secrets
from tests import factories
from tests.metering.helpers import (
    _plan,
    anchor_of,
    metered_license,
    publish,
    record,
    record_batch,
)
from tests.support import create_pg_database, drop_pg_database

UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_event_ids_are_uuid7_and_ordered_by_time() -> None:
    first = metering._new_ids(500)
    time.sleep(0.002)
    later = metering._new_ids(500)
    assert all(UUID7.match(i) for i in first + later)
    assert len(set(first + later)) == 1000
    assert max(first) < min(later)  # a later millisecond sorts after
    stamp = int(first[0][:8] + first[0][9:13], 16)
    assert abs(stamp / 1000 - time.time()) < 5


async def test_every_kind_of_answer_replays_exactly(db: Database, secrets: Secrets) -> None:
    account, _, _ = await metered_license(db, secrets)
    now = await anchor_of(db, account) + timedelta(days=1)
    cases: list[tuple[str, int, str, dict[str, Any]]] = [
        ("calls", 90, "a", {}),  # crosses 80 %
        ("calls", 20, "b", {}),  # crosses 100 % and goes over: notice 100, overage flagged
        ("devices", 1, "c", {"member": "d1"}),
        ("devices", 1, "d", {"member": "d1"}),  # a member already seen counts 0
        ("peak", 30, "e", {}),
        ("peak", 10, "f", {}),  # max: below the peak, counts 0
        ("jobs", 25, "g", {}),  # a block meter filled exactly
    ]
    firsts = [
        (await record(db, account, meter, q, idem, now=now, **kw)).body
        for meter, q, idem, kw in cases
    ]
    assert firsts[0]["notices"] == [80]
    assert firsts[1]["notices"] == [100] and firsts[1]["overage_flagged"] is True
    assert firsts[1]["over"] is True and firsts[1]["remaining"] == 0
    assert firsts[3]["counted"] == 0 and firsts[5]["counted"] == 0
    for (meter, q, idem, kw), first in zip(cases, firsts, strict=True):
        again = await record(db, account, meter, q, idem, now=now + timedelta(hours=1), **kw)
        assert again.replayed
        assert again.body == first

    events = [metering.UsageIn("calls", 1, f"batch-{i}") for i in range(5)]
    batch = await record_batch(db, account, events, now=now)
    replayed = await record_batch(db, account, events, now=now)
    assert [r.body for r in replayed] == [r.body for r in batch]
    assert all(r.replayed for r in replayed)


async def test_a_timestamp_with_an_offset_replays_as_first_answered(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    now = await anchor_of(db, account) + timedelta(days=1)
    local = (now - timedelta(hours=1)).astimezone(timezone(timedelta(hours=2)))
    first = await record(db, account, "calls", 1, "tz-1", timestamp=local, now=now)
    again = await record(db, account, "calls", 1, "tz-1", timestamp=local, now=now)
    assert again.replayed and again.body == first.body
    assert first.body["occurred_at"].endswith("Z")  # the instant, in UTC
    events = [
        metering.UsageIn("calls", 1, "tz-2", timestamp=local),
        metering.UsageIn("calls", 1, "tz-3", timestamp=local.astimezone(UTC)),
    ]
    batch = await record_batch(db, account, events, now=now)
    assert batch[0].body["occurred_at"] == batch[1].body["occurred_at"] == first.body["occurred_at"]


async def test_an_event_crossing_many_thresholds_is_stored(db: Database, secrets: Secrets) -> None:
    await publish(db)
    many = list(range(10, 1001, 10))  # 100 thresholds: "10,20,…,1000" is 390 characters
    plan = _plan(
        "many-notices",
        {"model": "usage"},
        [{"key": "calls", "unit": "call", "included": 100, "overage": "notify", "notify_at": many}],
    )
    async with db.transaction() as session:
        await catalog.publish(session, SYSTEM, [catalog.Manifest("plan", plan)])
    account = await factories.create_account(db, "many-notices@1")
    now = await anchor_of(db, account.id) + timedelta(days=1)
    first = await record(db, account.id, "calls", 1000, "all-at-once", now=now)
    assert first.body["notices"] == many
    again = await record(db, account.id, "calls", 1000, "all-at-once", now=now)
    assert again.replayed and again.body == first.body


async def test_rows_stored_whole_before_0004_still_replay(db: Database, secrets: Secrets) -> None:
    account, license_id, _ = await metered_license(db, secrets)
    now = await anchor_of(db, account) + timedelta(days=1)
    event = metering.UsageIn("calls", 3, "legacy-1")
    async with db.transaction() as session:
        subject = await subjects.subject_for_account(session, account)
        stored = {"id": "old-answer", "used": 3, "note": "as 0003 stored it"}
        await session.execute(
            insert(UsageEvent).values(
                id="00000000-0000-4000-8000-000000000001",
                account_id=account,
                license_id=license_id,
                meter="calls",
                quantity=3,
                occurred_at=now,
                received_at=now,
                period_start=now,
                idempotency_key="legacy-1",
                idempotency_expires_at=now + timedelta(days=2),
                request_hash=event.request_hash(subject),
                actor="system",
                response=stored,
            )
        )
    again = await record(db, account, "calls", 3, "legacy-1", now=now)
    assert again.replayed and again.body == stored


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_downgrade_writes_each_answer_back_whole(
    backend: str, tmp_path: Any, secrets: Secrets
) -> None:
    from alembic import command

    from keyshift.db.migrate import alembic_config, upgrade_to_head

    pg_name = None
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'down.db'}"
    else:
        pg_name, url = await create_pg_database()
    db = Database(url)
    try:
        await upgrade_to_head(db.engine)
        account, _, _ = await metered_license(db, secrets)
        now = await anchor_of(db, account) + timedelta(days=1)
        answers = [
            (await record(db, account, "calls", q, f"k{q}", now=now)).body for q in (40, 45, 30)
        ]
        answers.append((await record(db, account, "devices", 1, "dev", member="m", now=now)).body)

        def _to(revision: str, connection: Connection) -> None:
            cfg = alembic_config()
            cfg.attributes["connection"] = connection
            command.downgrade(cfg, revision)

        async with db.engine.begin() as connection:
            await connection.run_sync(lambda c: _to("0003", c))
        async with db.engine.connect() as connection:
            rows = await connection.execute(text("SELECT id, response FROM usage_events"))
            written = {r[0]: r[1] for r in rows}
        for body in answers:
            stored = written[body["id"]]
            if isinstance(stored, str):  # SQLite hands JSON back as text
                stored = json.loads(stored)
            assert stored == body
        await upgrade_to_head(db.engine)
        async with db.transaction() as session:
            ids = (await session.execute(select(UsageEvent.id))).scalars().all()
        assert len(ids) == 4
        # After the round trip the old form replays too.
        again = await record(db, account, "calls", 40, "k40", now=now)
        assert again.replayed and again.body == answers[0]
    finally:
        await db.dispose()
        if pg_name:
            await drop_pg_database(pg_name)
