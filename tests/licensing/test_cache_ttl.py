"""The validation cache keeps entries long only while it hears every invalidation."""

from __future__ import annotations

import pytest

from keyshift.db.engine import Database
from keyshift.licensing import cache
from keyshift.licensing.validation import LicenseState


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


async def test_a_lost_listener_clears_and_falls_back_to_the_short_ttl(db: Database) -> None:
    if db.dialect != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; SQLite relies on the TTL")
    other = cache.LicenseStateCache(ttl_seconds=1, listening_ttl_seconds=300)
    listener = await cache.start_listener(db.url, other)
    assert listener is not None and other.listening
    other.put("k", _entry(0), generation=other.generation)
    assert len(other) == 1

    await listener.stop()  # the connection is gone: invalidations can no longer be heard

    assert not other.listening and len(other) == 0
