"""A cutover tells other processes' validation caches, when it commits: one ``NOTIFY
keyshift_validation`` message ``account:<id>`` per account, also when a batch cuts over many
accounts in one statement (PostgreSQL; SQLite has one process)."""

from __future__ import annotations

import asyncio

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy.engine import make_url

from keyshift.context import SYSTEM
from keyshift.db import changes
from keyshift.db.engine import Database
from keyshift.migration.executor import Executor
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers


async def test_a_batch_cutover_notifies_each_account_once_after_commit(
    db: Database, secrets: Secrets
) -> None:
    if db.dialect != "postgresql":
        pytest.skip("NOTIFY is PostgreSQL's")
    await helpers.publish(db)
    accounts = [(await helpers.rich_account(db, secrets))[0] for _ in range(3)]
    url = make_url(db.url).set(drivername="postgresql").render_as_string(hide_password=False)
    heard: list[str] = []
    listener = await asyncpg.connect(url)
    try:
        await listener.add_listener(
            changes.CHANNEL, lambda _conn, _pid, _channel, message: heard.append(message)
        )
        executor = Executor(db, secrets.signing)
        locked = await executor.request_many(
            SYSTEM, helpers.rules(), [(account_id, None) for account_id in accounts]
        )
        ids = [m.id for m in locked.values() if not isinstance(m, Exception)]
        assert len(ids) == 3
        results = await executor.run_batch(SYSTEM, ids)
        assert {r.state for r in results.values() if not isinstance(r, Exception)} == {"completed"}
        for _ in range(50):  # delivery is asynchronous: wait for it, bounded
            if len(heard) >= 3:
                break
            await asyncio.sleep(0.05)
    finally:
        await listener.close()
    assert sorted(heard) == sorted(f"account:{a}" for a in accounts)
