"""What a database failure means, decided in one place: SQLite's lock is a transient conflict
(retried whole, then ``DatabaseBusy``), a database that cannot be reached is
``DatabaseUnavailable`` from every way in (transactions, reads, the native read pool), logged
once per outage; and the stale-cache window is a setting."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from keyshift.api.app import create_app
from keyshift.api.state import AppState
from keyshift.config import Settings
from keyshift.db import failures
from keyshift.db.engine import Database, HotRead
from keyshift.errors import ConfigurationError, DatabaseBusy, DatabaseUnavailable
from keyshift.validation.cache import default_cache
from tests.support import free_port


def test_sqlite_database_is_locked_is_a_transient_conflict(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'locked.db'}", connect_args={"timeout": 0})
    try:
        with engine.connect() as holder, engine.connect() as other:
            holder.exec_driver_sql("BEGIN IMMEDIATE")
            with pytest.raises(OperationalError) as raised:
                other.exec_driver_sql("BEGIN IMMEDIATE")
            holder.exec_driver_sql("ROLLBACK")
    finally:
        engine.dispose()

    assert failures.is_transient(raised.value)
    assert not failures.is_unreachable(raised.value)
    assert isinstance(failures.translate(raised.value), DatabaseBusy)


async def test_a_conflict_is_retried_whole_a_bounded_number_of_times() -> None:
    tries = 0

    async def always_rolled_back() -> None:
        nonlocal tries
        tries += 1
        raise DatabaseBusy("rolled back")

    with pytest.raises(DatabaseBusy) as raised:
        await failures.retry_whole(always_rolled_back)

    assert tries == failures.TRANSACTION_ATTEMPTS == raised.value.attempts

    async def twice_then_fine() -> str:
        nonlocal tries
        tries += 1
        if tries < 3:
            raise DatabaseBusy("rolled back")
        return "done"

    tries = 0
    assert await failures.retry_whole(twice_then_fine) == "done" and tries == 3


async def test_an_unreachable_database_is_unavailable_from_every_way_in_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing")

    async def one(conn: object) -> object:
        return await conn.execute(text("SELECT 1"))  # type: ignore[attr-defined]

    caplog.set_level(logging.INFO, logger="keyshift.db")
    try:
        with pytest.raises(DatabaseUnavailable):
            async with db.transaction() as session:
                await session.execute(text("SELECT 1"))
        with pytest.raises(DatabaseUnavailable):
            await db.read(one)
        with pytest.raises(DatabaseUnavailable):
            await db.fetch(HotRead(text("SELECT 1")), {})
    finally:
        await db.dispose()

    warnings = [r for r in caplog.records if r.name == "keyshift.db"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert "database unreachable" in warnings[0].getMessage()
    assert warnings[0].exc_info is None  # one line, no traceback
    assert db.outage.active and db.outage.failures == 3


def test_the_stale_window_is_a_setting_the_app_applies(
    monkeypatch: pytest.MonkeyPatch, app_state: AppState
) -> None:
    monkeypatch.setenv("KEYSHIFT_VALIDATION_CACHE_STALE_SECONDS", "15")
    assert Settings.from_env().validation_cache_stale_seconds == 15
    monkeypatch.setenv("KEYSHIFT_VALIDATION_CACHE_STALE_SECONDS", "-1")
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env()
    assert raised.value.field == "KEYSHIFT_VALIDATION_CACHE_STALE_SECONDS"

    before = default_cache.stale_seconds
    try:
        settings = Settings(
            database_url=app_state.settings.database_url,
            secrets_dir=app_state.settings.secrets_dir,
            validation_cache_stale_seconds=7,
        )
        create_app(state=AppState(settings=settings, db=app_state.db, secrets=app_state.secrets))
        assert default_cache.stale_seconds == 7
    finally:
        default_cache.stale_seconds = before
