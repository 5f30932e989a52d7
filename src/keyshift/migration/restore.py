"""Put accounts back as their migrations' snapshots had them, and prove it by hash: the
writes of a batch of rollbacks (``rollback.rollback_many`` decides which migrations go, and
writes their ledger rows).

Everything the migration changed is restored from the snapshot and the cutover's ledger row,
except what must never be lost: usage recorded while the migration ran (counters get the
inverse delta of the cutover's move, so concurrent events stay counted) and machines activated
meanwhile. The proof re-hashes the restored state with exactly those two kinds of growth taken
out, and records them (``usage_kept``, ``activations_kept``): with no concurrent traffic it is
the plain hash of the restored state. A machine activated after the cutover, under the
target's activation mode, is kept in the restored plan's mode (``activations_converted_back``):
it is one of ``activations_kept``, so ``exact`` speaks for the snapshot's machines, not for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.catalog import service as catalog
from keyshift.db.tables import DataObject, Migration
from keyshift.migration import repository
from keyshift.migration.state import (
    ActivationData,
    CounterData,
    Snapshot,
    as_snapshot,
    differences,
    parse_iso,
    state_hash,
)


@dataclass(frozen=True)
class _Machine:
    """A machine as ``repository.convert_machines`` reads one."""

    id: str
    license_id: str
    fingerprint: str
    mode: str
    lease_expires_at: datetime | None


async def restore_many(
    session: AsyncSession,
    rows: list[Migration],
    cutovers: dict[str, dict[str, Any]],
    now: dict[str, datetime],
) -> dict[str, dict[str, Any]]:
    """Restore the accounts (distinct) of migrations that cut over, from their snapshots and
    their cutovers' ledger rows, and say what was put back, per migration. Their subscriptions
    and licenses are locked (in key order, as every seat change takes them) and their machines
    read, one statement each; then each kind of write is one statement for all of them."""
    if not rows:
        return {}
    accounts = [row.account_id for row in rows]
    subscriptions = await repository.lock_subscriptions(session, accounts)
    licenses = await repository.lock_licenses(session, accounts)
    machines = await repository.read_machines(session, accounts)
    activations: list[dict[str, Any]] = []
    modes: list[tuple[str, str, datetime | None]] = []
    counters: dict[repository.CounterKey, tuple[datetime, dict[str, Any], int]] = {}
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        snapshot, cutover = as_snapshot(row.snapshot), cutovers[row.id]
        before = snapshot["subscription"]
        sub = subscriptions.get(row.account_id)
        assert before is not None and sub is not None  # a plan-less account is never cut over
        repository.put_subscription(sub, before, now[row.id])
        await repository.put_license_overrides(
            session,
            row.account_id,
            snapshot["licenses"],
            now[row.id],
            locked=licenses[row.account_id],
        )
        # A machine re-activated since under the same fingerprint gives way to the original.
        back = list(cutover.get("activations_deactivated", []))
        activations += [{**activation, "account_id": row.account_id} for activation in back]
        gone = {(a["license_id"], a["fingerprint"]) for a in back}
        left = [
            _Machine(m.id, m.license_id, m.fingerprint, m.mode, m.lease_expires_at)
            for m in machines[row.account_id]
            if (m.license_id, m.fingerprint) not in gone
        ]
        # Machines the cutover switched to the target's activation mode get their own mode and
        # lease back, as they were just before it (a floating lease that has run out since is
        # re-acquired by the machine's next heartbeat, as any lapsed lease is).
        present = {m.id for m in left}
        reverted = []
        for change in cutover.get("activations_converted", []):
            if change["id"] in present:
                was = change["from"]
                modes.append((change["id"], was["mode"], parse_iso(was["lease_expires_at"])))
                reverted.append(change["id"])
        # Machines activated since the snapshot and not put back above (activated after the
        # cutover, under the target's mode) take the restored plan's mode, by the cutover's own
        # rule: node-locked without a lease, or floating with a lease from now.
        converted_back = await _convert_to_restored_mode(
            session, row, snapshot, left, reverted, now[row.id], modes
        )
        for entry in sorted(
            cutover.get("counters", []), key=lambda c: (c["meter"], c["period_start"])
        ):
            if entry["delta"]:
                start = parse_iso(entry["period_start"])
                end = parse_iso(entry.get("period_end") or entry["period_start"])
                assert start is not None and end is not None
                counters[(row.account_id, entry["meter"], start)] = (end, entry, -entry["delta"])
        out[row.id] = {
            "activations_restored": [a["id"] for a in back],
            "activations_reverted": reverted,
            "activations_converted_back": converted_back,
            "counters_restored": [],
        }
    await repository.restore_activations(session, activations)
    await repository.set_machine_modes(session, modes)
    ids = [row.id for row in rows]
    await session.execute(
        delete(DataObject)
        .where(DataObject.migration_id.in_(ids), DataObject.tier == "archive")
        .execution_options(synchronize_session=False)
    )
    await session.execute(
        update(DataObject)
        .where(DataObject.migration_id.in_(ids), DataObject.state == "superseded")
        .values(state="active", migration_id=None)
        .execution_options(synchronize_session=False)
    )
    # Counters get the inverse delta of the cutover's move (usage recorded since stays).
    used = await repository.lock_counter_rows(
        session, [(key, end) for key, (end, _, _) in counters.items()]
    )
    await repository.add_to_counter_rows(
        session, {key: delta for key, (_, _, delta) in counters.items()}
    )
    await repository.delete_counter_rows_if_zero(
        session,
        [
            key
            for key, (_, entry, delta) in counters.items()
            if not entry["existed"] and used[key] + delta == 0
        ],
    )
    by_account = {row.account_id: row.id for row in rows}
    for key, (_, entry, delta) in counters.items():
        at_rollback = used[key]
        out[by_account[key[0]]]["counters_restored"].append(
            {
                **entry,
                "at_rollback": at_rollback,
                "restored": at_rollback + delta,
                "removed": not entry["existed"] and at_rollback + delta == 0,
            }
        )
    return out


async def _convert_to_restored_mode(
    session: AsyncSession,
    row: Migration,
    snapshot: Snapshot,
    machines: list[_Machine],
    reverted: list[str],
    now: datetime,
    modes: list[tuple[str, str, datetime | None]],
) -> list[dict[str, Any]]:
    """Every machine holding a seat that the snapshot did not have is to be put into the
    restored plan's activation mode (the machines of the snapshot are restored as they were):
    added to ``modes`` — (id, mode, lease) — for the batch to write together. ``machines``:
    the account's, as they will be once the snapshot's are put back."""
    sub = snapshot.get("subscription")
    if not sub or not sub["plan"]:
        return []
    plan = await catalog.entitlements_for(session, sub["plan"], sub["plan_hash"])
    known = {a["id"] for a in snapshot.get("activations", [])}
    pending: dict[tuple[str, datetime | None], list[str]] = {}
    changed = await repository.convert_machines(
        session,
        row.account_id,
        plan.machine_mode,
        plan.lease_until(now),
        now,
        skip=known | set(reverted),
        machines=machines,
        pending=pending,
    )
    modes += [(i, mode, lease) for (mode, lease), ids in pending.items() for i in ids]
    return changed


async def prove_many(
    session: AsyncSession, rows: list[Migration], now: dict[str, datetime]
) -> dict[str, dict[str, Any]]:
    """Re-hash each restored state (growth from live traffic taken out and reported), the
    states read for all the accounts at once, each with the counters of its snapshot's
    periods."""
    if not rows:
        return {}
    snapshots = {row.id: as_snapshot(row.snapshot) for row in rows}
    taken_at: dict[str, datetime] = {}
    for row in rows:
        moment = parse_iso(snapshots[row.id].get("taken_at"))
        if moment is not None:
            taken_at[row.account_id] = moment
    states = await repository.read_states(
        session, [row.account_id for row in rows], min(now.values()), counters_at=taken_at
    )
    restored = {state["account"]["id"]: state for state in states}
    out = {}
    for row in rows:
        snapshot = snapshots[row.id]
        normal, usage_kept, activations_kept = normalise(snapshot, restored[row.account_id])
        restored_hash = state_hash(normal)
        out[row.id] = {
            "restored_hash": restored_hash,
            "snapshot_hash": row.snapshot_hash,
            "exact": restored_hash == row.snapshot_hash,
            "differences": differences(snapshot, normal)[:20],
            "usage_kept": usage_kept,
            "activations_kept": activations_kept,
        }
    return out


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
