"""Migration queries: read an account's state, lock what a step changes, write the ledger.

Every function works inside the caller's transaction; the executor decides where it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, delete, func, insert, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import defer

from keyshift.dates import rfc3339
from keyshift.db.sql import among
from keyshift.db.tables import (
    Account,
    Activation,
    DataObject,
    License,
    Migration,
    MigrationRulesVersion,
    MigrationStep,
    RunAccount,
    Subscription,
    UsageCounter,
)
from keyshift.migration.state import (
    GrantsData,
    LicenseData,
    Snapshot,
    SubscriptionData,
    SubscriptionOverrides,
    iso,
    parse_iso,
    sort_state,
)
from keyshift.states import MigrationState, Step, StepOutcome

#: Core tables, for statements run with many parameter sets (one ``executemany``).
_COUNTERS = cast(Table, UsageCounter.__table__)
_ACTIVATIONS = cast(Table, Activation.__table__)
_OBJECTS = cast(Table, DataObject.__table__)


async def read_state(
    session: AsyncSession, account_id: str, now: datetime, *, counters_at: datetime | None = None
) -> Snapshot | None:
    """The account's state (see ``keyshift.migration.state``); None if there is no account.

    Counters are those of the periods current at ``counters_at`` (default ``now``): the ones a
    migration moves. Rollback passes the snapshot's time, so it compares the same periods.
    """
    counters_at = counters_at or now
    account = (
        await session.execute(
            select(Account)
            .where(Account.id == account_id)
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if account is None:
        return None
    sub = (
        await session.execute(
            select(Subscription)
            .where(Subscription.account_id == account_id)
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    licenses = (
        await session.execute(
            select(License)
            .where(License.account_id == account_id)
            .execution_options(populate_existing=True)
        )
    ).scalars()
    activations = (
        await session.execute(
            select(Activation)
            .where(Activation.account_id == account_id)
            .execution_options(populate_existing=True)
        )
    ).scalars()
    counters = (
        await session.execute(
            select(UsageCounter)
            .where(UsageCounter.account_id == account_id, UsageCounter.period_end > counters_at)
            .execution_options(populate_existing=True)
        )
    ).scalars()
    objects = (
        await session.execute(
            select(
                DataObject.id,
                DataObject.quota,
                DataObject.name,
                DataObject.units,
                DataObject.tier,
                DataObject.state,
                DataObject.content_hash,
                DataObject.created_at,
            ).where(DataObject.account_id == account_id, DataObject.state != "staged")
        )
    ).all()
    return build_state(account, sub, licenses, activations, counters, objects, now)


def build_state(
    account: Any,
    subscription: Any | None,
    licenses: Iterable[Any],
    activations: Iterable[Any],
    counters: Iterable[Any],
    objects: Iterable[Any],
    now: datetime,
) -> Snapshot:
    """An account's state from its rows: ORM objects or Core rows with the same attribute
    names (``read_state`` reads one account's; ``read_states``, many accounts' at once, reads
    its rows by position with ``_state_of_rows``, which must give the same)."""
    state: Snapshot = {
        "account": {
            "id": account.id,
            "name": account.name,
            "status": account.status,
            "external_ref": account.external_ref,
            "attributes": account.attributes or {},
            "preferences": account.preferences or {},
        },
        "subscription": None
        if subscription is None
        else {
            "plan": f"{subscription.plan_key}@{subscription.plan_version}",
            "plan_hash": subscription.plan_hash,
            "started_at": iso(subscription.started_at),
            "overrides": cast(SubscriptionOverrides, subscription.overrides or {}),
        },
        "licenses": [
            {
                "id": lic.id,
                "key_lookup": lic.key_lookup,
                "status": lic.status,
                "expires_at": iso(lic.expires_at),
                "max_activations_override": lic.max_activations_override,
                "overrides": cast(GrantsData, lic.overrides or {}),
            }
            for lic in licenses
        ],
        "activations": [
            {
                "id": a.id,
                "license_id": a.license_id,
                "fingerprint": a.fingerprint,
                "mode": a.mode,
                "label": a.label,
                "created_at": iso(a.created_at),
                "last_seen_at": iso(a.last_seen_at),
                "lease_expires_at": iso(a.lease_expires_at),
            }
            for a in activations
        ],
        "counters": [
            {
                "meter": c.meter,
                "period_start": iso(c.period_start),
                "period_end": iso(c.period_end),
                "used": int(c.used),
            }
            for c in counters
        ],
        "objects": [
            {
                "id": o.id,
                "quota": o.quota,
                "name": o.name,
                "units": int(o.units),
                "tier": o.tier,
                "state": o.state,
                "content_hash": o.content_hash,
                "created_at": iso(o.created_at),
            }
            for o in objects
        ],
        "taken_at": iso(now),
    }
    return sort_state(state)


#: The columns of each table a state holds (``build_state`` reads them by name).
_STATE_COLUMNS: dict[Any, tuple[Any, ...]] = {
    Account: (
        Account.id,
        Account.name,
        Account.status,
        Account.external_ref,
        Account.attributes,
        Account.preferences,
    ),
    Subscription: (
        Subscription.account_id,
        Subscription.plan_key,
        Subscription.plan_version,
        Subscription.plan_hash,
        Subscription.started_at,
        Subscription.overrides,
    ),
    License: (
        License.account_id,
        License.id,
        License.key_lookup,
        License.status,
        License.expires_at,
        License.max_activations_override,
        License.overrides,
    ),
    Activation: (
        Activation.account_id,
        Activation.id,
        Activation.license_id,
        Activation.fingerprint,
        Activation.mode,
        Activation.label,
        Activation.created_at,
        Activation.last_seen_at,
        Activation.lease_expires_at,
    ),
    UsageCounter: (
        UsageCounter.account_id,
        UsageCounter.meter,
        UsageCounter.period_start,
        UsageCounter.period_end,
        UsageCounter.used,
    ),
    DataObject: (
        DataObject.account_id,
        DataObject.id,
        DataObject.quota,
        DataObject.name,
        DataObject.units,
        DataObject.tier,
        DataObject.state,
        DataObject.content_hash,
        DataObject.created_at,
    ),
}


async def read_states(
    session: AsyncSession | AsyncConnection,
    account_ids: Sequence[str],
    now: datetime,
    *,
    counters_at: datetime | Mapping[str, datetime] | None = None,
) -> list[Snapshot]:
    """The states of many accounts (as ``read_state`` gives each), in ``account_ids`` order,
    in one query per table; ids with no account are left out. For set-based reads of a batch
    (a state checksum over a whole database, a run's batch of accounts). ``counters_at``: one
    moment for every account, or one per account (a batch of rollbacks proves each account
    against the periods of its own snapshot; an account not named gets ``now``)."""
    each: Mapping[str, datetime] = {}
    if isinstance(counters_at, Mapping):
        each, counters_at = counters_at, min([*counters_at.values(), now])
    counters_at = counters_at or now
    ids = list(dict.fromkeys(account_ids))
    if not ids:
        return []

    async def rows(table: Any, *where: Any) -> dict[str, list[Any]]:
        columns = _STATE_COLUMNS[table]
        key = columns[0]
        grouped: dict[str, list[Any]] = {}
        result = await session.execute(select(*columns).where(among(session, key, ids), *where))
        for row in result:
            grouped.setdefault(row[0], []).append(row)
        return grouped

    accounts = await rows(Account)
    subscriptions = await rows(Subscription)
    licenses = await rows(License)
    activations = await rows(Activation)
    counters = await rows(UsageCounter, UsageCounter.period_end > counters_at)
    objects = await rows(DataObject, DataObject.state != "staged")
    taken_at = iso(now)
    return [
        _state_of_rows(
            accounts[account_id][0],
            (subscriptions.get(account_id) or [None])[0],
            licenses.get(account_id, ()),
            activations.get(account_id, ()),
            [c for c in counters.get(account_id, ()) if c.period_end > each.get(account_id, now)]
            if each
            else counters.get(account_id, ()),
            objects.get(account_id, ()),
            taken_at,
        )
        for account_id in ids
        if account_id in accounts
    ]


#: ``rfc3339`` of a value that is there (typed so: the state's instants are ``str``).
_text = cast("Callable[[datetime], str]", rfc3339)


def _state_of_rows(
    account: Sequence[Any],
    subscription: Sequence[Any] | None,
    licenses: Iterable[Sequence[Any]],
    activations: Iterable[Sequence[Any]],
    counters: Iterable[Sequence[Any]],
    objects: Iterable[Sequence[Any]],
    taken_at: str,
) -> Snapshot:
    """``build_state`` for rows of ``_STATE_COLUMNS``, read by position (every table's rows
    but the account's start with the account id): reading a Core row's values by name costs
    ten times as much, and a state has about a hundred of them."""
    _, name, status, external_ref, attributes, preferences = account
    sub: SubscriptionData | None = None
    if subscription is not None:
        _, plan_key, plan_version, plan_hash, started_at, sub_overrides = subscription
        sub = {
            "plan": f"{plan_key}@{plan_version}",
            "plan_hash": plan_hash,
            "started_at": _text(started_at),
            "overrides": cast(SubscriptionOverrides, sub_overrides or {}),
        }
    state: Snapshot = {
        "account": {
            "id": account[0],
            "name": name,
            "status": status,
            "external_ref": external_ref,
            "attributes": attributes or {},
            "preferences": preferences or {},
        },
        "subscription": sub,
        "licenses": [
            {
                "id": license_id,
                "key_lookup": key_lookup,
                "status": license_status,
                "expires_at": _text(expires_at) if expires_at is not None else None,
                "max_activations_override": max_override,
                "overrides": cast(GrantsData, license_overrides or {}),
            }
            for (
                _,
                license_id,
                key_lookup,
                license_status,
                expires_at,
                max_override,
                license_overrides,
            ) in licenses
        ],
        "activations": [
            {
                "id": activation_id,
                "license_id": license_id,
                "fingerprint": fingerprint,
                "mode": mode,
                "label": label,
                "created_at": _text(created_at),
                "last_seen_at": _text(last_seen_at),
                "lease_expires_at": _text(lease) if lease is not None else None,
            }
            for (
                _,
                activation_id,
                license_id,
                fingerprint,
                mode,
                label,
                created_at,
                last_seen_at,
                lease,
            ) in activations
        ],
        "counters": [
            {
                "meter": meter,
                "period_start": _text(period_start),
                "period_end": _text(period_end),
                "used": int(used),
            }
            for _, meter, period_start, period_end, used in counters
        ],
        "objects": [
            {
                "id": object_id,
                "quota": quota,
                "name": object_name,
                "units": int(units),
                "tier": tier,
                "state": object_state,
                "content_hash": content_hash,
                "created_at": _text(created_at),
            }
            for (
                _,
                object_id,
                quota,
                object_name,
                units,
                tier,
                object_state,
                content_hash,
                created_at,
            ) in objects
        ],
        "taken_at": taken_at,
    }
    return sort_state(state)


async def lock_subscription(session: AsyncSession, account_id: str) -> Subscription | None:
    return (
        await session.execute(
            select(Subscription)
            .where(Subscription.account_id == account_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()


async def lock_for_snapshot(session: AsyncSession, account_ids: Sequence[str]) -> None:
    """Lock the accounts' subscriptions and licenses (what admin changes go through), each
    table in one statement, in key order."""
    ids = sorted(set(account_ids))
    await session.execute(
        select(Subscription.account_id)
        .where(among(session, Subscription.account_id, ids))
        .order_by(Subscription.account_id)
        .with_for_update()
    )
    await session.execute(
        select(License.id)
        .where(among(session, License.account_id, ids))
        .order_by(License.id)
        .with_for_update()
    )


async def lock_subscriptions(
    session: AsyncSession, account_ids: Sequence[str]
) -> dict[str, Subscription]:
    """The accounts' subscriptions, locked in key order, by account."""
    rows = (
        await session.execute(
            select(Subscription)
            .where(among(session, Subscription.account_id, sorted(set(account_ids))))
            .order_by(Subscription.account_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalars()
    return {row.account_id: row for row in rows}


async def lock_licenses(
    session: AsyncSession, account_ids: Sequence[str]
) -> dict[str, list[License]]:
    """The accounts' licenses, locked in key order, by account (every id is a key)."""
    out: dict[str, list[License]] = {a: [] for a in account_ids}
    rows = (
        await session.execute(
            select(License)
            .where(among(session, License.account_id, sorted(out)))
            .order_by(License.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalars()
    for row in rows:
        out[row.account_id].append(row)
    return out


#: The columns of a machine ``convert_machines`` reads.
_MACHINE_COLUMNS = (
    Activation.account_id,
    Activation.id,
    Activation.license_id,
    Activation.fingerprint,
    Activation.mode,
    Activation.lease_expires_at,
)


async def read_machines(session: AsyncSession, account_ids: Sequence[str]) -> dict[str, list[Any]]:
    """The accounts' activations (the columns ``convert_machines`` needs), by account, in id
    order (every id is a key)."""
    out: dict[str, list[Any]] = {a: [] for a in account_ids}
    rows = await session.execute(
        select(*_MACHINE_COLUMNS)
        .where(among(session, Activation.account_id, sorted(out)))
        .order_by(Activation.id)
    )
    for row in rows:
        out[row.account_id].append(row)
    return out


async def lock_migration(session: AsyncSession, migration_id: str) -> Migration | None:
    """The migration row, locked: concurrent resumers of one migration take turns."""
    return (
        await session.execute(
            select(Migration)
            .where(Migration.id == migration_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()


async def lock_migrations(
    session: AsyncSession, migration_ids: Sequence[str], *, without: Sequence[Any] = ()
) -> dict[str, Migration]:
    """Many migration rows as ORM objects, locked in id order (two batches that share rows
    cannot deadlock on them); missing ids are left out — for rollback, cancel and finalize
    (the forward steps read records: ``lock_records``). ``without``: columns not to read;
    reading one of them later raises instead of loading it."""
    query = (
        select(Migration)
        .where(among(session, Migration.id, sorted(set(migration_ids))))
        .order_by(Migration.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if without:
        query = query.options(*(defer(column, raiseload=True) for column in without))
    rows = (await session.execute(query)).scalars()
    return {row.id: row for row in rows}


@dataclass(slots=True, eq=False)
class MigrationRecord:
    """A migration row as a batch step reads it: with Core, not as an ORM object (a batch of
    200 rows paid more for the unit of work — identity map, change tracking, one flush — than
    for the SQL). A step sets its attributes as it would an ORM row's; ``write_records``
    writes back what changed, one UPDATE per set of changed columns for the whole batch.

    A column the step did not read (``lock_records``' ``without``) is left unset: reading it
    raises AttributeError instead of quietly giving None."""

    id: str
    account_id: str
    lock_account_id: str | None
    state: MigrationState
    rules_ref: str
    rules_hash: str
    source_ref: str | None
    source_hash: str | None
    target_ref: str
    target_hash: str
    effective_at: datetime | None
    outcome_digest: str | None
    snapshot: dict[str, Any] | None
    snapshot_hash: str | None
    plan: dict[str, Any] | None
    receipt: dict[str, Any] | None
    error: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    cutover_at: datetime | None
    finished_at: datetime | None
    run_id: str | None
    #: The values as read, to tell what a step changed.
    read: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, values: Mapping[Any, Any]) -> MigrationRecord:
        record = cls.__new__(cls)
        for name, value in values.items():
            setattr(record, name, value)
        record.read = dict(values)
        return record

    def changes(self) -> dict[str, Any]:
        """The columns set since the row was read, with their new values (a JSON column
        counts as changed when a new document was put in it; one changed in place is not)."""
        out = {}
        for name in MIGRATION_COLUMNS:
            try:
                value = getattr(self, name)
            except AttributeError:
                continue  # not read, not set
            if name not in self.read:
                out[name] = value
            else:
                before = self.read[name]
                if value is not before and value != before:
                    out[name] = value
        return out


_MIGRATION_TABLE = cast(Table, Migration.__table__)
MIGRATION_COLUMNS = tuple(column.name for column in _MIGRATION_TABLE.columns)


async def lock_records(
    session: AsyncSession, migration_ids: Sequence[str], *, without: Sequence[str] = ()
) -> dict[str, MigrationRecord]:
    """Many migration rows as records, locked in id order (two batches that share rows
    cannot deadlock on them); missing ids are left out. ``without``: names of columns not to
    read (a step that does not use a row's snapshot or plan need not carry them over the
    wire)."""
    columns = [c for c in _MIGRATION_TABLE.columns if c.name not in without]
    result = await session.execute(
        select(*columns)
        .where(among(session, _MIGRATION_TABLE.c.id, sorted(set(migration_ids))))
        .order_by(_MIGRATION_TABLE.c.id)
        .with_for_update()
    )
    return {row.id: MigrationRecord.of(row._mapping) for row in result}


async def write_records(
    session: AsyncSession, records: Iterable[MigrationRecord], now: datetime
) -> None:
    """Write back what the steps changed in ``records``: one executemany UPDATE per set of
    changed columns (a batch's steps mostly change the same ones), ``updated_at`` with them."""
    shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for record in records:
        changed = record.changes()
        if not changed:
            continue
        changed["updated_at"] = now
        shapes.setdefault(tuple(sorted(changed)), []).append({**changed, "record_id": record.id})
        record.read.update(changed)
        record.updated_at = now
    for names, params in shapes.items():
        await session.execute(
            update(_MIGRATION_TABLE)
            .where(_MIGRATION_TABLE.c.id == bindparam("record_id"))
            .values({name: bindparam(name) for name in names}),
            params,
        )


async def ledger_steps(session: AsyncSession, migration_ids: Sequence[str]) -> dict[str, set[Step]]:
    """The steps each migration has in its ledger (every id is a key)."""
    done: dict[str, set[Step]] = {m: set() for m in migration_ids}
    rows = await session.execute(
        select(MigrationStep.migration_id, MigrationStep.step).where(
            among(session, MigrationStep.migration_id, done)
        )
    )
    for migration_id, step in rows:
        done[migration_id].add(Step(step))
    return done


async def insert_migrations(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """New migration rows (the lock step's), in one statement: the unique
    ``lock_account_id`` refuses a second holder of an account here."""
    if rows:
        await session.execute(insert(_MIGRATION_TABLE), list(rows))


async def insert_steps(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Ledger rows (as ``write_step`` makes them), in one statement."""
    if rows:
        await session.execute(insert(cast(Table, MigrationStep.__table__)), list(rows))


async def ledger_with(
    session: AsyncSession, migration_ids: Sequence[str], step: Step
) -> tuple[dict[str, set[Step]], dict[str, tuple[str, dict[str, Any]]]]:
    """The steps each migration has in its ledger (every id is a key, as ``ledger_steps``), and
    the outcome and details of its ``step`` row for those that have one: one query."""
    done: dict[str, set[Step]] = {m: set() for m in migration_ids}
    rows: dict[str, tuple[str, dict[str, Any]]] = {}
    found = await session.execute(
        select(
            MigrationStep.migration_id,
            MigrationStep.step,
            MigrationStep.outcome,
            case((MigrationStep.step == step, MigrationStep.details)),
        ).where(MigrationStep.migration_id.in_(list(done)))
    )
    for migration_id, done_step, outcome, details in found:
        done[migration_id].add(Step(done_step))
        if done_step == step:
            rows[migration_id] = (outcome, details or {})
    return done, rows


async def release_superseded(session: AsyncSession, migration_ids: Sequence[str]) -> dict[str, int]:
    """Delete the originals the migrations superseded (archived at their cutovers): one
    statement. How many each released (migrations that released none are left out)."""
    table = _OBJECTS
    gone = await session.execute(
        delete(table)
        .where(table.c.migration_id.in_(list(migration_ids)), table.c.state == "superseded")
        .returning(table.c.migration_id)
    )
    released: dict[str, int] = {}
    for (migration_id,) in gone:
        released[migration_id] = released.get(migration_id, 0) + 1
    return released


async def finalize_rows(session: AsyncSession, migration_ids: Sequence[str]) -> None:
    """Mark the migrations finalized and retire their snapshots: one statement."""
    await session.execute(
        update(Migration)
        .where(Migration.id.in_(list(migration_ids)))
        .values(state=MigrationState.FINALIZED, snapshot=None)
        .execution_options(synchronize_session=False)
    )


async def steps_done(session: AsyncSession, migration_id: str) -> dict[str, MigrationStep]:
    rows = (
        await session.execute(
            select(MigrationStep)
            .where(MigrationStep.migration_id == migration_id)
            .execution_options(populate_existing=True)
        )
    ).scalars()
    return {row.step: row for row in rows}


async def write_step(
    session: AsyncSession,
    migration: Migration,
    step: Step,
    *,
    outcome: StepOutcome = StepOutcome.DONE,
    snapshot_hash: str | None = None,
    details: dict[str, Any] | None = None,
    now: datetime,
) -> None:
    """The ledger row of a step; its primary key (migration, step) makes a replay fail loudly
    instead of recording the step twice."""
    seq = (
        await session.execute(
            select(func.count()).where(MigrationStep.migration_id == migration.id)
        )
    ).scalar_one()
    await session.execute(
        insert(MigrationStep).values(
            migration_id=migration.id,
            step=step,
            account_id=migration.account_id,
            seq=int(seq) + 1,
            outcome=outcome,
            snapshot_hash=snapshot_hash,
            details=details or {},
            at=now,
        )
    )


async def active_migration(session: AsyncSession, account_id: str) -> Migration | None:
    return (
        await session.execute(
            select(Migration)
            .where(Migration.lock_account_id == account_id)
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()


async def active_migrations(
    session: AsyncSession, account_ids: Sequence[str]
) -> dict[str, Migration]:
    """The migration holding each of the accounts, for those one holds."""
    rows = (
        await session.execute(
            select(Migration)
            .where(among(session, Migration.lock_account_id, account_ids))
            .execution_options(populate_existing=True)
        )
    ).scalars()
    return {row.account_id: row for row in rows}


async def holding_runs(session: AsyncSession, account_ids: Sequence[str]) -> dict[str, str]:
    """The active run holding each of the accounts, for those one holds."""
    rows = await session.execute(
        select(RunAccount.hold_account_id, RunAccount.run_id).where(
            among(session, RunAccount.hold_account_id, account_ids)
        )
    )
    return {account_id: run_id for account_id, run_id in rows if account_id is not None}


async def holding_run(session: AsyncSession, account_id: str) -> str | None:
    """The active run that holds the account, if any (``run_accounts.hold_account_id``)."""
    return (
        await session.execute(
            select(RunAccount.run_id).where(RunAccount.hold_account_id == account_id)
        )
    ).scalar_one_or_none()


async def unsettled_migrations(
    session: AsyncSession, account_ids: Sequence[str], settled: Iterable[str]
) -> dict[str, list[tuple[str, datetime]]]:
    """The accounts' migrations in no ``settled`` state — (id, created at), newest first — by
    account (only accounts that have one)."""
    rows = await session.execute(
        select(Migration.account_id, Migration.id, Migration.created_at)
        .where(Migration.account_id.in_(list(account_ids)), Migration.state.not_in(list(settled)))
        .order_by(Migration.created_at.desc(), Migration.id)
    )
    out: dict[str, list[tuple[str, datetime]]] = {}
    for account_id, migration_id, created_at in rows:
        out.setdefault(account_id, []).append((migration_id, created_at))
    return out


async def latest_migrations(
    session: AsyncSession, account_id: str, limit: int = 50
) -> list[Migration]:
    rows = await session.execute(
        select(Migration)
        .where(Migration.account_id == account_id)
        .order_by(Migration.created_at.desc(), Migration.id)
        .limit(limit)
    )
    return list(rows.scalars())


def _insert(session: AsyncSession, table: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


# -- rules versions ---------------------------------------------------------------------------


async def insert_rules_if_absent(session: AsyncSession, values: dict[str, Any]) -> bool:
    """Insert a rules version unless its ``key@version`` is there already (a concurrent first
    use may have just inserted it: that is not an error). Whether this call inserted it."""
    result = await session.execute(
        _insert(session, MigrationRulesVersion)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["key", "version"])
    )
    return bool(getattr(result, "rowcount", 0))


async def rules_version(session: AsyncSession, key: str, version: str) -> MigrationRulesVersion:
    return (
        await session.execute(
            select(MigrationRulesVersion).where(
                MigrationRulesVersion.key == key, MigrationRulesVersion.version == version
            )
        )
    ).scalar_one()


# -- counters, moved by deltas under row locks ----------------------------------------------------


async def lock_counter_row(
    session: AsyncSession, account_id: str, meter: str, start: str, end: str
) -> tuple[int, bool]:
    """Create the row if missing (at 0) and lock it; returns (used, existed before)."""
    period_start, period_end = parse_iso(start), parse_iso(end)
    created = (
        await session.execute(
            _insert(session, UsageCounter)
            .values(
                account_id=account_id,
                meter=meter,
                period_start=period_start,
                period_end=period_end,
                used=0,
            )
            .on_conflict_do_nothing(index_elements=["account_id", "meter", "period_start"])
            .returning(UsageCounter.used)
        )
    ).first()
    used = (
        await session.execute(
            select(UsageCounter.used)
            .where(
                UsageCounter.account_id == account_id,
                UsageCounter.meter == meter,
                UsageCounter.period_start == period_start,
            )
            .with_for_update()
        )
    ).scalar_one()
    return int(used), created is None


async def add_to_counter_row(
    session: AsyncSession, account_id: str, meter: str, start: str, delta: int
) -> None:
    if delta == 0:
        return
    await session.execute(
        update(UsageCounter)
        .where(
            UsageCounter.account_id == account_id,
            UsageCounter.meter == meter,
            UsageCounter.period_start == parse_iso(start),
        )
        .values(used=UsageCounter.used + delta)
    )


#: A counter row's key: (account id, meter, period start).
CounterKey = tuple[str, str, datetime]


async def lock_counter_rows(
    session: AsyncSession, rows: Sequence[tuple[CounterKey, datetime]]
) -> dict[CounterKey, int]:
    """``lock_counter_row`` for many rows — (key, period end) each — in two statements: the
    missing ones created (at 0), then all locked in key order. Each one's count."""
    if not rows:
        return {}
    ordered = sorted(dict(rows).items())
    table = _COUNTERS
    await session.execute(
        _insert(session, table).on_conflict_do_nothing(
            index_elements=["account_id", "meter", "period_start"]
        ),
        [
            {"account_id": a, "meter": m, "period_start": start, "period_end": end, "used": 0}
            for (a, m, start), end in ordered
        ],
    )
    found = await session.execute(
        select(
            UsageCounter.account_id,
            UsageCounter.meter,
            UsageCounter.period_start,
            UsageCounter.used,
        )
        .where(_counter_key().in_([key for key, _ in ordered]))
        .order_by(UsageCounter.account_id, UsageCounter.meter, UsageCounter.period_start)
        .with_for_update()
    )
    return {(a, m, start): int(used) for a, m, start, used in found}


async def add_to_counter_rows(session: AsyncSession, deltas: Mapping[CounterKey, int]) -> None:
    """``add_to_counter_row`` for many rows, in one statement (the rows are locked)."""
    table = _COUNTERS
    params = [
        {"b_account": a, "b_meter": m, "b_start": start, "b_delta": delta}
        for (a, m, start), delta in sorted(deltas.items())
        if delta
    ]
    if params:
        await session.execute(
            update(table)
            .where(
                table.c.account_id == bindparam("b_account"),
                table.c.meter == bindparam("b_meter"),
                table.c.period_start == bindparam("b_start"),
            )
            .values(used=table.c.used + bindparam("b_delta")),
            params,
        )


async def delete_counter_rows_if_zero(session: AsyncSession, keys: Sequence[CounterKey]) -> None:
    """``delete_counter_row_if_zero`` for many rows, in one statement."""
    if keys:
        await session.execute(
            delete(UsageCounter)
            .where(_counter_key().in_(sorted(keys)), UsageCounter.used == 0)
            .execution_options(synchronize_session=False)
        )


def _counter_key() -> Any:
    return tuple_(UsageCounter.account_id, UsageCounter.meter, UsageCounter.period_start)


# -- writes the cutover and the rollback share ----------------------------------------------------


def put_subscription(sub: Subscription, wanted: SubscriptionData, now: datetime) -> None:
    """Set the subscription to a state's plan and overrides. ``entitlements_version`` only
    ever goes up (caches and offline files compare it), whichever way the plan moves."""
    key, version = wanted["plan"].split("@", 1)
    sub.plan_key, sub.plan_version, sub.plan_hash = key, version, wanted["plan_hash"]
    sub.overrides = dict(wanted["overrides"])
    sub.entitlements_version += 1
    sub.updated_at = now


async def put_license_overrides(
    session: AsyncSession,
    account_id: str,
    wanted: list[LicenseData],
    now: datetime,
    *,
    locked: Sequence[License] | None = None,
) -> list[str]:
    """Give the account's licenses the hand-set cap and overrides of ``wanted`` (rows of a
    state), locked (or already ``locked`` by the caller); returns the ids that changed (their
    ``version`` bumped)."""
    by_id = {lic["id"]: lic for lic in wanted}
    rows = locked
    if rows is None:
        rows = (await lock_licenses(session, [account_id]))[account_id]
    changed = []
    for row in rows:
        want = by_id.get(row.id)
        if want is None:
            continue
        if (row.max_activations_override, row.overrides or {}) != (
            want["max_activations_override"],
            want["overrides"],
        ):
            row.max_activations_override = want["max_activations_override"]
            row.overrides = dict(want["overrides"])
            row.version += 1
            row.updated_at = now
            changed.append(row.id)
    if locked is None:
        await session.flush()
    return changed


async def set_machine_modes(
    session: AsyncSession, changes: Sequence[tuple[str, str, datetime | None]]
) -> None:
    """Put each activation — (id, mode, lease) — into its mode with its lease: one statement
    for any number of them, each with its own values."""
    table = _ACTIVATIONS
    if changes:
        await session.execute(
            update(table)
            .where(table.c.id == bindparam("b_id"))
            .values(mode=bindparam("b_mode"), lease_expires_at=bindparam("b_lease")),
            [{"b_id": i, "b_mode": mode, "b_lease": lease} for i, mode, lease in changes],
        )


async def restore_activations(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Put activations back as rows of a state held them (``ActivationData`` with the
    ``account_id``): a machine activated since under the same fingerprint on the same license
    gives way to the original. Two statements for any number of them."""
    if not rows:
        return
    pairs = sorted({(r["license_id"], r["fingerprint"]) for r in rows})
    await session.execute(
        delete(Activation)
        .where(tuple_(Activation.license_id, Activation.fingerprint).in_(pairs))
        .execution_options(synchronize_session=False)
    )
    await session.execute(
        insert(Activation),
        [
            {
                "id": r["id"],
                "account_id": r["account_id"],
                "license_id": r["license_id"],
                "fingerprint": r["fingerprint"],
                "mode": r["mode"],
                "label": r["label"],
                "created_at": parse_iso(r["created_at"]),
                "last_seen_at": parse_iso(r["last_seen_at"]),
                "lease_expires_at": parse_iso(r["lease_expires_at"]),
            }
            for r in rows
        ],
    )


async def convert_now(
    session: AsyncSession, mode: str, lease: datetime | None, ids: Sequence[str]
) -> None:
    """Put the activations ``ids`` into ``mode`` with ``lease`` (see ``convert_machines``)."""
    await session.execute(
        update(Activation)
        .where(among(session, Activation.id, ids))
        .values(mode=mode, lease_expires_at=lease)
    )


async def convert_machines(
    session: AsyncSession,
    account_id: str,
    mode: str,
    lease: datetime | None,
    now: datetime,
    *,
    also: set[str] | frozenset[str] = frozenset(),
    skip: set[str] | frozenset[str] = frozenset(),
    machines: Sequence[Any] | None = None,
    pending: dict[tuple[str, datetime | None], list[str]] | None = None,
) -> list[dict[str, Any]]:
    """Put every machine of the account that holds a seat (no lease, or a lease running past
    ``now``; plus the ids in ``also``) and is not in ``mode`` into it, with ``lease`` (None for
    node-locked). Ids in ``skip`` are left as they are. A lapsed lease is a free seat, not a
    machine: left as it is. The caller holds the account's license locks (every seat change
    takes them first); ``machines``: the account's activations as ``read_machines`` gives them,
    if the caller read them; ``pending``: collects the ids by (mode, lease) for the caller to
    write with ``convert_now`` (a batch writes all its accounts' together). Returns each change with the values before and after, per
    machine."""
    floating = mode == "floating"
    rows = machines
    if rows is None:
        rows = (await read_machines(session, [account_id]))[account_id]
    changed = [
        r
        for r in rows
        if (r.mode == "floating") != floating
        and r.id not in skip
        and (r.id in also or r.lease_expires_at is None or r.lease_expires_at > now)
    ]
    if not changed:
        return []
    if pending is not None:
        pending.setdefault((mode, lease), []).extend(r.id for r in changed)
    else:
        await convert_now(session, mode, lease, [r.id for r in changed])
    return [
        {
            "id": r.id,
            "license_id": r.license_id,
            "fingerprint": r.fingerprint,
            "from": {"mode": r.mode, "lease_expires_at": iso(r.lease_expires_at)},
            "to": {"mode": mode, "lease_expires_at": iso(lease)},
        }
        for r in changed
    ]
