"""A run rolled back and finalized as a whole, on both databases, a batch at a time: a
rollback returns every account to the state checksum it had before the run; an account whose
rollback is refused (its migration finalized by hand under the run) is quarantined with its
error while its neighbours are rolled back; a finalize finalizes every migration in batches,
and is idempotent and resumable."""

from __future__ import annotations

from sqlalchemy import func, select

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import DataObject, Migration, MigrationStep, RunAccount
from keyshift.migration.executor import Executor
from keyshift.migration.rollback import finalize, finalize_many
from keyshift.migration.state import state_hash
from keyshift.runs import service
from keyshift.runs.model import RunOptions
from keyshift.security.secrets_store import Secrets
from keyshift.simulation.checksum import state_checksum
from tests.migration import helpers
from tests.runs.helpers import CREATOR, approved_run, cohort, drive, run_row, states


async def _run_migrations(db: Database, run_id: str) -> dict[str, Migration]:
    async with db.transaction() as session:
        rows = await session.execute(select(Migration).where(Migration.run_id == run_id))
        return {row.account_id: row for row in rows.scalars()}


async def _steps(db: Database, step: str) -> dict[str, int]:
    async with db.transaction() as session:
        rows = await session.execute(
            select(MigrationStep.migration_id, func.count())
            .where(MigrationStep.step == step)
            .group_by(MigrationStep.migration_id)
        )
        return {migration_id: int(n) for migration_id, n in rows.all()}


async def test_a_run_rolled_back_in_batches_returns_to_its_checksum(
    db: Database, secrets: Secrets
) -> None:
    executor = Executor(db, secrets.signing)
    ids = await cohort(db, secrets, 5)
    before = await state_checksum(db, ids)
    run = await approved_run(db, options=RunOptions(batch_size=2))
    await service.start(db, CREATOR, run.id)
    await drive(executor, run.id)
    assert await state_checksum(db, ids) != before

    await service.rollback(db, CREATOR, run.id)
    worker = await drive(executor, run.id)

    assert (await run_row(db, run.id)).state == "rolled_back"
    assert await states(db, run.id) == {i: "rolled_back" for i in ids}
    assert worker.processed == 5
    assert await state_checksum(db, ids) == before
    migrations = await _run_migrations(db, run.id)
    assert {m.state for m in migrations.values()} == {"rolled_back"}
    assert await _steps(db, "rollback") == {m.id: 1 for m in migrations.values()}


async def test_an_account_whose_rollback_is_refused_is_quarantined_and_its_neighbours_roll_back(
    db: Database, secrets: Secrets
) -> None:
    executor = Executor(db, secrets.signing)
    ids = await cohort(db, secrets, 4)
    before = {a: state_hash(await helpers.state_of(db, a)) for a in ids}
    run = await approved_run(db)
    await service.start(db, CREATOR, run.id)
    await drive(executor, run.id)
    migrations = await _run_migrations(db, run.id)
    # Under the completed run, one account's migration is finalized by hand: its snapshot is
    # retired, and it can no longer be rolled back.
    stuck = ids[2]
    await finalize(executor, SYSTEM, migrations[stuck].id)
    finalized = state_hash(await helpers.state_of(db, stuck))

    await service.rollback(db, CREATOR, run.id)
    await drive(executor, run.id)

    assert (await run_row(db, run.id)).state == "rolled_back"
    assert await states(db, run.id) == {
        i: "quarantined" if i == stuck else "rolled_back" for i in ids
    }
    async with db.transaction() as session:
        error = (
            await session.execute(
                select(RunAccount.error).where(
                    RunAccount.run_id == run.id, RunAccount.account_id == stuck
                )
            )
        ).scalar_one()
    assert error is not None and "was finalized" in error and migrations[stuck].id in error
    for account_id in ids:
        now = state_hash(await helpers.state_of(db, account_id))
        assert now == (finalized if account_id == stuck else before[account_id])


async def test_a_run_is_finalized_in_batches_idempotently(db: Database, secrets: Secrets) -> None:
    executor = Executor(db, secrets.signing)
    ids = await cohort(db, secrets, 3)
    run = await approved_run(db)
    await service.start(db, CREATOR, run.id)
    await drive(executor, run.id)
    migrations = await _run_migrations(db, run.id)
    # One is finalized already (by hand, or by a finalize that stopped midway).
    first = migrations[ids[0]].id
    assert isinstance((await finalize_many(executor, SYSTEM, [first]))[first], Migration)

    async def many(migration_ids: list[str]) -> dict[str, object]:
        return dict(await finalize_many(executor, CREATOR, migration_ids))

    done = await service.finalize(db, CREATOR, run.id, many)

    assert done.state == "finalized"
    rows = await _run_migrations(db, run.id)
    assert {r.state for r in rows.values()} == {"finalized"}
    assert all(r.snapshot is None for r in rows.values())
    assert await _steps(db, "finalize") == {r.id: 1 for r in rows.values()}
    async with db.transaction() as session:
        superseded = (
            await session.execute(
                select(func.count()).where(
                    DataObject.account_id.in_(ids), DataObject.state == "superseded"
                )
            )
        ).scalar_one()
        released = (
            (
                await session.execute(
                    select(MigrationStep.details).where(MigrationStep.step == "finalize")
                )
            )
            .scalars()
            .all()
        )
    assert superseded == 0
    assert [d["objects_released"] for d in released] == [2, 2, 2]  # two projects archived each
