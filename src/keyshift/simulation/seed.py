"""Seed a database with synthetic accounts (``keyshift simulate seed``): the example catalog
published, then N accounts generated from a seed (``keyshift.simulation.synthetic``) and written
in bulk — ``COPY`` on PostgreSQL, executemany ``INSERT`` on SQLite — in chunks, so memory stays
constant whatever N. The next chunk is generated in a thread while the database takes the last
one. All in one transaction, with one summary audit event: per-row events would cost more than
the rows.

A large seed on PostgreSQL (``bulk``) lifts the seeded tables' indexes and foreign keys for the
load and builds them again before it commits, as PostgreSQL's "Populating a Database" advises:
kept, every row would cost an insert at a random place in each index (the ids are uuid5, the
key lookups HMACs) and a foreign-key check (a trigger, a lookup and a row lock per row), which is
most of the server's work and grows with the tables. Rebuilt, the indexes are sorted once and
the foreign keys validated in one join each; a duplicate or a dangling reference still fails the
seed. The tables stay locked (``ACCESS EXCLUSIVE``) until it commits: seed a database nobody is
using."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from keyshift.audit import service as audit
from keyshift.catalog import loader
from keyshift.catalog import service as catalog
from keyshift.catalog.entitlements import Entitlements
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.db.sql import analyze
from keyshift.db.tables import Base
from keyshift.db.types import utcnow
from keyshift.errors import Conflict, InvalidInput
from keyshift.security.keyring import Keyring
from keyshift.simulation.synthetic import (
    COLUMNS,
    PLAN_REFS,
    TABLES,
    Generator,
    Rows,
    anchor_at,
    synthetic_id,
)

#: The largest seed ``keyshift simulate seed`` takes: past it, use several seeds.
MAX_ACCOUNTS = 10_000_000
#: Accounts generated and written per chunk (about 10 rows each).
CHUNK = 2_000
#: From this many accounts, and when the seed at least doubles the accounts, a seed on
#: PostgreSQL lifts the seeded tables' indexes and foreign keys and rebuilds them at the end.
BULK_FROM = 10_000
#: ``maintenance_work_mem`` for those rebuilds, for this transaction only: a million accounts'
#: five million data objects sort in memory.
BULK_SORT_MEMORY = "256MB"


@dataclass(frozen=True)
class SeedSummary:
    """What a seed wrote: counts per table, accounts per plan, the spread's tallies."""

    seed: int
    accounts: int
    anchor: datetime
    rows: dict[str, int]
    plans: dict[str, int]
    tallies: dict[str, int]
    seconds: float
    account_ids: tuple[str, str] = field(default=("", ""))  # the first and the last

    @property
    def accounts_per_second(self) -> float:
        return self.accounts / self.seconds if self.seconds > 0 else 0.0


async def publish_catalog(db: Database, actor: Actor, catalog_dir: Path) -> dict[str, Entitlements]:
    """Publish the manifests in ``catalog_dir`` (a no-op for those already published) and
    return the grants of the plans the spread uses."""
    manifests = loader.load(catalog_dir)
    async with db.transaction() as session:
        await catalog.publish(session, actor, manifests)
        plans: dict[str, Entitlements] = {}
        for ref in PLAN_REFS:
            _, digest = await catalog.get_plan(session, ref)
            plans[ref] = await catalog.entitlements_for(session, ref, digest)
    return plans


async def seed(
    db: Database,
    *,
    accounts: int,
    seed: int,
    keyring: Keyring,
    actor: Actor,
    catalog_dir: Path,
    at: datetime | None = None,
    chunk: int = CHUNK,
    progress: Callable[[int], None] | None = None,
    bulk: bool | None = None,
) -> SeedSummary:
    """Write ``accounts`` synthetic accounts generated from ``seed`` at the anchor ``at``
    (default: now, to the second). The same seed, anchor and keyring give the same state
    (ids, keys and their lookup hashes, everything the state checksum covers); only the key
    ciphertexts differ, their nonces being random. Conflict if this seed is already in the
    database; InvalidInput for a count out of range. ``bulk`` (PostgreSQL only; default: from
    ``BULK_FROM`` accounts when the seed at least doubles the accounts) rebuilds the seeded
    tables' indexes and foreign keys after the load instead of keeping them up row by row."""
    if not 1 <= accounts <= MAX_ACCOUNTS:
        raise InvalidInput(f"accounts must be between 1 and {MAX_ACCOUNTS:,}", field="accounts")
    if chunk < 1:
        raise InvalidInput("chunk must be at least 1", field="chunk")
    started = time.perf_counter()
    anchor = anchor_at(at or utcnow())
    plans = await publish_catalog(db, actor, catalog_dir)
    generator = Generator(seed, plans, keyring, anchor)
    first_id = synthetic_id(seed, "account", 0)
    totals: dict[str, int] = dict.fromkeys(TABLES, 0)
    plan_counts: dict[str, int] = {}
    tallies: dict[str, int] = {}
    async with db.transaction() as session:
        await _refuse_seeded(session, seed, first_id)
        connection = await session.connection()
        postgresql = connection.dialect.name == "postgresql"
        if bulk is None:
            bulk = postgresql and await _worth_lifting(session, accounts)
        lifted = await _lift(connection) if bulk and postgresql else None

        def produce(start: int) -> Rows:
            rows = generator.accounts(start, min(chunk, accounts - start))
            return _for_copy(rows) if postgresql else rows

        # The next chunk is generated in a thread while this one is written: the database's
        # share of the work (on its own core) overlaps the generation.
        pending = asyncio.ensure_future(asyncio.to_thread(produce, 0))
        try:
            for start in range(0, accounts, chunk):
                rows = await pending
                if start + chunk < accounts:
                    pending = asyncio.ensure_future(asyncio.to_thread(produce, start + chunk))
                await write(session, rows)
                _add(totals, {name: len(table) for name, table in rows.tables.items()})
                _add(plan_counts, rows.plans)
                _add(tallies, rows.tallies)
                if progress is not None:
                    progress(start + len(rows.tables["accounts"]))
        finally:
            if not pending.done():  # a write failed: let the thread finish before unwinding
                with contextlib.suppress(Exception):
                    await pending
        if lifted is not None:
            await _restore(connection, lifted)
        summary = SeedSummary(
            seed=seed,
            accounts=accounts,
            anchor=anchor,
            rows=totals,
            plans=dict(sorted(plan_counts.items())),
            tallies=dict(sorted(tallies.items())),
            seconds=0.0,
            account_ids=(first_id, synthetic_id(seed, "account", accounts - 1)),
        )
        await audit.record(
            session,
            actor,
            "simulation.seed",
            "simulation",
            f"seed:{seed}",
            details={
                "seed": seed,
                "accounts": accounts,
                "anchor": anchor.isoformat(),
                "rows": summary.rows,
                "plans": summary.plans,
            },
        )
    async with db.transaction() as session:  # the planner's statistics of what was loaded
        await analyze(session, *TABLES)
    elapsed = time.perf_counter() - started
    return SeedSummary(**{**summary.__dict__, "seconds": elapsed})


async def _refuse_seeded(session: AsyncSession, seed: int, first_id: str) -> None:
    accounts = Base.metadata.tables["accounts"]
    if (await session.execute(select(accounts.c.id).where(accounts.c.id == first_id))).first():
        raise Conflict(
            f"seed {seed} has already been written to this database; use another seed",
            field="seed",
        )


def _add(into: dict[str, int], more: dict[str, int]) -> None:
    for name, value in more.items():
        into[name] = into.get(name, 0) + value


# -- bulk writes ---------------------------------------------------------------------------------


async def write(session: AsyncSession, rows: Rows) -> None:
    """Write a chunk's rows, table by table in foreign-key order, in the session's transaction
    (on PostgreSQL, rows as ``_for_copy`` prepares them)."""
    connection = await session.connection()
    if connection.dialect.name == "postgresql":
        raw = await connection.get_raw_connection()
        driver: Any = raw.driver_connection
        for name in TABLES:
            records = rows.tables[name]
            if records:
                await driver.copy_records_to_table(
                    name, records=records, columns=list(COLUMNS[name])
                )
        return
    for name in TABLES:
        records = rows.tables[name]
        if records:
            # One compiled INSERT, executed over all rows (the driver's executemany); the
            # column types still convert each value as they do for any insert.
            columns = COLUMNS[name]
            await session.execute(
                insert(Base.metadata.tables[name]),
                [dict(zip(columns, record, strict=True)) for record in records],
            )


#: The JSON columns of each table (asyncpg's COPY takes JSON as text, as SQLAlchemy sets it up).
_JSON = {
    name: tuple(
        i
        for i, column in enumerate(COLUMNS[name])
        if column in ("attributes", "preferences", "overrides")
    )
    for name in TABLES
}


def _for_copy(rows: Rows) -> Rows:
    """The chunk with its JSON values as text, as ``COPY`` takes them (done in the generating
    thread, beside the generation)."""
    for name, positions in _JSON.items():
        if not positions:
            continue
        records = rows.tables[name]
        for n, record in enumerate(records):
            values = list(record)
            for i in positions:
                values[i] = orjson.dumps(values[i]).decode()
            records[n] = tuple(values)
    return rows


# -- bulk loads: indexes and foreign keys rebuilt after the load ---------------------------------


@dataclass(frozen=True)
class _Lifted:
    """What ``_lift`` dropped, as the statements that make it again, in order."""

    indexes: tuple[str, ...]  # unique and primary-key constraints, and plain indexes
    foreign_keys: tuple[str, ...]


async def _worth_lifting(session: AsyncSession, accounts: int) -> bool:
    """Rebuilding costs a sort of every row of the tables, the old ones too: worth it for a
    seed of ``BULK_FROM`` accounts or more that at least doubles the accounts."""
    if accounts < BULK_FROM:
        return False
    table = Base.metadata.tables["accounts"]
    existing = await session.scalar(select(func.count()).select_from(table))
    return accounts >= (existing or 0)


#: The foreign keys on the seeded tables; the indexes of the seeded tables, but those another
#: table's foreign key stands on (accounts' primary key: migrations and runs refer to it).
_LIFTED_FOREIGN_KEYS = """
SELECT format('ALTER TABLE %I ADD CONSTRAINT %I %s', c.conrelid::regclass::text, c.conname,
              pg_get_constraintdef(c.oid)),
       format('ALTER TABLE %I DROP CONSTRAINT %I', c.conrelid::regclass::text, c.conname)
FROM pg_constraint c
WHERE c.contype = 'f' AND c.conrelid = ANY($1::regclass[])
ORDER BY c.conrelid::regclass::text, c.conname
"""
_LIFTED_INDEXES = """
SELECT CASE WHEN c.oid IS NULL THEN pg_get_indexdef(i.indexrelid)
            ELSE format('ALTER TABLE %I ADD CONSTRAINT %I %s', i.indrelid::regclass::text,
                        c.conname, pg_get_constraintdef(c.oid)) END,
       CASE WHEN c.oid IS NULL THEN format('DROP INDEX %s', i.indexrelid::regclass::text)
            ELSE format('ALTER TABLE %I DROP CONSTRAINT %I', i.indrelid::regclass::text,
                        c.conname) END
FROM pg_index i
LEFT JOIN pg_constraint c
  ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid AND c.contype IN ('p', 'u')
WHERE i.indrelid = ANY($1::regclass[])
  AND NOT EXISTS (
    SELECT FROM pg_constraint f
    WHERE f.contype = 'f' AND f.conindid = i.indexrelid AND NOT f.conrelid = ANY($1::regclass[]))
ORDER BY i.indrelid::regclass::text, i.indexrelid::regclass::text
"""


async def _lift(connection: AsyncConnection) -> _Lifted:
    """Drop the seeded tables' foreign keys and the indexes no other table's foreign key
    needs, in this transaction; return what makes them again."""
    driver = await _driver(connection)
    tables = list(TABLES)
    foreign_keys = await driver.fetch(_LIFTED_FOREIGN_KEYS, tables)
    indexes = await driver.fetch(_LIFTED_INDEXES, tables)
    for _, drop in [*foreign_keys, *indexes]:
        await driver.execute(drop)
    return _Lifted(tuple(make for make, _ in indexes), tuple(make for make, _ in foreign_keys))


async def _restore(connection: AsyncConnection, lifted: _Lifted) -> None:
    """Build the lifted indexes (sorted, once) and validate the foreign keys (a join each)."""
    driver = await _driver(connection)
    await driver.execute(f"SET LOCAL maintenance_work_mem = '{BULK_SORT_MEMORY}'")
    for statement in (*lifted.indexes, *lifted.foreign_keys):
        await driver.execute(statement)


async def _driver(connection: AsyncConnection) -> Any:
    raw = await connection.get_raw_connection()
    return raw.driver_connection
