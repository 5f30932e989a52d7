"""Small SQL helpers shared by the set-based queries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, any_, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession


def dialect_name(session: AsyncSession | AsyncConnection) -> str:
    """The name of the database dialect ``session`` talks to ("postgresql", "sqlite")."""
    if isinstance(session, AsyncConnection):
        return session.dialect.name
    bind = session.bind
    return bind.dialect.name if bind is not None else ""


def among(
    session: AsyncSession | AsyncConnection, column: Any, values: Iterable[Any]
) -> ColumnElement[bool]:
    """``column IN values`` for a batch's keys. On PostgreSQL it is ``column = ANY($1)`` with
    one array parameter: the same plan, but one bind instead of one per value — SQLAlchemy
    renders (and asyncpg describes) an IN list of 200 keys anew for each statement, which cost
    more CPU than the query (1.8 ms vs 0.4 ms for 200 keys on the reference machine)."""
    values = list(values)
    if dialect_name(session) == "postgresql":
        return column == any_(bindparam(None, values, type_=ARRAY(column.type)))  # type: ignore[no-any-return]
    return column.in_(values)  # type: ignore[no-any-return]


async def analyze(session: AsyncSession | AsyncConnection, *tables: str) -> None:
    """Refresh PostgreSQL's statistics of ``tables`` after a bulk write (SQLite: nothing).

    A batch's keys are matched with ``= ANY($1)``. Without statistics on the column — a table
    just loaded, before autovacuum has looked at it — PostgreSQL takes each of 200 keys to match
    1/200 of the rows, the whole table in all, and scans it instead of using the index: measured
    on a run started right after seeding 100,000 accounts, 94 million rows of ``data_objects``
    read for 37,000 accounts, and the run three times slower than on a smaller database."""
    for table in tables:
        if not table.isidentifier():
            raise ValueError(f"not a table name: {table!r}")
    if dialect_name(session) != "postgresql" or not tables:
        return
    await session.execute(text("ANALYZE " + ", ".join(tables)))
