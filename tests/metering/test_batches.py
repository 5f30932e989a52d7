"""Set-based recording against both databases: a batch costs the same statements whatever
its size, repeated keys inside a batch, batches mixing new and replayed keys, a full batch of
1,000 events over every kind of meter, error precedence, expired keys, and a retry racing
its uncommitted first send."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import event, func, select

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent, UsageCounter, UsageEvent, UsageNotice
from keyshift.db.types import utcnow
from keyshift.metering import service as metering
from keyshift.metering import subjects
from keyshift.metering.errors import ConcurrentClaim, IdempotencyConflict, QuotaExceeded
from keyshift.security.secrets_store import Secrets
from tests.metering.helpers import BULK, anchor_of, metered_license, record, record_batch, used

UsageIn = metering.UsageIn


@contextmanager
def statements(db: Database) -> Iterator[list[str]]:
    """Every SQL statement sent to the database inside the block."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", before)


async def _recording_statements(
    db: Database, account: str, events: list[UsageIn]
) -> tuple[list[metering.Recorded], list[str]]:
    """Record a batch; returns the answers and the statements of ``record_batch`` alone
    (not the subject lookup before it)."""
    async with db.transaction() as session:
        subject = await subjects.subject_for_account(session, account)
        with statements(db) as seen:
            results = await metering.record_batch(session, SYSTEM, subject, events)
    return results, seen


async def _count(db: Database, table: type, *where: object) -> int:
    async with db.transaction() as session:
        query = select(func.count()).select_from(table).where(*where)
        return int((await session.execute(query)).scalar_one())


def _mixed(n: int, prefix: str) -> list[UsageIn]:
    """``n`` events spread over the bulk plan's four meters (sum, unique, max, block sum)."""
    kinds = [
        lambda i: UsageIn("requests", 2, f"{prefix}-{i}"),
        lambda i: UsageIn("users", 1, f"{prefix}-{i}", member=f"user-{i % 50}"),
        lambda i: UsageIn("workers", i % 70, f"{prefix}-{i}"),
        lambda i: UsageIn("tasks", 1, f"{prefix}-{i}"),
    ]
    return [kinds[i % 4](i) for i in range(n)]


async def test_a_batch_takes_the_same_statements_whatever_its_size(
    db: Database, secrets: Secrets
) -> None:
    counts = {}
    for size in (4, 100, metering.MAX_BATCH):
        account, _, _ = await metered_license(db, secrets, BULK)
        results, seen = await _recording_statements(db, account, _mixed(size, f"s{size}"))
        assert len(results) == size and not any(r.replayed for r in results)
        counts[size] = len(seen)
    # look up keys, lock counters, add members, insert events, write counters
    assert counts == {4: 5, 100: 5, metering.MAX_BATCH: 5}, counts
    # a full replay only looks the keys up
    again, seen = await _recording_statements(db, account, _mixed(metering.MAX_BATCH, "s1000"))
    assert all(r.replayed for r in again) and len(seen) == 1


async def test_one_event_takes_four_statements(db: Database, secrets: Secrets) -> None:
    account, _, _ = await metered_license(db, secrets, BULK)
    async with db.transaction() as session:
        subject = await subjects.subject_for_account(session, account)
        with statements(db) as seen:
            await metering.record(session, SYSTEM, subject, UsageIn("requests", 1, "one"))
    assert len(seen) == 4, seen


async def test_a_key_repeated_in_a_batch_with_the_same_body_is_counted_once(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    results = await record_batch(
        db,
        account,
        [
            UsageIn("calls", 4, "dup"),
            UsageIn("devices", 1, "dev", member="laptop"),
            UsageIn("calls", 4, "dup"),
            UsageIn("devices", 1, "dev", member="laptop"),
        ],
    )
    assert [r.replayed for r in results] == [False, False, True, True]
    assert results[2].body == results[0].body and results[3].body == results[1].body
    assert await used(db, account, "calls") == 4 and await used(db, account, "devices") == 1
    assert await _count(db, UsageEvent) == 2


async def test_a_key_repeated_in_a_batch_with_another_body_fails_the_batch(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    # lock order is (meter, period, key): the calls event holds the key, the jobs one conflicts
    with pytest.raises(IdempotencyConflict) as caught:
        await record_batch(
            db,
            account,
            [UsageIn("jobs", 1, "k"), UsageIn("calls", 1, "ok"), UsageIn("calls", 1, "k")],
        )
    assert caught.value.field == "events.0.idempotency_key"
    assert caught.value.details["index"] == 0
    assert "nothing in the batch was recorded" in caught.value.message
    assert await _count(db, UsageEvent) == 0 and await used(db, account, "calls") == 0
    # against a stored key: the same body replays it, another body in the batch conflicts
    stored = await record(db, account, "calls", 1, "k")
    with pytest.raises(IdempotencyConflict) as again:
        await record_batch(db, account, [UsageIn("calls", 1, "k"), UsageIn("calls", 2, "k")])
    assert again.value.details == {"first_event_id": stored.body["id"], "index": 1}
    assert await _count(db, UsageEvent) == 1 and await used(db, account, "calls") == 1


async def test_a_batch_mixing_new_and_replayed_keys_counts_only_the_new(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    first = await record_batch(db, account, [UsageIn("calls", i + 1, f"m{i}") for i in range(5)])
    assert await used(db, account, "calls") == 15
    mixed = await record_batch(
        db,
        account,
        [
            UsageIn("calls", 3, "m2"),
            UsageIn("calls", 10, "n0"),
            UsageIn("calls", 5, "m4"),
            UsageIn("calls", 20, "n1"),
        ],
    )
    assert [r.replayed for r in mixed] == [True, False, True, False]
    assert mixed[0].body == first[2].body and mixed[2].body == first[4].body
    assert [mixed[1].body["used"], mixed[3].body["used"]] == [25, 45]
    assert await used(db, account, "calls") == 45 and await _count(db, UsageEvent) == 7
    # a replayed key with a changed body fails the whole batch, new keys included
    with pytest.raises(IdempotencyConflict) as caught:
        await record_batch(db, account, [UsageIn("calls", 1, "n2"), UsageIn("calls", 99, "m3")])
    assert caught.value.details["index"] == 1
    assert await used(db, account, "calls") == 45 and await _count(db, UsageEvent) == 7


async def test_a_full_batch_over_every_kind_of_meter(db: Database, secrets: Secrets) -> None:
    account, _, _ = await metered_license(db, secrets)
    anchor = await anchor_of(db, account)
    now = anchor + timedelta(hours=1)
    events = (
        [UsageIn("calls", 1, f"call-{i:03}") for i in range(400)]  # 100 included, allow
        + [UsageIn("jobs", 1, f"job-{i:03}") for i in range(25)]  # exactly the 25 included
        + [UsageIn("devices", 1, f"dev-{i:03}", member="abc"[i % 3]) for i in range(300)]
        + [UsageIn("peak", i % 60, f"peak-{i:03}") for i in range(275)]  # 50 included, notify
    )
    assert len(events) == metering.MAX_BATCH
    results = await record_batch(db, account, events, now=now)
    assert len(results) == metering.MAX_BATCH and not any(r.replayed for r in results)
    assert [await used(db, account, m) for m in ("calls", "jobs", "devices", "peak")] == [
        400,
        25,
        3,
        59,
    ]
    assert await _count(db, UsageEvent) == metering.MAX_BATCH
    by_key = {e.idempotency_key: r.body for e, r in zip(events, results, strict=True)}
    # each threshold fires once, on the event that crosses it; the overage flag once
    assert by_key["call-079"]["notices"] == [80] and by_key["call-099"]["notices"] == [100]
    assert by_key["call-100"]["overage_flagged"] is True
    assert by_key["peak-040"]["notices"] == [80] and by_key["peak-050"]["notices"] == [100]
    assert by_key["peak-051"]["overage_flagged"] is True
    assert sum(bool(b["notices"]) or b["overage_flagged"] for b in by_key.values()) == 6
    assert [b["counted"] for k, b in by_key.items() if k.startswith("dev-")].count(1) == 3
    assert by_key["call-399"]["used"] == 400 and by_key["job-024"]["remaining"] == 0
    actions = []
    async with db.transaction() as session:
        for row in await session.execute(select(AuditEvent).order_by(AuditEvent.seq)):
            actions.append((row[0].action, row[0].details.get("meter")))
    assert [a for a in actions if a[0].startswith("usage.")] == [
        ("usage.threshold", "calls"),
        ("usage.threshold", "calls"),
        ("usage.overage", "calls"),
        ("usage.threshold", "peak"),
        ("usage.threshold", "peak"),
        ("usage.overage", "peak"),
    ]
    assert await _count(db, UsageNotice) == 6
    # one more job is refused, naming it; the full batch replays unchanged
    with pytest.raises(QuotaExceeded):
        await record_batch(db, account, [UsageIn("jobs", 1, "job-025")], now=now)
    replay = await record_batch(db, account, events, now=now)
    assert all(r.replayed for r in replay)
    assert [r.body for r in replay] == [r.body for r in results]


async def test_a_full_batch_over_http(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    account, _, key = await metered_license(db, secrets)
    events = [
        {"meter": "calls", "quantity": 1, "idempotency_key": f"h{i}"}
        for i in range(metering.MAX_BATCH)
    ]
    body = orjson.dumps({"key": key, "events": events})
    assert len(body) <= 64 * 1024  # fits the default body limit
    response = await client.post(
        "/v1/usage/batch", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["count"] == metering.MAX_BATCH
    assert [r["used"] for r in answer["results"]][-1] == metering.MAX_BATCH
    assert await used(db, account, "calls") == metering.MAX_BATCH


async def test_the_first_failure_in_lock_order_is_the_one_reported(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    await record(db, account, "jobs", 2, "x")
    await record(db, account, "calls", 2, "y")
    # devices (unique, 3 included) come before jobs: the fourth device is refused first
    with pytest.raises(QuotaExceeded) as quota:
        await record_batch(
            db,
            account,
            [UsageIn("jobs", 1, "x")]
            + [UsageIn("devices", 1, f"d{i}", member=f"m{i}") for i in range(4)],
        )
    assert quota.value.details["index"] == 4
    # calls come before jobs: the changed calls body is reported, not the jobs overshoot
    with pytest.raises(IdempotencyConflict) as conflict:
        await record_batch(db, account, [UsageIn("jobs", 30, "j"), UsageIn("calls", 5, "y")])
    assert conflict.value.details["index"] == 1
    assert await used(db, account, "jobs") == 2 and await used(db, account, "devices") == 0


async def test_an_expired_key_in_a_batch_is_released_and_counted_anew(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    policy = metering.UsagePolicy(idempotency_window=timedelta(hours=1))
    now = utcnow()
    await record(db, account, "calls", 1, "old", policy=policy, now=now - timedelta(hours=2))
    live = await record(
        db, account, "calls", 1, "live", policy=policy, now=now - timedelta(minutes=10)
    )
    results = await record_batch(
        db,
        account,
        [UsageIn("calls", 5, "old"), UsageIn("calls", 1, "live")],
        policy=policy,
        now=now,
    )
    assert [r.replayed for r in results] == [False, True]
    assert results[1].body == live.body
    async with db.transaction() as session:  # the earlier events fall before the anchor
        total = (await session.execute(select(func.sum(UsageCounter.used)))).scalar_one()
    assert total == 7
    assert await _count(db, UsageEvent) == 3
    assert await _count(db, UsageEvent, UsageEvent.idempotency_key.is_(None)) == 1


async def test_a_retry_racing_its_uncommitted_first_send_waits_and_replays_it(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    async with db.transaction() as session:
        subject = await subjects.subject_for_account(session, account)
        first = await metering.record(session, SYSTEM, subject, UsageIn("calls", 3, "race"))
        retry = asyncio.create_task(record(db, account, "calls", 3, "race"))
        await asyncio.sleep(0.3)
        assert not retry.done()  # waiting for this transaction (row lock / BEGIN IMMEDIATE)
    second = await asyncio.wait_for(retry, timeout=30)
    assert second.replayed and second.body == first.body
    assert await used(db, account, "calls") == 3 and await _count(db, UsageEvent) == 1


async def test_in_transaction_retries_a_lost_key_claim_then_gives_up(db: Database) -> None:
    attempts = 0

    async def flaky(_session: object) -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConcurrentClaim("lost the race", field="idempotency_key")
        return "done"

    assert await metering.in_transaction(db, flaky) == "done" and attempts == 3

    async def always(_session: object) -> str:
        raise ConcurrentClaim("lost the race", field="idempotency_key")

    with pytest.raises(ConcurrentClaim):
        await metering.in_transaction(db, always, claim_attempts=2)
