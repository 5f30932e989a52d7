"""Crash safety of a batch: a worker process is SIGKILLed inside each step's transaction
over a batch of accounts (every account's effects written, nothing committed) and at a step
boundary; once its lease has run out another worker resumes, and every account ends in the
state of an uninterrupted run — its plan's expected state, by hash — with one ledger row per
step and one cutover each."""

from __future__ import annotations

import signal

import pytest
from sqlalchemy import select, update

from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.db.tables import Migration, MigrationStep, RunAccount
from keyshift.db.types import utcnow
from keyshift.migration import repository
from keyshift.migration.executor import FAULT_ENV, Executor
from keyshift.migration.planner import STEPS
from keyshift.migration.state import differences, state_hash
from keyshift.runs import service
from keyshift.runs.model import RunOptions
from keyshift.security.secrets_store import Secrets
from keyshift.simulation.checksum import state_checksum
from tests.runs.helpers import CREATOR, approved_run, cohort, drive, run_row, states
from tests.support import cli_env, run_keyshift

POINTS = [f"inside:{step}" for step in STEPS] + ["after:cutover"]


@pytest.mark.parametrize("point", POINTS)
async def test_a_batch_killed_anywhere_resumes_to_the_uninterrupted_state(
    point: str, db: Database, secrets: Secrets, settings: Settings
) -> None:
    ids = await cohort(db, secrets, 3)
    run = await approved_run(db, options=RunOptions(batch_size=3))
    await service.start(db, CREATOR, run.id)
    env = {**cli_env(settings), FAULT_ENV: point}

    killed = run_keyshift(env, "worker", "--run", run.id, "--until-idle", "--poll", "0.1")

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert set((await states(db, run.id)).values()) == {"claimed"}
    async with db.transaction() as session:  # as if the dead worker's lease had run out
        await session.execute(
            update(RunAccount).where(RunAccount.run_id == run.id).values(lease_expires_at=utcnow())
        )
    await drive(Executor(db, secrets.signing), run.id)

    assert (await run_row(db, run.id)).state == "completed"
    assert await states(db, run.id) == {i: "migrated" for i in ids}
    for account_id in ids:
        async with db.transaction() as session:
            [row] = (
                (await session.execute(select(Migration).where(Migration.account_id == account_id)))
                .scalars()
                .all()
            )
            steps = (
                (
                    await session.execute(
                        select(MigrationStep.step)
                        .where(MigrationStep.migration_id == row.id)
                        .order_by(MigrationStep.seq)
                    )
                )
                .scalars()
                .all()
            )
            actual = await repository.read_state(session, account_id, utcnow())
        assert row.state == "completed", row.error
        assert list(steps) == list(STEPS)
        assert actual is not None and row.plan is not None
        assert differences(row.plan["expected"], actual) == []
        assert state_hash(actual) == state_hash(row.plan["expected"])


ROLLBACK_POINTS = ["before:rollback", "inside:rollback", "after:rollback"]


async def _run_migrations(db: Database, run_id: str) -> list[Migration]:
    async with db.transaction() as session:
        rows = await session.execute(select(Migration).where(Migration.run_id == run_id))
        return list(rows.scalars())


async def _ledger(db: Database, step: str) -> dict[str, list[MigrationStep]]:
    async with db.transaction() as session:
        rows = await session.execute(select(MigrationStep).where(MigrationStep.step == step))
        out: dict[str, list[MigrationStep]] = {}
        for row in rows.scalars():
            out.setdefault(row.migration_id, []).append(row)
        return out


@pytest.mark.parametrize("point", ROLLBACK_POINTS)
async def test_a_batched_rollback_killed_anywhere_resumes_to_the_uninterrupted_state(
    point: str, db: Database, secrets: Secrets, settings: Settings
) -> None:
    ids = await cohort(db, secrets, 3)
    before = await state_checksum(db, ids)
    run = await approved_run(db, options=RunOptions(batch_size=3))
    await service.start(db, CREATOR, run.id)
    executor = Executor(db, secrets.signing)
    await drive(executor, run.id)
    await service.rollback(db, CREATOR, run.id)
    env = {**cli_env(settings), FAULT_ENV: point}

    killed = run_keyshift(env, "worker", "--run", run.id, "--until-idle", "--poll", "0.1")

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert set((await states(db, run.id)).values()) == {"claimed"}
    # The batch's rollbacks are one transaction: all of them committed, or none.
    rolled = [m.state == "rolled_back" for m in await _run_migrations(db, run.id)]
    assert rolled == [point == "after:rollback"] * 3
    async with db.transaction() as session:  # as if the dead worker's lease had run out
        await session.execute(
            update(RunAccount).where(RunAccount.run_id == run.id).values(lease_expires_at=utcnow())
        )
    await drive(executor, run.id)

    assert (await run_row(db, run.id)).state == "rolled_back"
    assert await states(db, run.id) == {i: "rolled_back" for i in ids}
    # What an uninterrupted rollback leaves (tests/runs/test_rollback.py): the state before.
    assert await state_checksum(db, ids) == before
    ledger = await _ledger(db, "rollback")
    for migration in await _run_migrations(db, run.id):
        [row] = ledger[migration.id]
        assert migration.state == "rolled_back"
        assert row.details["exact"] is True and row.details["restored_hash"] == row.snapshot_hash


async def test_a_finalize_killed_inside_its_batch_finalizes_nothing_and_runs_again(
    db: Database, secrets: Secrets, settings: Settings
) -> None:
    await cohort(db, secrets, 3)
    run = await approved_run(db)
    await service.start(db, CREATOR, run.id)
    await drive(Executor(db, secrets.signing), run.id)

    killed = run_keyshift(
        {**cli_env(settings), FAULT_ENV: "inside:finalize"}, "runs", "finalize", run.id
    )

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (await run_row(db, run.id)).state == "completed"
    assert {m.state for m in await _run_migrations(db, run.id)} == {"completed"}
    again = run_keyshift(cli_env(settings), "runs", "finalize", run.id)
    assert again.returncode == 0, again.stderr
    assert (await run_row(db, run.id)).state == "finalized"
    migrations = await _run_migrations(db, run.id)
    assert {m.state for m in migrations} == {"finalized"}
    assert {m: len(rows) for m, rows in (await _ledger(db, "finalize")).items()} == {
        m.id: 1 for m in migrations
    }
