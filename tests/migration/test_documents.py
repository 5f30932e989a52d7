"""A batch's snapshot and plan are written once, by the snapshot step, and the executor keeps
them for the batch's next phases (``executor.Documents``) instead of reading them back: the
cutover and verify phases do not select them, a kept copy whose snapshot hash is not the
row's is never used, and nothing is kept once the batch is done."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, select

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Migration
from keyshift.migration.executor import Executor
from keyshift.migration.state import differences
from keyshift.security.secrets_store import Secrets
from keyshift.states import MigrationState, Step
from tests.migration import helpers


@contextmanager
def statements(db: Database) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(args[2])

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)


def reads_documents(sql: str) -> bool:
    head = sql.split(" FROM ", 1)[0]
    return sql.startswith("SELECT") and "migrations.snapshot," in head + ","


async def locked_and_prepared(db: Database, secrets: Secrets, executor: Executor) -> list[str]:
    await helpers.publish(db)
    accounts = [(await helpers.rich_account(db, secrets))[0] for _ in range(3)]
    locked = await executor.request_many(
        SYSTEM, helpers.rules(), [(a, None) for a in accounts], through=Step.PREPARE
    )
    ids = [m.id for m in locked.values() if isinstance(m, Migration)]
    assert len(ids) == 3 and {m.state for m in locked.values()} == {MigrationState.PREPARED}
    return ids


async def completed_as_planned(db: Database, ids: list[str]) -> None:
    async with db.transaction() as session:
        query = select(Migration).where(Migration.id.in_(ids))
        rows = list((await session.execute(query)).scalars())
    assert len(rows) == len(ids)
    for row in rows:
        assert row.state == MigrationState.COMPLETED, row.error
        assert row.plan is not None
        actual = await helpers.state_of(db, row.account_id)
        assert differences(row.plan["expected"], actual) == []


async def test_the_next_phases_take_the_kept_documents_and_forget_them(
    db: Database, secrets: Secrets
) -> None:
    executor = Executor(db, secrets.signing)
    ids = await locked_and_prepared(db, secrets, executor)
    assert all(executor.documents.get(m) is not None for m in ids)

    with statements(db) as seen:
        await executor.run_batch(SYSTEM, ids, after=Step.PREPARE, outcome_only=True)

    assert not [sql for sql in seen if reads_documents(sql)]
    assert all(executor.documents.get(m) is None for m in ids)
    await completed_as_planned(db, ids)


async def test_documents_kept_for_another_snapshot_are_not_used(
    db: Database, secrets: Secrets
) -> None:
    executor = Executor(db, secrets.signing)
    ids = await locked_and_prepared(db, secrets, executor)
    for migration_id in ids:  # as if kept for a snapshot that is not the row's
        executor.documents.keep({migration_id: ("0" * 64, {}, {})}, {migration_id: True})

    with statements(db) as seen:
        await executor.run_batch(SYSTEM, ids, after=Step.PREPARE, outcome_only=True)

    assert [sql for sql in seen if reads_documents(sql)]  # read from the database instead
    await completed_as_planned(db, ids)


async def test_a_fresh_executor_reads_the_documents(db: Database, secrets: Secrets) -> None:
    """Another process (a worker taking over a lapsed lease) has nothing kept: it reads."""
    ids = await locked_and_prepared(db, secrets, Executor(db, secrets.signing))
    with statements(db) as seen:
        await Executor(db, secrets.signing).run_batch(SYSTEM, ids, outcome_only=True)
    assert [sql for sql in seen if reads_documents(sql)]
    await completed_as_planned(db, ids)
