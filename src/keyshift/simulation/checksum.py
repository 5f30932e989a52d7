"""The state checksum: one SHA-256 over the migration-relevant state of many accounts, to tell
whether two databases (or one database before and after a run and its rollback) hold the same
accounts in the same state.

It is SHA-256 over the concatenated per-account state hashes (``keyshift.migration.state``:
the hash a migration's snapshot records in the ledger, 64 hex digits each) in account id order.
So the checksum of one account is SHA-256 of its ledger snapshot hash, and any difference it
shows can be found account by account with ``account_hashes``. The state leaves out what moves
on its own (an activation's ``last_seen_at`` and ``lease_expires_at``); counters are those of
the periods current at ``at``. Read in chunks of accounts in id order, in one transaction
(REPEATABLE READ on PostgreSQL: one snapshot), so memory stays constant.

The outcome checksum (``outcome_checksum``) is the same over a view of each state that leaves
out what differs between two runs reaching the same outcome: the ids of data objects (an
archive copy's id derives from its migration's random id) and the instant a grace ends (set
from the migration's clock), counted instead in whole days after ``at``. It tells whether two
rehearsals of the same seed ended in the same state, however many workers moved the accounts.

``across_runs=True`` compares two databases that ran the same migrations at different moments
(a rehearsal and its undisturbed twin): what a migration derives from its own random id and its
own moment is written relative to them. An archive copy's id becomes ``archive:<original id>``
(the id is a hash of the migration's id and the original's), and a grace's end becomes the time
from the moment the account's migration was planned (``+30 days, 0:00:00``, not a date). All
else is hashed as it is, so two runs that differ in anything else still differ.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from keyshift.canonical import content_hash
from keyshift.db.engine import Database
from keyshift.db.tables import Account, DataObject, Migration, MigrationStep
from keyshift.db.types import utcnow
from keyshift.migration.repository import read_states
from keyshift.migration.state import (
    Snapshot,
    derived_id,
    hashable,
    parse_iso,
    sort_state,
    state_hash,
)
from keyshift.states import CUT_OVER, Step

CHUNK = 1_000


async def state_checksum(
    db: Database,
    account_ids: Iterable[str] | None = None,
    *,
    at: datetime | None = None,
    chunk: int = CHUNK,
    across_runs: bool = False,
) -> str:
    """SHA-256 (hex) over the state hashes of ``account_ids`` (default: every account) in id
    order; ids with no account are left out. Equal on SQLite and PostgreSQL for equal data.
    ``across_runs``: what migrations derive from their ids and moments, relative to them (see
    the module's docstring)."""
    digest = hashlib.sha256()
    hashes = account_hashes(db, account_ids, at=at, chunk=chunk, across_runs=across_runs)
    async for _, account_hash in hashes:
        digest.update(account_hash.encode())
    return digest.hexdigest()


async def account_hashes(
    db: Database,
    account_ids: Iterable[str] | None = None,
    *,
    at: datetime | None = None,
    chunk: int = CHUNK,
    across_runs: bool = False,
) -> AsyncIterator[tuple[str, str]]:
    """(account id, state hash) for each account, in id order, read ``chunk`` accounts at a
    time in one transaction (``across_runs``: as ``state_checksum``)."""
    states = account_states(db, account_ids, at=at, chunk=chunk, across_runs=across_runs)
    async for state in states:
        yield state["account"]["id"], state_hash(state)


async def outcome_checksum(
    db: Database,
    account_ids: Iterable[str] | None = None,
    *,
    at: datetime,
    chunk: int = CHUNK,
) -> str:
    """SHA-256 (hex) over the outcome hashes (``outcome_hash``) of ``account_ids`` (default:
    every account) in id order: equal for two databases whose accounts reached the same
    outcome, whichever migrations (and so whichever random ids and clock readings) got them
    there. ``at`` is the instant the data is anchored on (a seed's anchor)."""
    digest = hashlib.sha256()
    async for state in account_states(db, account_ids, at=at, chunk=chunk):
        digest.update(outcome_hash(state, at).encode())
    return digest.hexdigest()


def outcome_hash(state: Mapping[str, Any], at: datetime) -> str:
    return content_hash(outcome_view(state, at))


def outcome_view(state: Mapping[str, Any], at: datetime) -> dict[str, Any]:
    """What ``state_hash`` covers, less what two runs to the same outcome may differ in: data
    objects without their ids (sorted by what they hold instead), and a grace's end as whole
    days after ``at`` (a migration sets it from its own clock: now + the rules' days)."""
    view = hashable(state)
    view["objects"] = sorted(
        ({k: v for k, v in o.items() if k != "id"} for o in view.get("objects", [])),
        key=lambda o: tuple(str(o.get(k)) for k in sorted(o)),
    )
    subscription = view.get("subscription")
    grace = (subscription or {}).get("overrides", {}).get("grace")
    if subscription is not None and grace is not None:
        until = parse_iso(grace.get("until"))
        days = None if until is None else round((until - at) / timedelta(days=1))
        view["subscription"] = {
            **subscription,
            "overrides": {
                **subscription["overrides"],
                "grace": {**{k: v for k, v in grace.items() if k != "until"}, "until_days": days},
            },
        }
    return view


async def account_states(
    db: Database,
    account_ids: Iterable[str] | None = None,
    *,
    at: datetime | None = None,
    chunk: int = CHUNK,
    across_runs: bool = False,
) -> AsyncIterator[Snapshot]:
    """Each account's state (``read_states``), in id order, read ``chunk`` accounts at a time
    in one transaction (``across_runs``: as ``state_checksum``)."""
    now = at or utcnow()
    async with db.engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection = await connection.execution_options(isolation_level="REPEATABLE READ")
        async with connection.begin():
            async for ids in _chunks(connection, account_ids, chunk):
                states = await read_states(connection, ids, now)
                if across_runs:
                    states = await _relative_to_migrations(connection, ids, states)
                for state in states:
                    yield state


async def _relative_to_migrations(
    connection: AsyncConnection, ids: list[str], states: list[Snapshot]
) -> list[Snapshot]:
    """The states with each archive copy's id written as its original's, and each grace's end
    as the time from its migration's plan (the snapshot step: the moment the planner used)."""
    made_by = await connection.execute(
        select(DataObject.id, DataObject.migration_id).where(
            DataObject.account_id.in_(ids), DataObject.migration_id.is_not(None)
        )
    )
    copies = {object_id: migration_id for object_id, migration_id in made_by if migration_id}
    planned: dict[str, datetime] = {}
    rows = await connection.execute(
        select(MigrationStep.account_id, MigrationStep.at)
        .join(Migration, Migration.id == MigrationStep.migration_id)
        .where(
            MigrationStep.account_id.in_(ids),
            MigrationStep.step == Step.SNAPSHOT,
            Migration.state.in_(list(CUT_OVER)),
        )
        .order_by(MigrationStep.at)
    )
    for account_id, at in rows:
        planned[account_id] = at if at.tzinfo else at.replace(tzinfo=UTC)  # the latest wins
    return [_relative(state, copies, planned.get(state["account"]["id"])) for state in states]


def _relative(state: Snapshot, copies: dict[str, str], planned: datetime | None) -> Snapshot:
    out: Any = copy.deepcopy(state)
    objects = out["objects"]
    for obj in objects:
        migration_id = copies.get(obj["id"])
        if migration_id is None:
            continue
        for original in objects:
            if derived_id(migration_id, "archive", original["id"]) == obj["id"]:
                obj["id"] = f"archive:{original['id']}"
                break
    grace = ((out.get("subscription") or {}).get("overrides") or {}).get("grace")
    until = parse_iso(grace.get("until")) if grace else None
    if grace and until is not None and planned is not None:
        grace["until"] = f"+{until - planned}"
    result: Snapshot = sort_state(out)
    return result


async def _chunks(
    connection: AsyncConnection, account_ids: Iterable[str] | None, chunk: int
) -> AsyncIterator[list[str]]:
    """Account ids in order, ``chunk`` at a time: the given ones sorted, or every account's,
    read by keyset (``id > last``) so each read is an index range."""
    if account_ids is not None:
        ordered = sorted(set(account_ids))
        for start in range(0, len(ordered), chunk):
            yield ordered[start : start + chunk]
        return
    last: str | None = None
    while True:
        query = select(Account.id).order_by(Account.id).limit(chunk)
        if last is not None:
            query = query.where(Account.id > last)
        ids = list((await connection.execute(query)).scalars())
        if not ids:
            return
        if ids != sorted(ids) or (last is not None and ids[0] <= last):
            # The checksum's order is the ids' code-point order, which SQLite's and a C or
            # C.UTF-8 collation's agree on; a linguistic collation would reorder them.
            raise RuntimeError(
                "the database orders account ids differently from their code points "
                "(a linguistic collation?); the state checksum needs C or C.UTF-8"
            )
        yield ids
        last = ids[-1]
