"""The async engine and the unit of work.

One I/O model for the whole server side: async SQLAlchemy with asyncpg on PostgreSQL and
aiosqlite on SQLite. The CLI enters it through ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg  # type: ignore[import-untyped]
import orjson
from sqlalchemy import event
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.sql.expression import ClauseElement, Executable

from keyshift.db import failures
from keyshift.errors import DatabaseUnavailable, Unavailable

T = TypeVar("T")


async def _leave_session_as_is(_connection: Any) -> None:
    return None


async def _json_codecs(connection: Any) -> None:
    """JSON and JSONB as Python values, as SQLAlchemy's JSON columns give them."""
    for name in ("json", "jsonb"):
        await connection.set_type_codec(
            name,
            encoder=lambda value: orjson.dumps(value).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


class HotRead:
    """A read-only statement for the hot path, compiled once for asyncpg (``$1`` …) and kept as
    it is for SQLite; run it with ``Database.fetch``."""

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        compiled = statement.compile(dialect=asyncpg_dialect())  # type: ignore[no-untyped-call]
        self.sql: str = compiled.string
        self.names: list[str] = list(getattr(compiled, "positiontup", None) or ())


#: Connections per worker for validation's reads on PostgreSQL, unless ``Database`` is given
#: another number (the app passes ``KEYSHIFT_DB_READ_POOL_SIZE``).
READ_POOL_SIZE = 10
#: Connection arguments SQLAlchemy's asyncpg adapter takes for itself (asyncpg would send
#: them to the server as settings, and the server would refuse them).
_ADAPTER_ONLY = (
    "prepared_statement_cache_size",
    "prepared_statement_name_func",
    "async_fallback",
    "async_creator_fn",
)
#: What a connection the server dropped raises on its next use in asyncpg.
_DEAD_CONNECTION = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # a connection terminated mid-operation
    ConnectionError,
)


def _json_loads(text: str | bytes) -> Any:
    """orjson's reader, and the standard library's for what orjson refuses (a lone surrogate
    escape, which SQLite's JSON text may hold)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _json_dumps(value: Any) -> str:
    """orjson's writer; the standard library's for what orjson refuses (an integer past 64
    bits, a key that is not a string)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value)


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """Create the engine; on SQLite also WAL mode, foreign keys and write-serialising transactions."""
    parsed = make_url(url)
    # JSON columns are read and written with orjson: the migration rows carry whole account states, and
    # the standard library's decoder was a tenth of a migration worker's CPU.
    kwargs.setdefault("json_deserializer", _json_loads)
    kwargs.setdefault("json_serializer", _json_dumps)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {"timeout": 30})
        engine = create_async_engine(url, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    kwargs.setdefault("pool_pre_ping", True)
    # Plan every statement for its parameters, never from a cached generic plan. asyncpg
    # prepares statements per connection, and after five runs PostgreSQL may switch one to a
    # generic plan chosen when a table was small, then keep it until the table is analysed
    # again. Measured: the idempotency probe of usage ingest went to a generic plan on the
    # history index (a scan of the account's whole history per key, 1.3 s per batch of
    # 1,000 at 11,000 events) instead of the unique index (1.6 ms). Planning these short
    # statements costs far less than one such plan. (The read pool, ``Database.read``, keeps
    # generic plans: its statements have one possible plan.)
    connect_args = dict(kwargs.get("connect_args") or {})
    settings = dict(connect_args.get("server_settings") or {})
    settings.setdefault("plan_cache_mode", "force_custom_plan")
    kwargs["connect_args"] = {**connect_args, "server_settings": settings}
    return create_async_engine(url, **kwargs)


def _configure_sqlite(engine: AsyncEngine) -> None:
    # pysqlite's own transaction handling defers BEGIN and would let two writers both read
    # before either writes. We take the write lock at BEGIN (IMMEDIATE) so that a
    # read-check-write (activation caps, the audit head) is serialised, as row locks do on PG.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """An engine and its session factory; ``transaction()`` is the unit of work."""

    def __init__(
        self,
        url: str,
        *,
        report_outages: bool = True,
        read_pool_size: int = READ_POOL_SIZE,
        **engine_kwargs: Any,
    ) -> None:
        self.url = url
        self.read_pool_size = read_pool_size
        self.engine = create_engine(url, **engine_kwargs)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._engine_kwargs = engine_kwargs
        self._reader: AsyncEngine | None = None
        self._native: Any = None  # asyncpg.Pool, made on first use (``fetch``)
        self._native_lock = asyncio.Lock()
        #: Logs an outage once (``failures.OutageLog``), not per failed request; a CLI command
        #: says it in its own one-line error instead (``report_outages=False``).
        self.outage = failures.OutageLog(report=report_outages)
        self._translated = _Translated(self)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def read(self, query: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run a read-only ``query`` on a pooled connection in autocommit: no BEGIN/COMMIT
        around it, so a single statement costs one round trip (it still sees one consistent
        snapshot: each statement is its own transaction). For the hot read paths (validation).

        A connection that died in the pool (the database restarted) fails its first statement;
        SQLAlchemy then invalidates it and the pool, and the read is retried once on a fresh
        connection: reads are idempotent, so this is safe. ``query`` must only read."""
        reader = self._reader or self._make_reader()
        with self._translated:
            for attempt in (1, 2):
                try:
                    async with reader.connect() as conn:
                        result = await query(conn)
                    break
                except DBAPIError as exc:
                    if attempt == 2 or not exc.connection_invalidated:
                        raise
        return result

    async def fetch(self, query: HotRead, params: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """Run a ``HotRead`` and return its rows as mappings. On PostgreSQL through a native
        asyncpg pool (``KEYSHIFT_DB_READ_POOL_SIZE`` connections, autocommit, statements
        prepared once per connection): SQLAlchemy's pool checkout and result machinery cost
        about 200 µs of CPU around a 60 µs query, and validation of a metered plan runs one
        on every request. A connection the server dropped fails once and the read is retried
        on another (reads are idempotent). On SQLite, ``read``."""
        if self.engine.dialect.name != "postgresql":

            async def run(conn: AsyncConnection) -> list[Mapping[str, Any]]:
                result = await conn.execute(cast(Executable, query.statement), dict(params))
                return [dict(row) for row in result.mappings()]

            return await self.read(run)
        args = [params[name] for name in query.names]
        with self._translated:
            pool = self._native or await self._make_native()
            for attempt in (1, 2):
                try:
                    rows = list(await pool.fetch(query.sql, *args))
                    break
                except _DEAD_CONNECTION:
                    if attempt == 2:
                        raise
        return rows

    async def _make_native(self) -> Any:
        async with self._native_lock:
            if self._native is None:
                self._native = await asyncpg.create_pool(
                    **self._native_connect_args(),
                    # No floor: asyncpg (0.32) keeps a floor by reconnecting in the background,
                    # and while the database is down it logs a traceback for every attempt.
                    # Connections are made on demand instead (and stay, below).
                    min_size=0,
                    max_size=self.read_pool_size,
                    max_inactive_connection_lifetime=3600,
                    # The pool's default reset on release (advisory unlocks, CLOSE ALL, UNLISTEN,
                    # RESET ALL) is a round trip per read; ``fetch`` runs single statements
                    # that leave no session state behind (an open transaction is still rolled
                    # back by asyncpg itself).
                    reset=_leave_session_as_is,
                    init=_json_codecs,
                )
        return self._native

    def _native_connect_args(self) -> dict[str, Any]:
        """What the engine's connections are opened with — the URL read by SQLAlchemy's
        asyncpg dialect (``?ssl=require`` and the like), then ``connect_args`` — minus what
        only SQLAlchemy's adapter understands, and minus the main pool's plan setting."""
        _, url_args = asyncpg_dialect().create_connect_args(make_url(self.url))  # type: ignore[no-untyped-call]
        given = dict(self._engine_kwargs.get("connect_args") or {})
        args = {**url_args, **given}
        for adapter_only in _ADAPTER_ONLY:
            args.pop(adapter_only, None)
        settings = dict(args.get("server_settings") or {})
        settings.pop("plan_cache_mode", None)
        if settings:
            args["server_settings"] = settings
        else:
            args.pop("server_settings", None)
        return args

    def _make_reader(self) -> AsyncEngine:
        """``read``'s engine. On PostgreSQL its own small pool, in autocommit and without the
        pre-ping: the asyncpg ping is BEGIN, ``;``, ROLLBACK on every checkout, three round
        trips in front of a one-statement read; ``read`` retries a read that met a dead
        connection instead. (The main pool keeps its ping: a write is not retried.) On SQLite
        the main engine, in its transactions (BEGIN IMMEDIATE … ROLLBACK)."""
        if self.engine.dialect.name != "postgresql":
            self._reader = self.engine
        else:
            kwargs = {**self._engine_kwargs, "pool_pre_ping": False}
            # As large as the main pool: connections above ``pool_size`` are closed when they
            # come back to a pool that already holds ``pool_size`` idle ones, so a pool smaller
            # than the usual concurrency opens and closes a connection every few requests
            # (measured: ~120 new sessions/s at 1,500 usage validations/s with 5 + 10).
            # No overflow: above ``pool_size`` a read waits for a connection instead of opening
            # and closing one, and the per-worker connection count stays bounded.
            kwargs.setdefault("pool_size", self.read_pool_size)
            kwargs.setdefault("max_overflow", 0)
            kwargs.setdefault("pool_recycle", 3600)
            self._reader = create_async_engine(self.url, isolation_level="AUTOCOMMIT", **kwargs)
        return self._reader

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One transaction: commits when the block ends, rolls back if it raises. A deadlock
        or serialization failure comes out as ``DatabaseBusy`` (``run`` retries it), an
        unreachable database as ``DatabaseUnavailable``; both are answered 503."""
        with self._translated:
            async with self.sessions() as session, session.begin():
                yield session

    async def run(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction, and run the whole of it again when the database
        rolled it back to break a deadlock or serialization conflict (``failures.retry_whole``:
        bounded, with jitter). ``work`` must do nothing outside the session that a second run
        would repeat."""

        async def once() -> T:
            async with self.transaction() as session:
                return await work(session)

        return await failures.retry_whole(once)

    def _failed(self, error: Exception) -> Unavailable | None:
        """The domain error a database failure means (an outage is logged once, by
        ``outage``), or None: ``error`` is raised as it is."""
        translated = failures.translate(error)
        if isinstance(translated, DatabaseUnavailable):
            self.outage.failed(error)
        return translated

    async def dispose(self) -> None:
        if self._native is not None:
            await self._native.close()
            self._native = None
        if self._reader is not None and self._reader is not self.engine:
            await self._reader.dispose()
        self._reader = None
        await self.engine.dispose()


class _Translated:
    """``with db._translated:`` around database work: a failure inside comes out as the domain
    error it means (``Database._failed``; other errors pass as they are), and a success while
    an outage is on ends it. One object per database, so the hot reads pay two method calls."""

    __slots__ = ("_db",)

    def __init__(self, db: Database) -> None:
        self._db = db

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _tb: Any
    ) -> None:
        if error is None:
            if self._db.outage.active:
                self._db.outage.recovered()
            return None
        if not isinstance(error, Exception):
            return None  # cancellation, GeneratorExit: not a database failure
        translated = self._db._failed(error)
        if translated is None:
            return None
        raise translated from error
