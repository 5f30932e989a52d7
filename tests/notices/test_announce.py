"""A run announced to its customers: a `scheduled` notice per account the dry run migrates,
with the date and what changes for it, sent N days before; a grace period's end announced
ahead of it; what no longer holds (an aborted run, a rolled-back migration) cancelled."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event

from keyshift.audit import service as audit
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.errors import InvalidInput
from keyshift.migration.executor import Executor
from keyshift.migration.rollback import cancel, rollback
from keyshift.migration.schedule import run_due
from keyshift.notices.delivery import Deliverer
from keyshift.notices.kinds import (
    GRACE_NOTICE_LEAD,
    SCHEDULE_NOTICE_LEAD,
    NoticeKind,
    NoticeState,
)
from keyshift.runs import service as runs
from keyshift.runs.announce import announce
from keyshift.runs.model import RunOptions, WrongRunState
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers as migration
from tests.notices import helpers
from tests.notices.receiver import always, receiving
from tests.runs import helpers as run_helpers


async def test_a_run_announced_for_a_date_tells_each_account_what_changes_n_days_before(
    db: Database, secrets: Secrets
) -> None:
    ids = await run_helpers.cohort(db, secrets, 3)
    run = await run_helpers.approved_run(db)
    now = datetime.now(UTC)
    on = now + timedelta(days=10)

    done = await announce(db, SYSTEM, run.id, on, lead_days=7)

    assert done.notices == 3 and done.send_at == on - timedelta(days=7)
    written = await helpers.notices(db)
    assert sorted(n.account_id for n in written) == sorted(ids)
    assert {n.kind for n in written} == {NoticeKind.SCHEDULED}
    changes = written[0].payload["changes"]
    assert changes[0] == "your plan moves from old-seat@1 to new-seat@1"
    # projects: 5 used, 3 allowed on the new plan, archived by the rules.
    assert any(c.startswith("projects: you use 5, the new plan allows 3") for c in changes)
    # The same date again writes nothing twice.
    assert (await announce(db, SYSTEM, run.id, on, lead_days=7)).notices == 3
    assert len(await helpers.notices(db)) == 3

    with receiving(always()) as receiver:
        secret = await helpers.endpoint(db, secrets, receiver.url)
        # Not yet: they go out three days from now.
        assert (await helpers.deliverer(db, secrets).deliver_due()).claimed == 0
        later = Deliverer(
            db, secrets.keyring, helpers.FAST, clock=lambda: now + timedelta(days=3, seconds=1)
        )
        assert (await later.deliver_due()).delivered == 3
        bodies = receiver.verified_at(secret, now + timedelta(days=3, seconds=1))
    assert {b["type"] for b in bodies} == {"migration.scheduled"}
    assert all(b["data"]["date"] == on.isoformat().replace("+00:00", "Z") for b in bodies)
    assert all("What changes for you: your plan moves" in b["data"]["message"] for b in bodies)


async def test_a_new_date_replaces_the_unsent_notices_and_an_abort_cancels_them(
    db: Database, secrets: Secrets
) -> None:
    await run_helpers.cohort(db, secrets, 2)
    run = await run_helpers.approved_run(db)
    first = datetime.now(UTC) + timedelta(days=10)
    await announce(db, SYSTEM, run.id, first, lead_days=7)
    await announce(db, SYSTEM, run.id, first + timedelta(days=1), lead_days=7)
    states = sorted(n.state for n in await helpers.notices(db))
    assert states == [NoticeState.CANCELLED] * 2 + [NoticeState.PENDING] * 2

    await runs.abort(db, SYSTEM, run.id)
    assert {n.state for n in await helpers.notices(db)} == {NoticeState.CANCELLED}


async def test_an_announcement_is_refused_for_the_past_or_a_running_run(
    db: Database, secrets: Secrets
) -> None:
    await run_helpers.cohort(db, secrets, 1)
    run = await run_helpers.approved_run(db)
    with pytest.raises(InvalidInput) as past:
        await announce(db, SYSTEM, run.id, datetime.now(UTC) - timedelta(days=1), lead_days=7)
    assert past.value.field == "on"
    await runs.start(db, SYSTEM, run.id)
    with pytest.raises(WrongRunState):
        await announce(db, SYSTEM, run.id, datetime.now(UTC) + timedelta(days=9), lead_days=7)
    assert await helpers.notices(db) == []
    async with db.transaction() as session:
        refused = [
            e.details["field"]
            for e in await audit.list_events(session, limit=1000)
            if e.action == "run.announce.refused"
        ]
    assert refused == ["on", "state"]


async def test_a_grace_period_is_announced_before_it_ends_and_cancelled_by_a_rollback(
    db: Database, secrets: Secrets
) -> None:
    await migration.publish(db)
    account_id, _ = await migration.rich_account(db, secrets)
    rules = migration.rules(
        **{
            'projects = { on_conflict = "archive" }': (
                'projects = { on_conflict = "grace", grace_days = 30 }'
            ),
            'version = "1"': 'version = "grace"',
        }
    )
    executor = Executor(db, secrets.signing)
    row = await executor.apply(SYSTEM, rules, account_id)
    [grace] = [n for n in await helpers.notices(db) if n.kind == NoticeKind.GRACE_ENDING]
    until = datetime.fromisoformat(grace.payload["date"].replace("Z", "+00:00"))
    # Planned when the migration was planned, moments before its cutover.
    assert abs(until - row.cutover_at - timedelta(days=30)) < timedelta(minutes=1)  # type: ignore[operator]
    assert grace.next_attempt_at == until - GRACE_NOTICE_LEAD

    await rollback(executor, SYSTEM, row.id)
    kinds = {n.kind: n.state for n in await helpers.notices(db)}
    assert kinds[NoticeKind.GRACE_ENDING] == NoticeState.CANCELLED
    assert kinds[NoticeKind.ROLLED_BACK] == NoticeState.PENDING


async def test_a_one_off_scheduled_change_is_announced_then_started_when_due_or_cancelled(
    db: Database, secrets: Secrets
) -> None:
    await migration.publish(db)
    account_id, _ = await migration.rich_account(db, secrets)
    at = (datetime.now(UTC) + timedelta(days=10)).replace(microsecond=0)
    text = migration.RULES.replace('version = "1"', 'version = "1-at"', 1) + (
        f'\n[schedule]\neffective = "at"\nat = {at.strftime("%Y-%m-%dT%H:%M:%SZ")}\n'
    )
    now = [datetime.now(UTC)]
    executor = Executor(db, secrets.signing, clock=lambda: now[0])
    row = await executor.apply(SYSTEM, migration.rules(text), account_id)
    [announced] = await helpers.notices(db, account_id)
    assert (announced.kind, announced.next_attempt_at) == (
        NoticeKind.SCHEDULED,
        at - SCHEDULE_NOTICE_LEAD,
    )
    assert announced.payload["changes"][0] == "your plan moves from old-seat@1 to new-seat@1"

    now[0] = at + timedelta(seconds=1)
    [done] = await run_due(executor, SYSTEM)
    assert done.id == row.id
    kinds = sorted(n.kind for n in await helpers.notices(db, account_id))
    assert kinds == sorted([NoticeKind.SCHEDULED, NoticeKind.STARTED, NoticeKind.COMPLETED])

    # Another account's, cancelled before it runs: its unsent announcement is cancelled too.
    other, _ = await migration.rich_account(db, secrets)
    now[0] = datetime.now(UTC)
    second = await executor.apply(SYSTEM, migration.rules(text), other)
    await cancel(executor, SYSTEM, second.id)
    [withdrawn] = await helpers.notices(db, other)
    assert (withdrawn.kind, withdrawn.state) == (NoticeKind.SCHEDULED, NoticeState.CANCELLED)


async def test_a_runs_batches_write_their_notices_in_one_insert_per_step(
    db: Database, secrets: Secrets
) -> None:
    """The executor's hot path: a batch's notices go in one statement per batch step (the
    lock's `started`, the receipt's `completed`), not one per account."""
    ids = await run_helpers.cohort(db, secrets, 6)
    run = await run_helpers.approved_run(db, options=RunOptions(batch_size=6))
    await runs.start(db, SYSTEM, run.id)
    inserts: list[int] = []

    def count(_conn: object, _cursor: object, statement: str, params: object, *_: object) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO NOTICES"):
            inserts.append(len(params) if isinstance(params, list) else 1)

    engine = db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        await run_helpers.drive(Executor(db, secrets.signing), run.id)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    written = await helpers.notices(db)
    assert sorted((n.account_id, n.kind) for n in written) == sorted(
        (a, k) for a in ids for k in (NoticeKind.STARTED, NoticeKind.COMPLETED)
    )
    assert {n.run_id for n in written} == {run.id}
    assert len(inserts) == 2, inserts  # one per step, each carrying the whole batch
