"""A run end to end on both databases: create over a cohort, report, approve, start, a
worker migrates every account; and the refusals of each transition."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from keyshift.db.engine import Database
from keyshift.db.tables import Migration, MigrationStep
from keyshift.migration.executor import Executor
from keyshift.runs import service
from keyshift.runs.errors import CohortInvalid, FourEyes, RunChanged
from keyshift.runs.model import Cohort, RunOptions, WrongRunState
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers
from tests.runs.helpers import APPROVER, CREATOR, approved_run, cohort, drive, run_row, states


@pytest.fixture
def executor(db: Database, secrets: Secrets) -> Executor:
    return Executor(db, secrets.signing)


async def test_a_run_moves_every_account_of_its_cohort_once(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    ids = await cohort(db, secrets, 4)
    run = await approved_run(db, options=RunOptions(batch_size=3))
    assert run.total == 4
    assert run.report is not None and run.report["outcomes"] == {"migrate": 4}
    await service.start(db, CREATOR, run.id)

    worker = await drive(executor, run.id)

    assert worker.processed == 4
    assert await states(db, run.id) == {i: "migrated" for i in ids}
    assert (await run_row(db, run.id)).state == "completed"
    async with db.transaction() as session:
        cutovers = (
            await session.execute(
                select(MigrationStep.account_id, func.count())
                .where(MigrationStep.step == "cutover")
                .group_by(MigrationStep.account_id)
            )
        ).all()
        owned = (
            await session.execute(select(func.count()).where(Migration.run_id == run.id))
        ).scalar_one()
    assert sorted(cutovers) == sorted((i, 1) for i in ids)
    assert owned == 4
    for account_id in ids:
        state = await helpers.state_of(db, account_id)
        assert state["subscription"]["plan"] == helpers.NEW


async def test_report_and_transitions_refuse_what_they_must(db: Database, secrets: Secrets) -> None:
    await cohort(db, secrets, 2)
    run = await service.create(db, CREATOR, helpers.rules(), Cohort(), RunOptions())
    with pytest.raises(WrongRunState):
        await service.approve(db, APPROVER, run.id)  # not reported yet
    with pytest.raises(WrongRunState):
        await service.start(db, CREATOR, run.id)  # not approved
    await service.report(db, CREATOR, run.id)
    with pytest.raises(FourEyes):
        await service.approve(db, CREATOR, run.id, four_eyes=True)
    await service.approve(db, APPROVER, run.id, four_eyes=True)
    with pytest.raises(WrongRunState):
        await service.pause(db, CREATOR, run.id)  # not running


async def test_a_cohort_that_selects_nothing_or_names_unknowns_is_refused(
    db: Database, secrets: Secrets
) -> None:
    await cohort(db, secrets, 1)
    with pytest.raises(CohortInvalid, match="unknown plan"):
        await service.create(db, CREATOR, helpers.rules(), Cohort(plans=["nope@1"]), RunOptions())
    with pytest.raises(CohortInvalid, match="unknown account id"):
        await service.create(db, CREATOR, helpers.rules(), Cohort(ids=["nobody"]), RunOptions())
    with pytest.raises(CohortInvalid, match="selects no account"):
        await service.create(
            db, CREATOR, helpers.rules(), Cohort(plans=[helpers.NEW]), RunOptions()
        )


async def test_an_account_is_in_one_active_run_at_a_time(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    from keyshift.errors import MigrationInProgress
    from keyshift.runs.errors import AccountsInAnotherRun

    ids = await cohort(db, secrets, 2)
    first = await service.create(db, CREATOR, helpers.rules(), Cohort(ids=ids[:1]), RunOptions())
    with pytest.raises(AccountsInAnotherRun, match=ids[0]):
        await service.create(db, CREATOR, helpers.rules(), Cohort(), RunOptions())
    # A one-off migration of an account the run holds is refused too.
    with pytest.raises(MigrationInProgress, match=first.id):
        await executor.apply(CREATOR, helpers.rules(), ids[0])
    await service.abort(db, CREATOR, first.id)
    second = await service.create(db, CREATOR, helpers.rules(), Cohort(), RunOptions())
    assert second.total == 2


async def test_start_is_refused_when_the_catalog_changed_since_approval(
    db: Database, secrets: Secrets
) -> None:
    from sqlalchemy import update

    from keyshift.db.tables import CatalogEntry

    await cohort(db, secrets, 1)
    run = await approved_run(db)
    async with db.transaction() as session:
        await session.execute(
            update(CatalogEntry)
            .where(CatalogEntry.key == "new-seat", CatalogEntry.kind == "plan")
            .values(content_hash="0" * 64)
        )
    with pytest.raises(RunChanged):
        await service.start(db, CREATOR, run.id)
    assert (await run_row(db, run.id)).state == "approved"
