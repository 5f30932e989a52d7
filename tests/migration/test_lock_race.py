"""Two lockers of overlapping batches race (``Executor.request_many``): the database's unique
``lock_account_id`` lets one migration hold each account. The loser's batch is redone account
by account: each account the winner holds gets ``MigrationInProgress``, the others are locked by
the loser — nothing is held twice and nothing is lost (PostgreSQL: SQLite has one writer)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Migration
from keyshift.errors import MigrationInProgress
from keyshift.migration.executor import Executor
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers


async def test_overlapping_batches_lock_each_account_once(db: Database, secrets: Secrets) -> None:
    if db.dialect != "postgresql":
        pytest.skip("concurrent writers are a PostgreSQL property")
    await helpers.publish(db)
    accounts = [(await helpers.rich_account(db, secrets))[0] for _ in range(6)]
    first, second = accounts[:4], accounts[2:]  # accounts[2:4] are in both
    executor = Executor(db, secrets.signing)
    a, b = await asyncio.gather(
        executor.request_many(SYSTEM, helpers.rules(), [(x, None) for x in first]),
        executor.request_many(SYSTEM, helpers.rules(), [(x, None) for x in second]),
    )
    for account_id in accounts[2:4]:  # exactly one of the two holds each shared account
        results = [a[account_id], b[account_id]]
        assert sum(isinstance(r, MigrationInProgress) for r in results) == 1, results
        assert sum(isinstance(r, Migration) for r in results) == 1, results
    for account_id in accounts[:2]:
        assert isinstance(a[account_id], Migration), a[account_id]
    for account_id in accounts[4:]:
        assert isinstance(b[account_id], Migration), b[account_id]
    async with db.transaction() as session:
        held = (
            await session.execute(
                select(Migration.lock_account_id, func.count())
                .where(Migration.lock_account_id.is_not(None))
                .group_by(Migration.lock_account_id)
            )
        ).all()
    assert sorted(account for account, _ in held) == sorted(accounts)
    assert {count for _, count in held} == {1}
