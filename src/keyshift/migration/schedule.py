"""Changes that take effect later: a scheduled migration holds its account until its time;
``run_due`` executes what is due, re-planning first. If the outcome differs from the one
previewed when the change was requested (now over quota, now ineligible …), the change is
``held`` for review instead of applied silently; ``approve`` applies a held change as it
stands now (scope ``migrations:approve``), ``cancel`` withdraws it.

Policy for a second change while one is pending (``Executor.request(on_pending=…)``):
``refuse`` (the default: 409 naming the pending change), ``replace`` (the pending change is
cancelled and recorded as replaced), or ``queue`` (the new change waits, not holding the
account, and is taken up by ``run_due`` once the account is free).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import or_, select

from keyshift.audit import service as audit
from keyshift.context import Actor
from keyshift.db.tables import Migration
from keyshift.migration import notices, repository
from keyshift.migration.errors import MigrationNotFound, WrongState
from keyshift.migration.executor import Executor, preview, rules_by_hash
from keyshift.states import WAITING, MigrationState, Step

MAX_BATCH = 100


async def run_due(executor: Executor, actor: Actor, *, limit: int = MAX_BATCH) -> list[Migration]:
    """Execute every scheduled change whose time has come, and promote queued changes of
    accounts that are free. Returns the migrations touched, in their final state."""
    now = executor.clock()
    touched: list[str] = []
    async with executor.db.transaction() as session:
        due = (
            (
                await session.execute(
                    select(Migration.id)
                    .where(
                        Migration.state == MigrationState.SCHEDULED, Migration.effective_at <= now
                    )
                    .order_by(Migration.effective_at, Migration.id)
                    .limit(limit)
                )
            )
            .scalars()
            .all()
        )
        queued = (
            (
                await session.execute(
                    select(Migration.id)
                    .where(
                        Migration.state == MigrationState.QUEUED,
                        or_(Migration.effective_at.is_(None), Migration.effective_at <= now),
                    )
                    .order_by(Migration.created_at, Migration.id)
                    .limit(limit)
                )
            )
            .scalars()
            .all()
        )
    for migration_id in queued:
        if await _promote_queued(executor, actor, migration_id, now):
            touched.append(migration_id)
    for migration_id in [*due, *touched]:
        if await _start_due(executor, actor, migration_id, now):
            await executor.run(actor, migration_id)
        if migration_id not in touched:
            touched.append(migration_id)
    return [await executor.get(m) for m in touched]


async def _promote_queued(
    executor: Executor, actor: Actor, migration_id: str, now: datetime
) -> bool:
    """A queued change takes its account once nothing else holds it."""
    async with executor.db.transaction() as session:
        row = await repository.lock_migration(session, migration_id)
        if row is None or row.state != MigrationState.QUEUED:
            return False
        if await repository.active_migration(session, row.account_id) is not None:
            return False
        row.state, row.lock_account_id = MigrationState.SCHEDULED, row.account_id
        row.effective_at = row.effective_at or now
        await audit.record(
            session, actor, "migration.dequeue", "migration", row.id, account_id=row.account_id
        )
    return True


async def _start_due(executor: Executor, actor: Actor, migration_id: str, now: datetime) -> bool:
    """Re-plan a due change; start it if the outcome is the one previewed, else hold it."""
    async with executor.db.transaction() as session:
        row = await repository.lock_migration(session, migration_id)
        if row is None or row.state != MigrationState.SCHEDULED:
            return False
        rules = await rules_by_hash(session, row.rules_hash)
        plan, _ = await preview(session, rules, row.account_id, now=now, migration_id=row.id)
        previewed = row.outcome_digest or plan.outcome_digest()  # None: queued, planned now
        if not plan.can_apply or plan.outcome_digest() != previewed:
            row.state = MigrationState.HELD
            row.plan = plan.to_dict()
            row.error = (
                "held for review: " + "; ".join(plan.reasons)
                if not plan.can_apply
                else "held for review: the outcome differs from the one previewed"
            )
            await audit.record(
                session,
                actor,
                "migration.held",
                "migration",
                row.id,
                account_id=row.account_id,
                details={"reason": row.error, "risks": list(plan.risks)},
            )
            return False
        row.state = MigrationState.LOCKED
        await repository.write_step(session, row, Step.LOCK, details={"scheduled": True}, now=now)
        await notices.write(session, [notices.started(row, now)])
        await audit.record(
            session, actor, "migration.start", "migration", row.id, account_id=row.account_id
        )
    return True


async def approve(executor: Executor, actor: Actor, migration_id: str) -> Migration:
    """Apply a held change as it stands now (its new outcome becomes the approved one)."""
    now = executor.clock()
    async with executor.db.transaction() as session:
        row = await repository.lock_migration(session, migration_id)
        if row is None:
            raise MigrationNotFound(f"no migration {migration_id}", field="migration_id")
        if row.state != MigrationState.HELD:
            raise WrongState(f"migration {row.id} is {row.state}, not held", field="migration_id")
        rules = await rules_by_hash(session, row.rules_hash)
        plan, _ = await preview(session, rules, row.account_id, now=now, migration_id=row.id)
        row.outcome_digest, row.plan, row.error = plan.outcome_digest(), plan.to_dict(), None
        row.state = MigrationState.LOCKED
        await repository.write_step(
            session, row, Step.LOCK, details={"approved_by": actor.id}, now=now
        )
        await notices.write(session, [notices.started(row, now)])
        await audit.record(
            session,
            actor,
            "migration.approve",
            "migration",
            row.id,
            account_id=row.account_id,
            details={"risks": list(plan.risks)},
        )
    return await executor.run(actor, migration_id)


async def pending_for_account(executor: Executor, account_id: str) -> list[Migration]:
    """Changes not yet run: scheduled, held or queued."""
    async with executor.db.transaction() as session:
        rows = await session.execute(
            select(Migration)
            .where(
                Migration.account_id == account_id,
                Migration.state.in_(WAITING),
            )
            # The change holding the account first, then the queue in request order.
            .order_by(Migration.lock_account_id.is_(None), Migration.created_at, Migration.id)
        )
        return list(rows.scalars())
