"""Rollback (restore the snapshot, prove it by hash), cancel and finalize.

Rollback restores everything the migration changed from the snapshot, in one transaction,
except what must never be lost: usage recorded while the migration ran (counters are put back
by inverse deltas, so concurrent events stay counted) and machines activated meanwhile. The
proof re-hashes the restored state with exactly those two kinds of growth taken out, and
records them (``usage_kept``, ``activations_kept``): with no concurrent traffic it is the
plain hash of the restored state. A machine activated after the cutover, under the target's
activation mode, is kept in the restored plan's mode (``activations_converted_back``): it is
one of ``activations_kept``, so ``exact`` speaks for the snapshot's machines, not for it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import and_, delete, insert, update
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit import service as audit
from keyshift.catalog import service as catalog
from keyshift.context import Actor
from keyshift.db import changes
from keyshift.db.engine import Database
from keyshift.db.tables import Activation, DataObject, Migration
from keyshift.migration import repository
from keyshift.migration.errors import (
    MigrationFinalized,
    MigrationNotFound,
    NothingToRollBack,
    WrongState,
)
from keyshift.migration.state import (
    ActivationData,
    CounterData,
    Snapshot,
    as_snapshot,
    differences,
    parse_iso,
    state_hash,
)
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
    """Restore the account to its snapshot. Idempotent: a rolled-back migration is returned
    as it is. Refused after finalize, and while a later migration of the account stands."""
    now = executor.clock()
    async with executor.db.transaction() as session:
        row = await repository.lock_migration(session, migration_id)
        if row is None:
            raise MigrationNotFound(f"no migration {migration_id}", field="migration_id")
        if row.state == MigrationState.ROLLED_BACK:
            return row
        if row.state == MigrationState.FINALIZED:
            raise MigrationFinalized(
                f"migration {row.id} was finalized: its snapshot is retired", field="migration_id"
            )
        if row.state in WAITING:
            raise WrongState(
                f"migration {row.id} has not run ({row.state}); cancel it instead",
                field="migration_id",
            )
        if row.state not in REVERSIBLE:
            raise NothingToRollBack(
                f"migration {row.id} changed nothing ({row.state})", field="migration_id"
            )
        later = [
            m
            for m in await repository.latest_migrations(session, row.account_id)
            if m.created_at > row.created_at and m.state not in SETTLED and m.id != row.id
        ]
        if later:
            raise WrongState(
                f"migration {later[0].id} came after this one; roll it back first",
                field="migration_id",
            )
        done = await repository.steps_done(session, row.id)
        cutover = done.get(Step.CUTOVER)
        details: dict[str, Any] = {"reason": reason, "after_cutover": False}
        if cutover is not None and cutover.outcome == StepOutcome.DONE:
            details.update(await _restore(session, row, cutover.details, now))
            details["after_cutover"] = True
            await changes.announce(
                session,
                account_id=row.account_id,
                to=executor.cache.apply if executor.cache is not None else None,
            )
        else:
            await session.execute(
                delete(DataObject).where(
                    DataObject.migration_id == row.id, DataObject.state == "staged"
                )
            )
        if row.snapshot is not None:
            details.update(await prove(session, row, now))
        row.state, row.lock_account_id, row.finished_at = MigrationState.ROLLED_BACK, None, now
        if reason and not row.error:
            row.error = reason
        await repository.write_step(
            session,
            row,
            Step.ROLLBACK,
            outcome=StepOutcome.DONE if details.get("exact", True) else StepOutcome.INEXACT,
            snapshot_hash=row.snapshot_hash,
            details=details,
            now=now,
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
                "restored_hash": details.get("restored_hash"),
                "exact": details.get("exact"),
                "activations_converted_back": details.get("activations_converted_back", []),
            },
        )
    return row


async def _restore(
    session: AsyncSession, row: Migration, cutover: dict[str, Any], now: datetime
) -> dict[str, Any]:
    snapshot = as_snapshot(row.snapshot)
    before = snapshot["subscription"]
    assert before is not None  # an account without a plan is refused, never cut over
    sub = await repository.lock_subscription(session, row.account_id)
    assert sub is not None
    repository.put_subscription(sub, before, now)
    await repository.put_license_overrides(session, row.account_id, snapshot["licenses"], now)

    restored_activations = []
    for activation in cutover.get("activations_deactivated", []):
        # A machine re-activated since under the same fingerprint gives way to the original.
        await session.execute(
            delete(Activation).where(
                and_(
                    Activation.license_id == activation["license_id"],
                    Activation.fingerprint == activation["fingerprint"],
                )
            )
        )
        await session.execute(
            insert(Activation).values(
                id=activation["id"],
                account_id=row.account_id,
                license_id=activation["license_id"],
                fingerprint=activation["fingerprint"],
                mode=activation["mode"],
                label=activation["label"],
                created_at=parse_iso(activation["created_at"]),
                last_seen_at=parse_iso(activation["last_seen_at"]),
                lease_expires_at=parse_iso(activation["lease_expires_at"]),
            )
        )
        restored_activations.append(activation["id"])

    # Machines the cutover switched to the target's activation mode get their own mode and
    # lease back, as they were just before it (a floating lease that has run out since is
    # re-acquired by the machine's next heartbeat, as any lapsed lease is).
    reverted = []
    for change in cutover.get("activations_converted", []):
        before = change["from"]
        result = await session.execute(
            update(Activation)
            .where(Activation.id == change["id"])
            .values(mode=before["mode"], lease_expires_at=parse_iso(before["lease_expires_at"]))
        )
        if result.rowcount:  # type: ignore[attr-defined]
            reverted.append(change["id"])

    # Machines activated since the snapshot and not put back above (activated after the
    # cutover, under the target's mode) take the restored plan's mode, by the cutover's own
    # rule: node-locked without a lease, or floating with a lease from now.
    converted_back = await _convert_to_restored_mode(session, row, snapshot, reverted, now)

    await session.execute(
        delete(DataObject).where(DataObject.migration_id == row.id, DataObject.tier == "archive")
    )
    await session.execute(
        update(DataObject)
        .where(DataObject.migration_id == row.id, DataObject.state == "superseded")
        .values(state="active", migration_id=None)
    )

    counters = []
    for entry in sorted(cutover.get("counters", []), key=lambda c: (c["meter"], c["period_start"])):
        if not entry["delta"]:
            continue
        end = entry.get("period_end") or entry["period_start"]
        used, _ = await repository.lock_counter_row(
            session, row.account_id, entry["meter"], entry["period_start"], end
        )
        await repository.add_to_counter_row(
            session, row.account_id, entry["meter"], entry["period_start"], -entry["delta"]
        )
        removed = False
        if not entry["existed"]:
            removed = await repository.delete_counter_row_if_zero(
                session, row.account_id, entry["meter"], entry["period_start"]
            )
        counters.append(
            {**entry, "at_rollback": used, "restored": used - entry["delta"], "removed": removed}
        )
    return {
        "activations_restored": restored_activations,
        "activations_reverted": reverted,
        "activations_converted_back": converted_back,
        "counters_restored": counters,
    }


async def _convert_to_restored_mode(
    session: AsyncSession, row: Migration, snapshot: Snapshot, reverted: list[str], now: datetime
) -> list[dict[str, Any]]:
    """Every machine holding a seat that the snapshot did not have is put into the restored
    plan's activation mode (the machines of the snapshot are restored as they were)."""
    sub = snapshot.get("subscription")
    if not sub or not sub["plan"]:
        return []
    plan = await catalog.entitlements_for(session, sub["plan"], sub["plan_hash"])
    known = {a["id"] for a in snapshot.get("activations", [])}
    return await repository.convert_machines(
        session,
        row.account_id,
        plan.machine_mode,
        plan.lease_until(now),
        now,
        skip=known | set(reverted),
    )


async def prove(session: AsyncSession, row: Migration, now: datetime) -> dict[str, Any]:
    """Re-hash the restored state (growth from live traffic taken out and reported)."""
    snapshot = as_snapshot(row.snapshot)
    taken_at = snapshot.get("taken_at") or ""
    restored = await repository.read_state(
        session, row.account_id, now, counters_at=parse_iso(taken_at)
    )
    assert restored is not None
    normal, usage_kept, activations_kept = normalise(snapshot, restored)
    restored_hash = state_hash(normal)
    return {
        "restored_hash": restored_hash,
        "snapshot_hash": row.snapshot_hash,
        "exact": restored_hash == row.snapshot_hash,
        "differences": differences(snapshot, normal)[:20],
        "usage_kept": usage_kept,
        "activations_kept": activations_kept,
    }


def normalise(
    snapshot: Snapshot, restored: Snapshot
) -> tuple[Snapshot, list[dict[str, Any]], list[str]]:
    """``restored`` with live growth since the snapshot removed: counters above their
    snapshot count go back to it (the excess is usage that arrived meanwhile), and machines
    activated after the snapshot are left out. A counter *below* its snapshot is kept as it
    is, so the hashes differ: that would be lost usage."""
    taken_at = snapshot.get("taken_at") or ""
    before = {(c["meter"], c["period_start"]): c for c in snapshot.get("counters", [])}
    counters: list[CounterData] = []
    usage_kept: list[dict[str, Any]] = []
    for counter in restored.get("counters", []):
        key = (counter["meter"], counter["period_start"])
        had = before.get(key)
        base = had["used"] if had else 0
        if counter["used"] >= base:
            if counter["used"] > base:
                usage_kept.append(
                    {"meter": key[0], "period_start": key[1], "units": counter["used"] - base}
                )
            if had is not None:
                counters.append(had.copy())
        else:
            counters.append(counter)
    known = {a["id"] for a in snapshot.get("activations", [])}
    activations: list[ActivationData] = []
    kept: list[str] = []
    for activation in restored.get("activations", []):
        if activation["id"] not in known and (activation["created_at"] or "") > taken_at:
            kept.append(activation["id"])
        else:
            activations.append(activation)
    normal: Snapshot = {**restored, "counters": counters, "activations": activations}
    return normal, usage_kept, kept


async def cancel(executor: Engine, actor: Actor, migration_id: str) -> Migration:
    """Withdraw a scheduled, held or queued change before it runs."""
    now = executor.clock()
    async with executor.db.transaction() as session:
        row = await repository.lock_migration(session, migration_id)
        if row is None:
            raise MigrationNotFound(f"no migration {migration_id}", field="migration_id")
        if row.state == MigrationState.CANCELLED:
            return row
        if row.state not in WAITING:
            raise WrongState(
                f"migration {row.id} is {row.state}; only a change that has not run can be"
                " cancelled (roll back one that has)",
                field="migration_id",
            )
        row.state, row.lock_account_id, row.finished_at = MigrationState.CANCELLED, None, now
        await audit.record(
            session, actor, "migration.cancel", "migration", row.id, account_id=row.account_id
        )
    return row


async def finalize(executor: Engine, actor: Actor, migration_id: str) -> Migration:
    """Release the old copies and retire the snapshot: the migration can no longer be rolled
    back. Idempotent."""
    now = executor.clock()
    async with executor.db.transaction() as session:
        row = await repository.lock_migration(session, migration_id)
        if row is None:
            raise MigrationNotFound(f"no migration {migration_id}", field="migration_id")
        if row.state == MigrationState.FINALIZED:
            return row
        if row.state != MigrationState.COMPLETED:
            raise WrongState(
                f"migration {row.id} is {row.state}; only a completed migration is finalized",
                field="migration_id",
            )
        released = await session.execute(
            delete(DataObject).where(
                DataObject.migration_id == row.id, DataObject.state == "superseded"
            )
        )
        row.state, row.snapshot = MigrationState.FINALIZED, None
        await repository.write_step(
            session,
            row,
            Step.FINALIZE,
            snapshot_hash=row.snapshot_hash,
            details={"objects_released": int(released.rowcount or 0)},  # type: ignore[attr-defined]
            now=now,
        )
        await audit.record(
            session, actor, "migration.finalize", "migration", row.id, account_id=row.account_id
        )
    return row
