"""A batch of rollbacks on both databases (``rollback_many``): one transaction for many
migrations, each account proved back to its snapshot's hash; a migration refused in the batch
(finalized by hand under it) gets its error and its neighbours are rolled back all the same;
two migrations of one account go in turns; and the statements a batch costs per account stay
a few, where one rollback at a time costs tens."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from sqlalchemy import event, func, select

from keyshift.audit import service as audit
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent, Migration, MigrationStep
from keyshift.migration import repository
from keyshift.migration.errors import MigrationFinalized, WrongState
from keyshift.migration.executor import Executor
from keyshift.migration.rollback import finalize, rollback_many
from keyshift.migration.state import state_hash
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers

T = TypeVar("T")
#: A second migration of an account the first moved to ``new-seat``.
_NEW_TO_FLOAT = helpers.mode_rules_text(helpers.NEW, helpers.NEW_FLOAT).replace(
    'c = "keep"', 'c = "keep"\nd = "keep"'
)


@pytest.fixture
def executor(db: Database, secrets: Secrets) -> Executor:
    return Executor(db, secrets.signing)


async def _accounts(db: Database, secrets: Secrets, n: int) -> list[str]:
    await helpers.publish(db)
    return [(await helpers.rich_account(db, secrets))[0] for _ in range(n)]


async def _migrate(
    executor: Executor, account_ids: list[str], text: str = helpers.RULES
) -> list[Migration]:
    """The accounts migrated together (a run's batch), in the order given."""
    locked = await executor.request_many(
        SYSTEM, helpers.rules(text), [(a, None) for a in account_ids]
    )
    ids = []
    for account_id in account_ids:
        row = locked[account_id]
        assert isinstance(row, Migration), row
        ids.append(row.id)
    done = await executor.run_batch(SYSTEM, ids)
    rows = [done[i] for i in ids]
    assert all(isinstance(r, Migration) and r.state == "completed" for r in rows), rows
    return rows  # type: ignore[return-value]


async def _statements(db: Database, work: Awaitable[T]) -> tuple[int, T]:
    """How many statements ``work`` sends to the database, and its result."""
    count = 0

    def seen(*_: Any) -> None:
        nonlocal count
        count += 1

    engine = db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        result = await work
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    return count, result


async def _ledger_rows(db: Database, migration_id: str, step: str) -> int:
    async with db.transaction() as session:
        return int(
            (
                await session.execute(
                    select(func.count()).where(
                        MigrationStep.migration_id == migration_id, MigrationStep.step == step
                    )
                )
            ).scalar_one()
        )


async def test_a_batch_rolls_back_together_and_a_refused_one_leaves_its_neighbours_be(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    ids = await _accounts(db, secrets, 4)
    before = {a: state_hash(await helpers.state_of(db, a)) for a in ids}
    rows = await _migrate(executor, ids)
    refused = rows[1]
    # Under the batch, one migration is finalized by hand: it can no longer be rolled back.
    await finalize(executor, SYSTEM, refused.id)
    after_finalize = state_hash(await helpers.state_of(db, refused.account_id))

    results = await rollback_many(executor, SYSTEM, [r.id for r in rows], reason="undo")

    error = results[refused.id]
    assert isinstance(error, MigrationFinalized) and refused.id in error.message
    assert state_hash(await helpers.state_of(db, refused.account_id)) == after_finalize
    assert await _ledger_rows(db, refused.id, "rollback") == 0
    for row in rows:
        if row is refused:
            continue
        rolled = results[row.id]
        assert isinstance(rolled, Migration) and rolled.state == "rolled_back"
        assert rolled.error == "undo" and rolled.lock_account_id is None
        assert state_hash(await helpers.state_of(db, row.account_id)) == before[row.account_id]
        async with db.transaction() as session:
            steps = await repository.steps_done(session, row.id)
        ledger, cutover = steps["rollback"], steps["cutover"]
        assert ledger.outcome == "done" and ledger.details["exact"] is True
        assert ledger.details["restored_hash"] == row.snapshot_hash == before[row.account_id]
        assert ledger.details["after_cutover"] is True
        assert ledger.details["activations_restored"]  # trim_to_cap took a machine of each
        moved = [(c["meter"], c["delta"]) for c in cutover.details["counters"] if c["delta"]]
        restored = ledger.details["counters_restored"]
        assert [(c["meter"], c["delta"]) for c in restored] == moved
        assert all(c["restored"] == c["at_rollback"] - c["delta"] for c in restored)
    # Rolled back in the order given: each one's moment after the one before.
    moments = [results[r.id].finished_at for r in rows if r is not refused]  # type: ignore[union-attr]
    assert moments == sorted(moments) and len(set(moments)) == 3
    async with db.transaction() as session:
        events = (
            (
                await session.execute(
                    select(AuditEvent.target_id).where(AuditEvent.action == "migration.rollback")
                )
            )
            .scalars()
            .all()
        )
        assert sorted(events) == sorted(r.id for r in rows if r is not refused)
        assert (await audit.verify(session)).ok

    # Again: the rolled-back ones are returned as they are, nothing more is written.
    again = await rollback_many(executor, SYSTEM, [r.id for r in rows])
    assert isinstance(again[refused.id], MigrationFinalized)
    for row in rows:
        if row is not refused:
            assert again[row.id].state == "rolled_back"  # type: ignore[union-attr]
            assert await _ledger_rows(db, row.id, "rollback") == 1


async def test_two_migrations_of_one_account_in_a_batch_go_newest_first_in_turns(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    [account_id] = await _accounts(db, secrets, 1)
    before = state_hash(await helpers.state_of(db, account_id))
    [first] = await _migrate(executor, [account_id])
    [second] = await _migrate(executor, [account_id], _NEW_TO_FLOAT)

    # The older one first: a later migration of the account stands, so it is refused; the
    # newer one, in the next turn, is rolled back.
    results = await rollback_many(executor, SYSTEM, [first.id, second.id])
    assert isinstance(results[first.id], WrongState)
    assert second.id in results[first.id].message  # type: ignore[union-attr]
    assert results[second.id].state == "rolled_back"  # type: ignore[union-attr]

    # Newest first, both in one call: the second sees the first rolled back.
    [third] = await _migrate(executor, [account_id], _NEW_TO_FLOAT)
    results = await rollback_many(executor, SYSTEM, [third.id, first.id])
    assert [results[i].state for i in (third.id, first.id)] == ["rolled_back"] * 2  # type: ignore[union-attr]
    assert state_hash(await helpers.state_of(db, account_id)) == before


async def test_a_batch_of_50_rollbacks_costs_a_few_statements_per_account(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    ids = await _accounts(db, secrets, 51)
    before = {a: state_hash(await helpers.state_of(db, a)) for a in ids}
    rows = await _migrate(executor, ids)

    one, _ = await _statements(db, rollback_many(executor, SYSTEM, [rows[0].id]))
    many, results = await _statements(db, rollback_many(executor, SYSTEM, [r.id for r in rows[1:]]))

    assert all(r.state == "rolled_back" for r in results.values())  # type: ignore[union-attr]
    for account_id in ids:
        assert state_hash(await helpers.state_of(db, account_id)) == before[account_id]
    per_account = many / 50
    assert per_account < 5, (many, one)
    assert per_account * 5 < one, (many, one)  # one at a time costs tens per account
