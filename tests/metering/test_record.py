"""Recording usage against both databases: idempotency, counters per aggregation, quotas,
notices, time windows, and that a refusal writes nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent, UsageCounter, UsageEvent, UsageUniqueMember
from keyshift.db.types import utcnow
from keyshift.errors import InvalidInput
from keyshift.metering import service as metering
from keyshift.metering import subjects
from keyshift.metering.errors import (
    IdempotencyConflict,
    QuotaExceeded,
    UnknownMeter,
    UsageOutOfWindow,
)
from keyshift.metering.periods import add_months
from keyshift.security.secrets_store import Secrets
from tests.metering.helpers import anchor_of, metered_license, record, used


async def _count(db: Database, table: type, *where: object) -> int:
    async with db.transaction() as session:
        return int(
            (
                await session.execute(select(func.count()).select_from(table).where(*where))
            ).scalar_one()
        )


async def _audits(db: Database, action: str) -> list[AuditEvent]:
    async with db.transaction() as session:
        rows = await session.execute(
            select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
        )
        return list(rows.scalars())


async def test_replay_with_same_body_returns_first_answer_and_counts_once(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    first = await record(db, account, "calls", 7, "evt-1")
    again = await record(db, account, "calls", 7, "evt-1")
    assert not first.replayed and again.replayed
    assert again.body == first.body
    assert await used(db, account, "calls") == 7
    assert await _count(db, UsageEvent) == 1


async def test_same_key_with_changed_body_is_a_conflict_and_writes_nothing(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    await record(db, account, "calls", 7, "evt-1")
    with pytest.raises(IdempotencyConflict) as caught:
        await record(db, account, "calls", 8, "evt-1")
    assert caught.value.field == "idempotency_key"
    with pytest.raises(IdempotencyConflict):
        await record(db, account, "jobs", 7, "evt-1")
    assert await used(db, account, "calls") == 7
    assert await used(db, account, "jobs") == 0
    assert await _count(db, UsageEvent) == 1


async def test_expired_idempotency_key_may_be_reused_and_history_is_kept(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    policy = metering.UsagePolicy(idempotency_window=timedelta(hours=1))
    now = utcnow()
    await record(db, account, "calls", 1, "evt-1", policy=policy, now=now)
    # inside the window: a replay
    assert (
        await record(
            db, account, "calls", 1, "evt-1", policy=policy, now=now + timedelta(minutes=59)
        )
    ).replayed
    # after it: a new event (and a different body is no longer a conflict)
    later = await record(
        db, account, "calls", 2, "evt-1", policy=policy, now=now + timedelta(minutes=61)
    )
    assert not later.replayed
    assert await used(db, account, "calls") == 3
    assert await _count(db, UsageEvent) == 2


async def test_bad_events_are_refused_before_anything_is_written(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    with pytest.raises(UnknownMeter) as unknown:
        await record(db, account, "nope", 1, "a")
    assert unknown.value.field == "meter"
    for quantity in (-1, metering.MAX_QUANTITY + 1):
        with pytest.raises(InvalidInput) as bad:
            await record(db, account, "calls", quantity, "b")
        assert bad.value.field == "quantity"
    with pytest.raises(InvalidInput) as no_member:
        await record(db, account, "devices", 1, "c")
    assert no_member.value.field == "member"
    with pytest.raises(InvalidInput) as stray_member:
        await record(db, account, "calls", 1, "d", member="m1")
    assert stray_member.value.field == "member"
    assert await _count(db, UsageEvent) == 0
    assert await _count(db, UsageCounter) == 0


async def test_timestamps_too_far_ahead_or_behind_are_refused(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    now = utcnow()
    with pytest.raises(UsageOutOfWindow) as future:
        await record(db, account, "calls", 1, "f", timestamp=now + timedelta(minutes=6), now=now)
    assert future.value.field == "timestamp"
    # within the skew allowance is fine
    await record(db, account, "calls", 1, "g", timestamp=now + timedelta(minutes=4), now=now)
    with pytest.raises(UsageOutOfWindow) as past:
        await record(db, account, "calls", 1, "h", timestamp=now - timedelta(days=400), now=now)
    assert "closed more than 48 h ago" in past.value.message
    assert await _count(db, UsageEvent) == 1


async def test_late_event_within_window_lands_in_its_own_previous_period(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    anchor = await anchor_of(db, account)
    second_period = add_months(anchor, 1)
    now = second_period + timedelta(hours=10)  # the first period closed 10 h ago
    late = await record(
        db, account, "calls", 5, "late", timestamp=anchor + timedelta(days=3), now=now
    )
    assert late.body["period"]["start"].startswith(anchor.strftime("%Y-%m-%dT%H:%M"))
    fresh = await record(db, account, "calls", 2, "fresh", now=now)
    assert fresh.body["used"] == 2  # the current period is untouched by the late event
    async with db.transaction() as session:
        rows = (
            (await session.execute(select(UsageCounter).order_by(UsageCounter.period_start)))
            .scalars()
            .all()
        )
    assert [(r.period_start, r.used) for r in rows] == [(anchor, 5), (second_period, 2)]
    too_late = second_period + timedelta(hours=49)
    with pytest.raises(UsageOutOfWindow):
        await record(
            db, account, "calls", 1, "too-late", timestamp=anchor + timedelta(days=3), now=too_late
        )


async def test_block_meter_refuses_past_quota_and_writes_nothing(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    await record(db, account, "jobs", 20, "j1")
    with pytest.raises(QuotaExceeded) as caught:
        await record(db, account, "jobs", 6, "j2")
    assert caught.value.details["remaining"] == 5
    exact = await record(db, account, "jobs", 5, "j3")
    assert exact.body["remaining"] == 0 and exact.body["used"] == 25
    with pytest.raises(QuotaExceeded):
        await record(db, account, "jobs", 1, "j4")
    # a refused key left nothing behind: it may be retried later (and is refused again now)
    with pytest.raises(QuotaExceeded):
        await record(db, account, "jobs", 6, "j2")
    assert await used(db, account, "jobs") == 25
    assert await _count(db, UsageEvent) == 2


async def test_unique_meter_counts_distinct_members_and_blocks_new_ones(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    for i, device in enumerate(["a", "b", "a", "c", "b"]):
        await record(db, account, "devices", 1, f"d{i}", member=device)
    assert await used(db, account, "devices") == 3
    with pytest.raises(QuotaExceeded):
        await record(db, account, "devices", 1, "d-new", member="d")
    # a device already counted this period is still welcome
    seen = await record(db, account, "devices", 1, "d-old", member="a")
    assert seen.body["counted"] == 0 and seen.body["used"] == 3
    assert await _count(db, UsageUniqueMember) == 3


async def test_max_meter_keeps_the_peak(db: Database, secrets: Secrets) -> None:
    account, _, _ = await metered_license(db, secrets)
    for i, value in enumerate([10, 30, 20]):
        await record(db, account, "peak", value, f"p{i}")
    assert await used(db, account, "peak") == 30


async def test_thresholds_fire_once_per_period_and_overage_is_flagged(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    anchor = await anchor_of(db, account)
    now = anchor + timedelta(days=1)
    fired = []
    for i, quantity in enumerate([50, 30, 10, 10, 5, 40]):  # 50, 80, 90, 100, 105, 145
        result = await record(db, account, "calls", quantity, f"c{i}", now=now)
        fired.append(result.body["notices"])
    assert fired == [[], [80], [], [100], [], []]
    thresholds = await _audits(db, "usage.threshold")
    assert [e.details["threshold"] for e in thresholds] == [80, 100]
    assert all(e.account_id == account for e in thresholds)
    overage = await _audits(db, "usage.overage")
    assert len(overage) == 1 and overage[0].details["used"] == 105
    # next period: they fire again, once
    next_now = add_months(anchor, 1) + timedelta(days=1)
    result = await record(db, account, "calls", 100, "next", now=next_now)
    assert result.body["notices"] == [80, 100]
    assert len(await _audits(db, "usage.threshold")) == 4


async def test_notify_meter_uses_default_thresholds_for_peaks(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    assert (await record(db, account, "peak", 45, "p1")).body["notices"] == [80]
    assert (await record(db, account, "peak", 60, "p2")).body["notices"] == [100]
    assert (await record(db, account, "peak", 70, "p3")).body["notices"] == []
    assert await used(db, account, "peak") == 70


async def test_batch_is_all_or_nothing_and_names_the_failing_event(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    events = [metering.UsageIn("jobs", 10, f"b{i}") for i in range(3)]  # 30 > 25

    async def batch(items: list[metering.UsageIn]) -> list[metering.Recorded]:
        async def work(session: object) -> list[metering.Recorded]:
            subject = await subjects.subject_for_account(session, account)  # type: ignore[arg-type]
            return await metering.record_batch(session, SYSTEM, subject, items)  # type: ignore[arg-type]

        return await metering.in_transaction(db, work)

    with pytest.raises(QuotaExceeded) as caught:
        await batch(events)
    assert caught.value.details["index"] == 2 and caught.value.field == "events.2.quantity"
    assert await _count(db, UsageEvent) == 0 and await used(db, account, "jobs") == 0
    with pytest.raises(UnknownMeter) as unknown:
        await batch([metering.UsageIn("calls", 1, "x"), metering.UsageIn("zzz", 1, "y")])
    assert unknown.value.field == "events.1.meter"
    results = await batch(
        [
            metering.UsageIn("calls", 1, "x"),
            metering.UsageIn("jobs", 2, "y"),
            metering.UsageIn("calls", 1, "x"),
        ]
    )
    assert [r.replayed for r in results] == [False, False, True]
    assert await used(db, account, "calls") == 1 and await used(db, account, "jobs") == 2
    with pytest.raises(InvalidInput):
        await batch([metering.UsageIn("calls", 1, f"k{i}") for i in range(metering.MAX_BATCH + 1)])


async def test_hybrid_plan_activations_and_metered_usage_both_work(
    db: Database, secrets: Secrets
) -> None:
    from keyshift.licensing import activations
    from tests.metering.helpers import HYBRID

    account, license_id, key = await metered_license(db, secrets, HYBRID)
    async with db.transaction() as session:
        await activations.activate(session, SYSTEM, secrets.keyring, key, "m1")
        await activations.activate(session, SYSTEM, secrets.keyring, key, "m2")
    async with db.transaction() as session:
        subject = await subjects.subject_for_key(session, secrets.keyring, key)
        result = await metering.record(
            session, subjects.key_actor(subject), subject, metering.UsageIn("exports", 10, "e1")
        )
    assert result.body["license_id"] == license_id and result.body["remaining"] == 0
    with pytest.raises(QuotaExceeded):
        await record(db, account, "exports", 1, "e2")
    # the edition's throttled feature is a meter too
    assert (await record(db, account, "sync", 100, "s1")).body["remaining"] == 0
    with pytest.raises(QuotaExceeded):
        await record(db, account, "sync", 1, "s2")


async def test_prune_releases_expired_keys_and_keeps_events(db: Database, secrets: Secrets) -> None:
    account, _, _ = await metered_license(db, secrets)
    policy = metering.UsagePolicy(idempotency_window=timedelta(hours=1))
    now = utcnow()
    await record(db, account, "calls", 1, "old", policy=policy, now=now - timedelta(hours=2))
    await record(db, account, "calls", 1, "new", policy=policy, now=now)
    async with db.transaction() as session:
        assert await metering.prune(session, SYSTEM, now=now) == 1
    assert await _count(db, UsageEvent) == 2
    assert await _count(db, UsageEvent, UsageEvent.idempotency_key.is_(None)) == 1
    assert len(await _audits(db, "usage.prune")) == 1
