"""Validation's reads run on their own autocommit pool without a pre-ping: a connection that
died in the pool (the database restarted) costs one retried read, never an error."""

from __future__ import annotations

import pytest
from sqlalchemy import Integer, String, bindparam, text

from keyshift.db.engine import Database, HotRead


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


async def test_fetch_survives_its_native_connection_being_killed(db: Database) -> None:
    if db.dialect != "postgresql":
        pytest.skip("the native read pool is PostgreSQL's; SQLite fetches through read")
    pid_query = HotRead(text("SELECT pg_backend_pid() AS pid"))
    first = (await db.fetch(pid_query, {}))[0]["pid"]
    async with db.transaction() as session:
        await session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})

    second = (await db.fetch(pid_query, {}))[0]["pid"]

    # A fresh connection answered and the caller saw no error. (Here asyncpg's pool notices
    # the terminated connection before handing it out; ``fetch`` also retries a read that
    # meets one mid-query, which a test cannot time reliably.)
    assert second != first


async def test_fetch_binds_named_parameters_in_order_on_both_databases(db: Database) -> None:
    query = HotRead(
        text("SELECT :b AS b, :a AS a, :b AS again").bindparams(
            bindparam("a", type_=Integer), bindparam("b", type_=String)
        )
    )
    rows = await db.fetch(query, {"a": 1, "b": "two"})
    assert [dict(r) for r in rows] == [{"b": "two", "a": 1, "again": "two"}]


async def test_fetch_takes_the_url_options_sqlalchemy_takes(db: Database) -> None:
    """A URL option only SQLAlchemy's adapter understands must not reach the server as a
    setting (PostgreSQL would refuse the connection)."""
    if db.dialect != "postgresql":
        pytest.skip("the native read pool is PostgreSQL's")
    other = Database(f"{db.url}?prepared_statement_cache_size=50")
    try:
        rows = await other.fetch(
            HotRead(text("SELECT current_setting('plan_cache_mode') AS m")), {}
        )
        assert rows[0]["m"] == "auto"  # the read pool keeps generic plans
    finally:
        await other.dispose()
