"""Scheduled changes: pending on the account until their time, re-planned at execution, held
for review when the outcome changed, and the policy for a second change meanwhile."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.errors import MigrationInProgress
from keyshift.migration.errors import WrongState
from keyshift.migration.executor import Executor
from keyshift.migration.rollback import cancel
from keyshift.migration.schedule import approve, pending_for_account, run_due
from keyshift.objects import service as data_objects
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers

AT = datetime.now(UTC) + timedelta(days=3)
SCHEDULED = (
    helpers.RULES.replace('version = "1"', 'version = "1-at"', 1)
    + f'\n[schedule]\neffective = "at"\nat = {AT.strftime("%Y-%m-%dT%H:%M:%SZ")}\n'
)
REVERSE = """
[rules]
key = "new-to-old"
version = "1"
name = "Back"
from = ["new-seat@1"]
to = "old-seat@1"

[features]
a = "keep"
b = "keep"
c = "keep"
d = "drop"

[quotas]
projects = "keep"
storage = "keep"

[counters]
exports = "carry"

[addons]
extra = "carry"
"""


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def executor(db: Database, secrets: Secrets, clock: Clock) -> Executor:
    return Executor(db, secrets.signing, clock=clock)


async def test_a_scheduled_change_is_pending_then_runs_when_due(
    db: Database, secrets: Secrets, executor: Executor, clock: Clock
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)

    row = await executor.apply(SYSTEM, helpers.rules(SCHEDULED), account_id)

    assert row.state == "scheduled" and row.effective_at is not None
    assert [m.id for m in await pending_for_account(executor, account_id)] == [row.id]
    assert await run_due(executor, SYSTEM) == []  # not yet
    clock.now = AT + timedelta(seconds=1)
    [done] = await run_due(executor, SYSTEM)
    assert done.id == row.id and done.state == "completed", done.error
    assert (await helpers.subscription(db, account_id)).plan_key == "new-seat"


async def test_a_second_change_is_refused_replaces_or_queues(
    db: Database, secrets: Secrets, executor: Executor, clock: Clock
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    first = await executor.request(SYSTEM, helpers.rules(SCHEDULED), account_id)

    with pytest.raises(MigrationInProgress):
        await executor.request(SYSTEM, helpers.rules(), account_id)
    second = await executor.request(
        SYSTEM, helpers.rules(SCHEDULED), account_id, on_pending="replace"
    )
    assert (await executor.get(first.id)).state == "cancelled"
    assert second.state == "scheduled"

    queued = await executor.request(SYSTEM, helpers.rules(REVERSE), account_id, on_pending="queue")
    assert queued.state == "queued" and queued.lock_account_id is None
    assert [m.id for m in await pending_for_account(executor, account_id)] == [second.id, queued.id]

    clock.now = AT + timedelta(seconds=1)
    rows = {r.id: r for r in await run_due(executor, SYSTEM)}
    assert rows[second.id].state == "completed", rows[second.id].error
    # The queued change runs once the account is free: back on the old plan.
    rows = {r.id: r for r in await run_due(executor, SYSTEM)}
    assert rows[queued.id].state == "completed", rows[queued.id].error
    assert (await helpers.subscription(db, account_id)).plan_key == "old-seat"


async def test_a_changed_outcome_is_held_for_review_then_approved(
    db: Database, secrets: Secrets, executor: Executor, clock: Clock
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets, objects=4)
    row = await executor.request(SYSTEM, helpers.rules(SCHEDULED), account_id)
    # Meanwhile the account grows: more projects would be archived than previewed.
    async with db.transaction() as session:
        await data_objects.put_object(
            session, SYSTEM, account_id, quota="projects", name="late", units=1, content=b"x"
        )

    clock.now = AT + timedelta(seconds=1)
    [held] = await run_due(executor, SYSTEM)

    assert held.state == "held"
    assert "differs" in (held.error or "")
    assert (await helpers.subscription(db, account_id)).plan_key == "old-seat"
    done = await approve(executor, SYSTEM, row.id)
    assert done.state == "completed", done.error
    assert len(done.plan["archive"]) == 2


async def test_a_scheduled_change_can_be_cancelled(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    row = await executor.request(SYSTEM, helpers.rules(SCHEDULED), account_id)

    cancelled = await cancel(executor, SYSTEM, row.id)

    assert cancelled.state == "cancelled" and cancelled.lock_account_id is None
    assert await pending_for_account(executor, account_id) == []
    with pytest.raises(WrongState):
        await approve(executor, SYSTEM, row.id)
    now = await executor.apply(SYSTEM, helpers.rules(), account_id)
    assert now.state == "completed"
