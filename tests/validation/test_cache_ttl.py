"""The validation cache keeps entries long only while it hears every invalidation."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.security.secrets_store import Secrets
from keyshift.validation import cache
from keyshift.validation.decide import LicenseState
from tests import factories
from tests.support import LiveServer, cli_env, invoke_keyshift


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _entry(n: int) -> cache.CachedLicense:
    return cache.CachedLicense(LicenseState(f"L{n}", f"A{n}", "active", None, None, 1), None)


def test_entries_live_long_only_while_listening() -> None:
    clock = Clock()
    lru = cache.LicenseStateCache(ttl_seconds=1, listening_ttl_seconds=300, clock=clock)
    lru.put("deaf", _entry(0), generation=lru.generation)
    lru.listening = True
    lru.put("heard", _entry(1), generation=lru.generation)

    clock.now = 2.0

    assert lru.get("deaf") is None  # the short TTL: nothing guaranteed it was current
    assert lru.get("heard") is not None
    clock.now = 301.0
    assert lru.get("heard") is None  # the long TTL is still a backstop


async def test_a_lost_listener_expires_every_entry_and_falls_back_to_the_short_ttl(
    db: Database,
) -> None:
    if db.dialect != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; SQLite relies on the TTL")
    other = cache.LicenseStateCache(ttl_seconds=1, listening_ttl_seconds=300)
    listener = await cache.start_listener(db.url, other)
    assert listener is not None and other.listening
    other.put("k", _entry(0), generation=other.generation)
    assert len(other) == 1

    await listener.stop()  # the connection is gone: invalidations can no longer be heard

    # No entry is served any more while the database answers; each is kept only as the
    # answer for while the database cannot be reached (``get_stale``, bounded).
    assert not other.listening and other.get("k") is None
    assert other.get_stale("k") is not None


def test_an_expired_entry_answers_during_an_outage_only_within_the_stale_window() -> None:
    clock = Clock()
    lru = cache.LicenseStateCache(ttl_seconds=1, stale_seconds=30, clock=clock)
    lru.put("k", _entry(0), generation=lru.generation)
    lru.put("gone", _entry(1), generation=lru.generation)
    lru.invalidate_license("gone")

    clock.now = 20.0
    assert lru.get("k") is None  # expired: read the database again
    assert lru.get_stale("k") is not None  # …unless it cannot be reached
    assert lru.get_stale("gone") is None  # an invalidated entry never answers
    clock.now = 31.0
    assert lru.get("k") is None and lru.get_stale("k") is None
    assert len(lru) == 0  # dropped once past the window


@pytest.mark.server
@pytest.mark.server_env(KEYSHIFT_VALIDATION_CACHE_TTL="6")
async def test_a_suspension_from_another_process_shows_within_the_ttl_on_sqlite_at_once_on_postgres(
    live_server: LiveServer, settings: Settings, db: Database, secrets: Secrets
) -> None:
    # docs/operations.md: each worker caches validations; on SQLite nothing tells the other
    # processes of a change, so it shows there when the entry expires (the TTL, 6 s here).
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)
    row, key = await factories.issue_license(db, secrets, account.id)
    url = f"{live_server.base_url}/v1/licenses/validate"
    async with httpx.AsyncClient(timeout=10) as client:

        async def code() -> str:
            return str((await client.post(url, json={"key": key})).json()["code"])

        assert await code() == "VALID"  # now in the server's cache
        cached_at = time.monotonic()
        suspended = invoke_keyshift(cli_env(settings), "licenses", "suspend", row.id)
        assert suspended.returncode == 0, suspended.stderr
        if db.dialect == "sqlite":
            assert await code() == "VALID"  # stale, within the TTL
            deadline = cached_at + 6 + 2
        else:
            deadline = time.monotonic() + 2  # NOTIFY reaches the server at commit
        for _ in range(200):
            answer = await code()
            if answer == "SUSPENDED" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    assert answer == "SUSPENDED"
