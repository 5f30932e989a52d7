"""Workers on both databases: accounts that plan differently are held, failing ones are
quarantined while the run goes on, a failure rate halts the run, a lapsed lease is taken
over, a paused run starts nothing, a run rolls back as a whole, and blue-green flips at its
cutoff."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from sqlalchemy import select, update

from keyshift.db.engine import Database
from keyshift.db.tables import Account, Migration, MigrationRun, RunAccount
from keyshift.db.types import utcnow
from keyshift.migration.executor import Executor
from keyshift.runs import service
from keyshift.runs.model import Cohort, Priority, RunOptions, Window
from keyshift.runs.worker import Worker
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers
from tests.runs.helpers import (
    CREATOR,
    approved_run,
    cohort,
    corrupt_an_archived_object,
    drive,
    run_row,
    states,
)


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def executor(db: Database, secrets: Secrets, clock: Callable[[], datetime]) -> Executor:
    return Executor(db, secrets.signing, clock=clock)


async def test_an_account_that_plans_differently_is_held_not_migrated(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    ids = await cohort(db, secrets, 3)
    run = await approved_run(db)
    async with db.transaction() as session:  # now ineligible: the rules move active accounts
        await session.execute(
            update(Account).where(Account.id == ids[1]).values(status="suspended")
        )
    await service.start(db, CREATOR, run.id)
    await drive(executor, run.id)

    got = await states(db, run.id)
    assert got == {ids[0]: "migrated", ids[1]: "held", ids[2]: "migrated"}
    async with db.transaction() as session:
        held = await session.get(RunAccount, (run.id, ids[1]))
        assert held is not None and "plans differently" in (held.error or "")
    assert (await helpers.state_of(db, ids[1]))["subscription"]["plan"] == helpers.OLD


async def test_a_failing_account_is_quarantined_and_the_run_goes_on(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    ids = await cohort(db, secrets, 3)
    await corrupt_an_archived_object(db, ids[0])
    run = await approved_run(db, options=RunOptions(max_attempts=2, failure_threshold=1))
    await service.start(db, CREATOR, run.id)
    await drive(executor, run.id)

    assert await states(db, run.id) == {
        ids[0]: "quarantined",
        ids[1]: "migrated",
        ids[2]: "migrated",
    }
    async with db.transaction() as session:
        row = await session.get(RunAccount, (run.id, ids[0]))
        assert row is not None and row.attempts == 2 and "hash" in (row.error or "")
    assert (await run_row(db, run.id)).state == "completed"


async def test_a_failure_rate_over_the_threshold_halts_the_run_until_resumed(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    ids = await cohort(db, secrets, 3)
    await corrupt_an_archived_object(db, ids[0])
    options = RunOptions(max_attempts=1, failure_threshold=0.2, min_attempts=1, batch_size=1)
    # ids[0] first in line, so the halt comes before the others are tried.
    run = await approved_run(
        db, options=options.model_copy(update={"priority": Priority(ids=[ids[0]])})
    )
    await service.start(db, CREATOR, run.id)
    await drive(executor, run.id)

    halted = await run_row(db, run.id)
    assert halted.state == "paused"
    assert "1 of 1 accounts failed" in (halted.halted_reason or "")
    assert sorted((await states(db, run.id)).values()) == ["pending", "pending", "quarantined"]

    await service.resume(db, CREATOR, run.id)
    # The threshold still stands: raise it as a person would after looking at the failure.
    async with db.transaction() as session:
        await session.execute(
            update(MigrationRun)
            .where(MigrationRun.id == run.id)
            .values(options={**halted.options, "failure_threshold": 1.0})
        )
    await drive(executor, run.id)
    assert (await run_row(db, run.id)).state == "completed"


async def test_held_and_skipped_accounts_are_not_failures_of_the_rate(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    """Held and skipped accounts carry their reason as an error; the failure rate counts only
    accounts whose last attempt failed (here 1 of 4, under a 50 % threshold)."""
    ids = await cohort(db, secrets, 4)
    await corrupt_an_archived_object(db, ids[0])
    options = RunOptions(max_attempts=1, failure_threshold=0.5, min_attempts=1)
    run = await approved_run(db, options=options)
    async with db.transaction() as session:  # planned differently now: held
        await session.execute(
            update(Account).where(Account.id.in_(ids[1:3])).values(status="suspended")
        )
    await service.start(db, CREATOR, run.id)
    await drive(executor, run.id)

    assert await states(db, run.id) == {
        ids[0]: "quarantined",
        ids[1]: "held",
        ids[2]: "held",
        ids[3]: "migrated",
    }
    assert (await run_row(db, run.id)).state == "completed"


async def test_a_lapsed_lease_is_taken_over_and_nothing_runs_twice(
    db: Database, secrets: Secrets, executor: Executor, clock: Clock
) -> None:
    ids = await cohort(db, secrets, 2)
    run = await approved_run(db, options=RunOptions(lease_seconds=30))
    await service.start(db, CREATOR, run.id)
    dead = Worker(executor, CREATOR, worker_id="dead")
    taken = await dead.claim(run_id=run.id)
    assert taken is not None and len(taken.accounts) == 2
    other = Worker(executor, CREATOR, worker_id="other")
    assert await other.claim(run_id=run.id) is None  # the lease still holds
    clock.offset = timedelta(seconds=31)
    await drive(executor, run.id, worker_id="other")
    assert await states(db, run.id) == {i: "migrated" for i in ids}
    # The dead worker comes back and tries to record its outcome: its claim is gone.
    await dead._settle(taken, ids[0], None, "late", None)
    assert (await states(db, run.id))[ids[0]] == "migrated"


async def test_a_live_worker_keeps_its_lease_while_a_slow_batch_is_worked(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    """A batch slower than its lease (here: held up by a row lock) stays with the worker
    working it: the lease is renewed while it works, so no other worker takes the accounts
    and migrates them beside it. Before, the lease was renewed only between groups, and a
    slow batch of a live worker was taken by every other worker in turn (found by the chaos
    test: a run on a loaded machine made no progress)."""
    if db.dialect != "postgresql":
        pytest.skip("a row lock holds the batch up; on SQLite it would hold every writer")
    ids = await cohort(db, secrets, 2)
    run = await approved_run(db, options=RunOptions(lease_seconds=5, batch_size=2))
    await service.start(db, CREATOR, run.id)
    async with db.transaction() as blocker:
        await blocker.execute(select(Account).where(Account.id == ids[0]).with_for_update())
        slow = asyncio.create_task(drive(executor, run.id, worker_id="slow"))
        deadline = asyncio.get_running_loop().time() + 30
        while set((await states(db, run.id)).values()) != {"claimed"}:
            assert asyncio.get_running_loop().time() < deadline, "the batch was never claimed"
            await asyncio.sleep(0.05)
        await asyncio.sleep(7)  # past the 5 s lease the batch was claimed with

        other = Worker(executor, CREATOR, worker_id="other")
        assert await other.claim(run_id=run.id) is None
        async with db.transaction() as session:
            leases = (
                await session.execute(
                    select(RunAccount.lease_owner, RunAccount.lease_expires_at).where(
                        RunAccount.run_id == run.id
                    )
                )
            ).all()
        assert [owner for owner, _ in leases] == ["slow", "slow"]
        assert all(until > utcnow() for _, until in leases)
    await asyncio.wait_for(slow, 60)
    assert await states(db, run.id) == {i: "migrated" for i in ids}


async def test_a_worker_resumes_a_migration_a_dead_worker_left_in_flight(
    db: Database, secrets: Secrets, executor: Executor, clock: Clock
) -> None:
    ids = await cohort(db, secrets, 1)
    run = await approved_run(db, options=RunOptions(lease_seconds=30))
    await service.start(db, CREATOR, run.id)
    dead = Worker(executor, CREATOR, worker_id="dead")
    assert await dead.claim(run_id=run.id) is not None
    # It got as far as the lock and the snapshot of the account's migration, then died.
    row = await executor.request(CREATOR, helpers.rules(), ids[0], run_id=run.id)
    from keyshift.states import Step

    await executor.run(CREATOR, row.id, until=Step.SNAPSHOT)
    clock.offset = timedelta(seconds=31)
    await drive(executor, run.id)
    async with db.transaction() as session:
        migrations = (
            (await session.execute(select(Migration).where(Migration.account_id == ids[0])))
            .scalars()
            .all()
        )
    assert [(m.id, m.state) for m in migrations] == [(row.id, "completed")]
    assert await states(db, run.id) == {ids[0]: "migrated"}


async def test_a_paused_run_or_one_outside_its_window_starts_nothing(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await cohort(db, secrets, 1)
    run = await approved_run(db)
    await service.start(db, CREATOR, run.id)
    await service.pause(db, CREATOR, run.id)
    assert await Worker(executor, CREATOR).claim(run_id=run.id) is None
    await service.resume(db, CREATOR, run.id)
    hour = datetime.now(UTC).hour
    closed = Window(start=f"{(hour + 2) % 24:02d}:00", end=f"{(hour + 3) % 24:02d}:00")
    async with db.transaction() as session:
        await session.execute(
            update(MigrationRun)
            .where(MigrationRun.id == run.id)
            .values(options={**run.options, "window": closed.model_dump(mode="json")})
        )
    assert await Worker(executor, CREATOR).claim(run_id=run.id) is None


async def test_priority_lanes_and_the_canary_decide_the_order(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    ids = await cohort(db, secrets, 4)
    async with db.transaction() as session:
        for rank, account_id in enumerate(ids):
            await session.execute(
                update(Account).where(Account.id == account_id).values(attributes={"mrr": rank})
            )
    options = RunOptions(batch_size=1, canary=1, priority=Priority(attribute="mrr"))
    run = await approved_run(db, options=options)
    async with db.transaction() as session:
        waves = dict(
            (
                await session.execute(
                    select(RunAccount.account_id, RunAccount.wave).where(
                        RunAccount.run_id == run.id
                    )
                )
            ).all()
        )
    canary = [a for a, w in waves.items() if w == 0]
    assert len(canary) == 1 and sorted(waves.values()) == [0, 1, 1, 1]
    await service.start(db, CREATOR, run.id)
    worker = Worker(executor, CREATOR)
    order = []
    for _ in range(4):
        claim = await worker.claim(run_id=run.id)
        assert claim is not None
        order.append(claim.accounts[0][0])
        await worker.work(claim)
    rest = sorted((a for a in ids if a not in canary), key=ids.index, reverse=True)
    assert order == canary + rest  # the canary, then the highest mrr first


async def test_the_rate_is_shared_through_the_run_row(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await cohort(db, secrets, 4)
    run = await approved_run(db, options=RunOptions(rate=2, batch_size=2))
    await service.start(db, CREATOR, run.id)
    first = await Worker(executor, CREATOR, worker_id="a").claim(run_id=run.id)
    second = await Worker(executor, CREATOR, worker_id="b").claim(run_id=run.id)
    assert first is not None and second is not None
    starts = [s for _, _, s in first.accounts + second.accounts]
    gaps = [(b - a).total_seconds() for a, b in pairwise(starts)]
    assert gaps == pytest.approx([0.5, 0.5, 0.5], abs=1e-3)


async def test_a_run_rolls_back_as_a_whole_newest_first(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    ids = await cohort(db, secrets, 3)
    before = {i: await helpers.state_of(db, i) for i in ids}
    run = await approved_run(db)
    await service.start(db, CREATOR, run.id)
    await drive(executor, run.id)
    await service.rollback(db, CREATOR, run.id)
    await service.rollback(db, CREATOR, run.id)  # again: no change, still rolling back
    await drive(executor, run.id)

    assert (await run_row(db, run.id)).state == "rolled_back"
    assert await states(db, run.id) == {i: "rolled_back" for i in ids}
    for account_id in ids:
        after = await helpers.state_of(db, account_id)
        assert after["subscription"] == before[account_id]["subscription"]
        assert after["objects"] == before[account_id]["objects"]
    async with db.transaction() as session:
        holds = (
            (
                await session.execute(
                    select(RunAccount.hold_account_id).where(RunAccount.run_id == run.id)
                )
            )
            .scalars()
            .all()
        )
        rolled = (
            (
                await session.execute(
                    select(Migration.account_id)
                    .where(Migration.run_id == run.id)
                    .order_by(Migration.finished_at)
                )
            )
            .scalars()
            .all()
        )
        # A batch cuts over in one transaction, at one moment: within it, the run's order.
        done_order = (
            (
                await session.execute(
                    select(Migration.account_id)
                    .join(
                        RunAccount,
                        (RunAccount.run_id == Migration.run_id)
                        & (RunAccount.account_id == Migration.account_id),
                    )
                    .where(Migration.run_id == run.id)
                    .order_by(Migration.cutover_at, RunAccount.position)
                )
            )
            .scalars()
            .all()
        )
    assert holds == [None, None, None]
    assert list(rolled) == list(reversed(done_order))  # newest first


async def test_blue_green_prepares_everyone_then_flips_at_the_cutoff(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    ids = await cohort(db, secrets, 2)
    run = await approved_run(db, options=RunOptions(strategy="blue_green"))
    await service.start(db, CREATOR, run.id)
    await drive(executor, run.id)

    assert (await run_row(db, run.id)).state == "ready"
    assert await states(db, run.id) == {i: "prepared" for i in ids}
    for account_id in ids:  # nothing an application reads has changed
        assert (await helpers.state_of(db, account_id))["subscription"]["plan"] == helpers.OLD

    cutoff = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
    await service.cutover(db, CREATOR, run.id, at=cutoff)
    await drive(executor, run.id)
    assert (await run_row(db, run.id)).state == "completed"
    async with db.transaction() as session:
        receipts = (
            (await session.execute(select(Migration.receipt).where(Migration.run_id == run.id)))
            .scalars()
            .all()
        )
    assert [r["body"]["effective_at"] for r in receipts] == ["2026-12-01T02:00:00Z"] * 2
    for account_id in ids:
        assert (await helpers.state_of(db, account_id))["subscription"]["plan"] == helpers.NEW


async def test_the_report_writes_no_account_state(db: Database, secrets: Secrets) -> None:
    from tests.runs.helpers import account_tables

    await cohort(db, secrets, 2)
    before = await account_tables(db)
    run = await service.create(db, CREATOR, helpers.rules(), Cohort(), RunOptions())
    await service.report(db, CREATOR, run.id)
    assert await account_tables(db) == before


async def test_a_stopped_worker_gives_its_unstarted_accounts_back(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    """Asked to stop before a batch starts (SIGTERM, a pause), a worker gives the batch back
    in one transaction: forward, the accounts are pending again; in a rollback, each goes
    back to where its migration left it (migrated), to be rolled back by the next worker."""
    ids = await cohort(db, secrets, 3)
    run = await approved_run(db, options=RunOptions(batch_size=3))
    await service.start(db, CREATOR, run.id)

    stopped = Worker(executor, CREATOR, poll_seconds=0.05)
    claim = await stopped.claim(run_id=run.id)
    assert claim is not None and len(claim.accounts) == 3
    stopped.stopping.set()
    await stopped.work(claim)
    assert await states(db, run.id) == {i: "pending" for i in ids}

    await drive(executor, run.id)
    assert await states(db, run.id) == {i: "migrated" for i in ids}
    await service.rollback(db, CREATOR, run.id)
    stopped = Worker(executor, CREATOR, poll_seconds=0.05)
    claim = await stopped.claim(run_id=run.id)
    assert claim is not None and len(claim.accounts) == 3
    assert await states(db, run.id) == {i: "claimed" for i in ids}
    stopped.stopping.set()
    await stopped.work(claim)
    assert await states(db, run.id) == {i: "migrated" for i in ids}

    await drive(executor, run.id)
    assert await states(db, run.id) == {i: "rolled_back" for i in ids}
