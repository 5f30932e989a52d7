"""Seed a database with synthetic accounts (``keyshift simulate seed``): the example catalog
published, then N accounts generated from a seed (``keyshift.simulation.synthetic``) and written
in bulk — ``COPY`` on PostgreSQL, multi-row ``INSERT`` on SQLite — in chunks, so memory stays
constant whatever N. All in one transaction, with one summary audit event: per-row events
would cost more than the rows."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit import service as audit
from keyshift.catalog import loader
from keyshift.catalog import service as catalog
from keyshift.catalog.entitlements import Entitlements
from keyshift.context import Actor
from keyshift.db.engine import Database
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
) -> SeedSummary:
    """Write ``accounts`` synthetic accounts generated from ``seed`` at the anchor ``at``
    (default: now, to the second). The same seed, anchor and keyring give the same state
    (ids, keys and their lookup hashes, everything the state checksum covers); only the key
    ciphertexts differ, their nonces being random. Conflict if this seed is already in the
    database; InvalidInput for a count out of range."""
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
        for start in range(0, accounts, chunk):
            rows = generator.accounts(start, min(chunk, accounts - start))
            await write(session, rows)
            _add(totals, {name: len(table) for name, table in rows.tables.items()})
            _add(plan_counts, rows.plans)
            _add(tallies, rows.tallies)
            if progress is not None:
                progress(start + len(rows.tables["accounts"]))
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
    """Write a chunk's rows, table by table in foreign-key order, in the session's transaction."""
    connection = await session.connection()
    if connection.dialect.name == "postgresql":
        raw = await connection.get_raw_connection()
        driver: Any = raw.driver_connection
        for name in TABLES:
            records = rows.tables[name]
            if records:
                await driver.copy_records_to_table(
                    name, records=_for_copy(name, records), columns=list(COLUMNS[name])
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


def _for_copy(name: str, records: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    positions = _JSON[name]
    if not positions:
        return list(records)
    out = []
    for record in records:
        values = list(record)
        for i in positions:
            values[i] = orjson.dumps(values[i]).decode()
        out.append(tuple(values))
    return out
