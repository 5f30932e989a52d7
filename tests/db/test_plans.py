"""The main pool plans every statement for its parameters (``plan_cache_mode``): a generic plan
cached while the usage history was small probed the whole history per idempotency key
(benchmarks: docs/benchmarks.md, 2026-11-24 01:2x). Whether PostgreSQL caches a bad generic
plan depends on its cost estimates at the time, which a test cannot set up reliably; this test
holds the setting that rules it out."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from keyshift.db.engine import Database


async def test_main_pool_plans_per_execution_and_the_read_pool_may_cache(db: Database) -> None:
    if db.dialect != "postgresql":
        pytest.skip("plan caching is PostgreSQL's")
    async with db.transaction() as session:
        mode = (await session.execute(text("SHOW plan_cache_mode"))).scalar_one()
    assert mode == "force_custom_plan"

    async def show(conn: AsyncConnection) -> str:
        return str((await conn.execute(text("SHOW plan_cache_mode"))).scalar_one())

    assert await db.read(show) == "auto"
