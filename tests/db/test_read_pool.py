"""Validation's reads run on their own autocommit pool without a pre-ping: a connection that
died in the pool (the database restarted) costs one retried read, never an error."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from keyshift.db.engine import Database


async def _backend_pid(db: Database) -> int:
    async def query(conn):
        return (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()

    return int(await db.read(query))


async def test_a_read_survives_its_pooled_connection_being_killed(db: Database) -> None:
    if db.dialect != "postgresql":
        pytest.skip("the separate read pool is PostgreSQL's; SQLite reads on the main engine")
    first = await _backend_pid(db)
    async with db.transaction() as session:
        await session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})

    second = await _backend_pid(db)

    assert second != first  # a fresh connection answered, and the caller saw no error
