"""Runs over the small catalog of ``tests.migration.helpers``: a cohort of accounts on
``old-seat@1`` and the helpers that drive a run to its end with an in-process worker."""

from __future__ import annotations

from sqlalchemy import select, update

from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.db.tables import DataObject, MigrationRun, RunAccount
from keyshift.migration.executor import Executor
from keyshift.migration.rules import MigrationRules
from keyshift.runs import service
from keyshift.runs.model import Cohort, RunOptions
from keyshift.runs.worker import Worker
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers

CREATOR = Actor(id="creator", scopes=frozenset({"admin"}))
APPROVER = Actor(id="approver", scopes=frozenset({"admin"}))


async def corrupt_an_archived_object(db: Database, account_id: str) -> None:
    """project-0 is archived by the rules; a wrong hash makes its copy fail verification in
    prepare, every time: a real, persistent failure."""
    async with db.transaction() as session:
        await session.execute(
            update(DataObject)
            .where(DataObject.account_id == account_id, DataObject.name == "project-0")
            .values(content_hash="f" * 64)
        )


async def cohort(db: Database, secrets: Secrets, n: int, **kwargs: object) -> list[str]:
    await helpers.publish(db)
    ids = []
    for _ in range(n):
        account_id, _ = await helpers.rich_account(db, secrets, **kwargs)  # type: ignore[arg-type]
        ids.append(account_id)
    return ids


async def approved_run(
    db: Database,
    rules: MigrationRules | None = None,
    cohort: Cohort | None = None,
    options: RunOptions | None = None,
) -> MigrationRun:
    run = await service.create(
        db, CREATOR, rules or helpers.rules(), cohort or Cohort(), options or RunOptions()
    )
    await service.report(db, CREATOR, run.id)
    return await service.approve(db, APPROVER, run.id)


async def drive(executor: Executor, run_id: str, **worker: object) -> Worker:
    """One worker in this process until the run stops being claimable."""
    w = Worker(executor, CREATOR, poll_seconds=0.05, **worker)  # type: ignore[arg-type]
    await w.run(run_id=run_id, until_idle=True)
    return w


async def states(db: Database, run_id: str) -> dict[str, str]:
    async with db.transaction() as session:
        rows = await session.execute(
            select(RunAccount.account_id, RunAccount.state).where(RunAccount.run_id == run_id)
        )
        return {a: s for a, s in rows.all()}


async def run_row(db: Database, run_id: str) -> MigrationRun:
    async with db.transaction() as session:
        return await service.get(session, run_id)


ACCOUNT_TABLES = (
    "accounts",
    "subscriptions",
    "licenses",
    "activations",
    "usage_counters",
    "data_objects",
    "migrations",
    "migration_ledger",
)


async def account_tables(db: Database) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table that holds account state, sorted: equal before and after
    means nothing was written."""
    from sqlalchemy import text

    out = {}
    async with db.transaction() as session:
        for table in ACCOUNT_TABLES:
            rows = (await session.execute(text(f"SELECT * FROM {table}"))).all()
            out[table] = sorted((tuple(r) for r in rows), key=repr)
    return out
