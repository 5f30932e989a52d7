"""After a bulk load — seeding synthetic accounts, starting a run over them — PostgreSQL has
the statistics to plan a batch's reads (``db.sql.analyze``): a batch's 200 account keys matched
with ``= ANY($1)`` use the account index. Without them PostgreSQL took the 200 keys to match the
whole table and scanned it for every batch (docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select, text

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.sql import analyze
from keyshift.db.tables import Account
from keyshift.migration.loader import load_rules
from keyshift.runs import service
from keyshift.runs.model import Cohort, RunOptions
from keyshift.security.secrets_store import Secrets
from keyshift.simulation.seed import seed

ROOT = Path(__file__).resolve().parents[2]


async def _estimate(db: Database, table: str, ids: list[str]) -> tuple[int, int]:
    """(rows PostgreSQL expects the batch's read to match, rows of the table)."""
    async with db.transaction() as session:
        plan = await session.execute(
            text(f"EXPLAIN (FORMAT JSON) SELECT * FROM {table} WHERE account_id = ANY(:ids)"),
            {"ids": ids},
        )
        expected = int(plan.scalar_one()[0]["Plan"]["Plan Rows"])
        total = (await session.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
        return expected, int(total)


async def test_a_batch_read_after_seeding_and_starting_uses_the_indexes(
    db: Database, secrets: Secrets
) -> None:
    if db.dialect != "postgresql":
        pytest.skip("the planner's statistics are PostgreSQL's")
    await seed(
        db,
        accounts=3000,
        seed=5,
        keyring=secrets.keyring,
        actor=SYSTEM,
        catalog_dir=ROOT / "examples" / "catalog",
    )
    async with db.transaction() as session:
        ids = list((await session.execute(select(Account.id).limit(200))).scalars())
    for table in ("data_objects", "activations", "licenses"):
        # 200 of 3,000 accounts: about a fifteenth of each table, not all of it (PostgreSQL's
        # guess without statistics, which made it scan the table whatever its size).
        expected, total = await _estimate(db, table, ids)
        assert expected < total / 4, (table, expected, total)

    rules, _ = load_rules(ROOT / "examples" / "migrations" / "pro-2023-to-2025.toml")
    run = await service.create(db, SYSTEM, rules, Cohort(), RunOptions(batch_size=200))
    await service.report(db, SYSTEM, run.id)
    await service.approve(db, SYSTEM.__class__(id="approver", scopes=frozenset({"admin"})), run.id)
    await service.start(db, SYSTEM, run.id)
    async with db.transaction() as session:
        analyzed = (
            await session.execute(
                text(
                    "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables"
                    " WHERE relname = 'run_accounts'"
                )
            )
        ).scalar_one()
    assert analyzed


async def test_analyze_takes_table_names_only(db: Database) -> None:
    async with db.transaction() as session:
        with pytest.raises(ValueError, match="not a table name"):
            await analyze(session, "accounts; DROP TABLE accounts")
        await analyze(session)  # nothing to do
