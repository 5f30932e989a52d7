"""Rollback, cancel and finalize, each for a batch of migrations in one transaction (one
migration is a batch of one): which migrations may go, their rows, ledger rows and audit
events. The restore itself and its proof by hash are ``keyshift.migration.restore``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from keyshift.audit import service as audit
from keyshift.context import Actor
from keyshift.db import changes
from keyshift.db.engine import Database
from keyshift.db.tables import DataObject, Migration
from keyshift.errors import KeyshiftError
from keyshift.migration import notices, repository
from keyshift.migration.batching import fault_point, isolated
from keyshift.migration.errors import (
    MigrationFinalized,
    MigrationNotFound,
    NothingToRollBack,
    WrongState,
)
from keyshift.migration.restore import prove_many, restore_many
from keyshift.observability import tracing
from keyshift.states import REVERSIBLE, SETTLED, WAITING, MigrationState, Step, StepOutcome
from keyshift.validation import cache as license_cache


class Engine(Protocol):
    """What rollback, cancel and finalize need of the executor that drives a migration. A
    protocol, so the executor can call rollback (a failed verification) without the two
    modules importing each other."""

    @property
    def db(self) -> Database: ...

    @property
    def cache(self) -> license_cache.LicenseStateCache | None: ...

    @property
    def clock(self) -> Callable[[], datetime]: ...


async def latest_for_account(session: AsyncSession, account_id: str) -> Migration:
    """The account's most recent migration that could be rolled back."""
    for row in await repository.latest_migrations(session, account_id):
        if row.state in REVERSIBLE or row.state in (
            MigrationState.ROLLED_BACK,
            MigrationState.FINALIZED,
        ):
            return row
    raise NothingToRollBack(
        f"account {account_id} has no migration to roll back", field="account_id"
    )


async def rollback(
    executor: Engine, actor: Actor, migration_id: str, *, reason: str | None = None
) -> Migration:
    """Restore the account to its snapshot (``rollback_many`` of one). Idempotent: a
    rolled-back migration is returned as it is. Refused after finalize, and while a later
    migration of the account stands."""
    return _one((await rollback_many(executor, actor, [migration_id], reason=reason))[migration_id])


@tracing.traced_rollback
async def rollback_many(
    executor: Engine, actor: Actor, migration_ids: Sequence[str], *, reason: str | None = None
) -> dict[str, Migration | KeyshiftError]:
    """Restore many migrations' accounts to their snapshots in ONE transaction, in the order
    given (a run gives them newest first), each proved by hash. The migrations and what their
    accounts' restores change (subscriptions, licenses, machines, counters) are locked and read
    in one statement per table, in key order; the restores are written together; the ledger
    rows, audit events and cache announcements of all of them at the end. A migration that is
    refused (finalized, not run yet, a later migration of its account stands …) gets its error
    having written nothing; one whose restore fails while it is written is isolated from its
    neighbours as a forward step's account is (``batching.isolated``). Idempotent; a crash
    anywhere (``before:``, ``inside:``, ``after:rollback``) leaves it to be called again."""
    ids = list(dict.fromkeys(migration_ids))
    if not ids:
        return {}
    fault_point("before:rollback")

    async def work(
        session: AsyncSession, keys: Sequence[str]
    ) -> dict[str, Migration | KeyshiftError]:
        return await _roll_back_in(executor, session, actor, keys, reason)

    out = await isolated(executor.db, ids, work, fault="inside:rollback")
    fault_point("after:rollback")
    return out


async def _roll_back_in(
    executor: Engine,
    session: AsyncSession,
    actor: Actor,
    migration_ids: Sequence[str],
    reason: str | None,
) -> dict[str, Migration | KeyshiftError]:
    """``rollback_many``'s work in the caller's transaction. Two migrations of one account go
    in turns, in the order given: the second sees the first rolled back."""
    rows = await repository.lock_migrations(session, migration_ids)
    tracing.note_accounts(rows.values())
    out: dict[str, Migration | KeyshiftError] = {}
    todo: list[Migration] = []
    for migration_id in migration_ids:
        row = rows.get(migration_id)
        if row is None:
            out[migration_id] = _not_found(migration_id)
        elif row.state == MigrationState.ROLLED_BACK:
            out[migration_id] = row
        elif (refused := _refusal(row)) is not None:
            out[migration_id] = refused
        else:
            todo.append(row)
    while todo:
        turn: list[Migration] = []
        later: list[Migration] = []
        accounts: set[str] = set()
        for row in todo:
            (later if row.account_id in accounts else turn).append(row)
            accounts.add(row.account_id)
        out |= await _roll_back_turn(executor, session, actor, turn, reason)
        todo = later
    return out


def _refusal(row: Migration) -> KeyshiftError | None:
    """Why the migration cannot be rolled back, from its state alone (None: it can)."""
    if row.state == MigrationState.FINALIZED:
        return MigrationFinalized(
            f"migration {row.id} was finalized: its snapshot is retired", field="migration_id"
        )
    if row.state in WAITING:
        return WrongState(
            f"migration {row.id} has not run ({row.state}); cancel it instead",
            field="migration_id",
        )
    if row.state not in REVERSIBLE:
        return NothingToRollBack(
            f"migration {row.id} changed nothing ({row.state})", field="migration_id"
        )
    return None


async def _roll_back_turn(
    executor: Engine,
    session: AsyncSession,
    actor: Actor,
    rows: list[Migration],
    reason: str | None,
) -> dict[str, Migration | KeyshiftError]:
    """Roll back migrations of distinct accounts: refuse those a later migration of the
    account stands after, restore the others, prove each by hash, and write their ledger
    rows and audit events."""
    out: dict[str, Migration | KeyshiftError] = {}
    standing = await repository.unsettled_migrations(
        session, [row.account_id for row in rows], SETTLED
    )
    going: list[Migration] = []
    for row in rows:
        later = [
            other
            for other, created_at in standing.get(row.account_id, [])
            if created_at > row.created_at and other != row.id
        ]
        if later:
            out[row.id] = WrongState(
                f"migration {later[0]} came after this one; roll it back first",
                field="migration_id",
            )
        else:
            going.append(row)
    if not going:
        return out
    ids = [row.id for row in going]
    done, cutovers = await repository.ledger_with(session, ids, Step.CUTOVER)
    # One moment each, in the order given: a batch commits at once, but its rows still show
    # the order it was rolled back in (``finished_at``; a run's newest first).
    now = dict(zip(ids, _moments(executor.clock, len(ids)), strict=True))
    cut = {
        row.id: cutovers[row.id][1]
        for row in going
        if row.id in cutovers and cutovers[row.id][0] == StepOutcome.DONE
    }
    details: dict[str, dict[str, Any]] = {
        row.id: {"reason": reason, "after_cutover": row.id in cut} for row in going
    }
    with session.no_autoflush:
        restored = await restore_many(session, [r for r in going if r.id in cut], cut, now)
    for migration_id, restore in restored.items():
        details[migration_id].update(restore)
    if len(cut) < len(going):
        await session.execute(
            delete(DataObject)
            .where(
                DataObject.migration_id.in_([i for i in ids if i not in cut]),
                DataObject.state == "staged",
            )
            .execution_options(synchronize_session=False)
        )
    await session.flush()
    await changes.announce_accounts(
        session,
        [row.account_id for row in going if row.id in cut],
        to=executor.cache.apply if executor.cache is not None else None,
    )
    proved = await prove_many(session, [row for row in going if row.snapshot is not None], now)
    ledger = []
    for row in going:
        details[row.id].update(proved.get(row.id, {}))
        row.state, row.lock_account_id = MigrationState.ROLLED_BACK, None
        row.finished_at = now[row.id]
        if reason and not row.error:
            row.error = reason
        ledger.append(
            {
                "migration_id": row.id,
                "step": Step.ROLLBACK,
                "account_id": row.account_id,
                "seq": len(done[row.id]) + 1,
                "outcome": StepOutcome.DONE
                if details[row.id].get("exact", True)
                else StepOutcome.INEXACT,
                "snapshot_hash": row.snapshot_hash,
                "details": details[row.id],
                "at": now[row.id],
            }
        )
        await audit.record(
            session,
            actor,
            "migration.rollback",
            "migration",
            row.id,
            account_id=row.account_id,
            details={
                "reason": reason,
                "snapshot_hash": row.snapshot_hash,
                "restored_hash": details[row.id].get("restored_hash"),
                "exact": details[row.id].get("exact"),
                "activations_converted_back": details[row.id].get("activations_converted_back", []),
            },
        )
        out[row.id] = row
    await repository.insert_steps(session, ledger)
    await notices.rolled_back(session, going, now, reason)
    return out


def _moments(clock: Callable[[], datetime], count: int) -> list[datetime]:
    """``count`` moments from the clock, each after the one before (by a microsecond at
    least: the clock may not have moved between two reads)."""
    out: list[datetime] = []
    for _ in range(count):
        moment = clock()
        if out and moment <= out[-1]:
            moment = out[-1] + timedelta(microseconds=1)
        out.append(moment)
    return out


async def cancel(executor: Engine, actor: Actor, migration_id: str) -> Migration:
    """Withdraw a scheduled, held or queued change before it runs (``cancel_many`` of one)."""
    return _one((await cancel_many(executor, actor, [migration_id]))[migration_id])


async def cancel_many(
    executor: Engine, actor: Actor, migration_ids: Sequence[str]
) -> dict[str, Migration | KeyshiftError]:
    """Withdraw many changes that have not run, in ONE transaction (their rows updated
    together, their audit events appended together). Idempotent: a cancelled one is returned
    as it is; one that has run gets its error, having written nothing."""

    async def work(
        session: AsyncSession, keys: Sequence[str]
    ) -> dict[str, Migration | KeyshiftError]:
        now = executor.clock()
        rows = await repository.lock_migrations(session, keys, without=(Migration.snapshot,))
        out: dict[str, Migration | KeyshiftError] = {}
        for migration_id in keys:
            row = rows.get(migration_id)
            if row is None:
                out[migration_id] = _not_found(migration_id)
            elif row.state == MigrationState.CANCELLED:
                out[migration_id] = row
            elif row.state not in WAITING:
                out[migration_id] = WrongState(
                    f"migration {row.id} is {row.state}; only a change that has not run can be"
                    " cancelled (roll back one that has)",
                    field="migration_id",
                )
            else:
                row.state, row.lock_account_id = MigrationState.CANCELLED, None
                row.finished_at = now
                await notices.cancelled(session, [row.id])
                await audit.record(
                    session,
                    actor,
                    "migration.cancel",
                    "migration",
                    row.id,
                    account_id=row.account_id,
                )
                out[migration_id] = row
        return out

    ids = list(dict.fromkeys(migration_ids))
    if not ids:
        return {}
    out = await isolated(executor.db, ids, work, fault="inside:cancel")
    return out


async def finalize(executor: Engine, actor: Actor, migration_id: str) -> Migration:
    """Release the old copies and retire the snapshot: the migration can no longer be rolled
    back. Idempotent (``finalize_many`` of one)."""
    return _one((await finalize_many(executor, actor, [migration_id]))[migration_id])


async def finalize_many(
    executor: Engine, actor: Actor, migration_ids: Sequence[str]
) -> dict[str, Migration | KeyshiftError]:
    """Finalize many completed migrations in ONE transaction, set-based: their old copies
    released (one DELETE), their rows finalized and snapshots retired (one UPDATE), their
    ledger rows and audit events written together. Idempotent: a finalized one is returned as
    it is; one that is not completed gets its error, having written nothing. A crash anywhere
    (``inside:finalize``) leaves it to be called again."""

    async def work(
        session: AsyncSession, keys: Sequence[str]
    ) -> dict[str, Migration | KeyshiftError]:
        now = executor.clock()
        # The snapshot, retired here, is not read (the largest column of a row).
        rows = await repository.lock_migrations(session, keys, without=(Migration.snapshot,))
        out: dict[str, Migration | KeyshiftError] = {}
        todo: list[Migration] = []
        for migration_id in keys:
            row = rows.get(migration_id)
            if row is None:
                out[migration_id] = _not_found(migration_id)
            elif row.state == MigrationState.FINALIZED:
                out[migration_id] = row
            elif row.state != MigrationState.COMPLETED:
                out[migration_id] = WrongState(
                    f"migration {row.id} is {row.state}; only a completed migration is finalized",
                    field="migration_id",
                )
            else:
                todo.append(row)
        if not todo:
            return out
        ids = [row.id for row in todo]
        released = await repository.release_superseded(session, ids)
        done = await repository.ledger_steps(session, ids)
        await repository.finalize_rows(session, ids)
        ledger = []
        for row in todo:
            # As the UPDATE above left them (set as loaded: nothing more to write).
            set_committed_value(row, "state", MigrationState.FINALIZED)
            set_committed_value(row, "snapshot", None)
            ledger.append(
                {
                    "migration_id": row.id,
                    "step": Step.FINALIZE,
                    "account_id": row.account_id,
                    "seq": len(done[row.id]) + 1,
                    "outcome": StepOutcome.DONE,
                    "snapshot_hash": row.snapshot_hash,
                    "details": {"objects_released": released.get(row.id, 0)},
                    "at": now,
                }
            )
            await audit.record(
                session,
                actor,
                "migration.finalize",
                "migration",
                row.id,
                account_id=row.account_id,
            )
            out[row.id] = row
        await repository.insert_steps(session, ledger)
        return out

    ids = list(dict.fromkeys(migration_ids))
    if not ids:
        return {}
    out = await isolated(executor.db, ids, work, fault="inside:finalize")
    return out


def _one(result: Migration | KeyshiftError) -> Migration:
    if isinstance(result, KeyshiftError):
        raise result
    return result


def _not_found(migration_id: str) -> MigrationNotFound:
    return MigrationNotFound(f"no migration {migration_id}", field="migration_id")
