"""The in-process cache the validation hot path reads: license state by key lookup hash.

Correctness first. An entry lives at most ``ttl_seconds`` (default 1 s, env
``KEYSHIFT_VALIDATION_CACHE_TTL``; 0 disables the cache): that is the staleness bound when
nobody invalidates. Services that change a license, its activations or its account's plan
call ``keyshift.db.changes.announce`` in their transaction: ``default_cache`` (subscribed to
those announcements) drops the entry when the transaction commits, and on PostgreSQL a
``NOTIFY`` in the same transaction reaches every other process's ``InvalidationListener``. Entitlements are immutable per plan hash, so an
entry carries them too.

While the database cannot be reached, validation answers from an entry up to
``stale_seconds`` past its expiry (``get_stale``; ``KEYSHIFT_VALIDATION_CACHE_STALE_SECONDS``
in ``Settings``): no change can be committed through this process meanwhile, and the window
bounds what another process could have changed unheard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keyshift.db import changes
from keyshift.db.changes import CHANNEL

if TYPE_CHECKING:
    from keyshift.catalog.entitlements import Entitlements
    from keyshift.config import Settings
    from keyshift.validation.decide import LicenseState

log = logging.getLogger("keyshift.cache")

# The defaults of the ``KEYSHIFT_VALIDATION_CACHE_*`` settings; ``configure`` applies the
# settings to the process's cache when the app starts.
DEFAULT_TTL = 1.0
DEFAULT_SIZE = 100_000
#: While the LISTEN connection is up every change is pushed to this process, so an entry can
#: live much longer: the TTL is only a backstop then.
LISTENING_TTL = 300.0
#: Seconds past its expiry an entry still answers while the database cannot be reached (0: never).
DEFAULT_STALE = 60.0


@dataclass(frozen=True)
class CachedLicense:
    state: LicenseState
    entitlements: Entitlements | None  # None: the account has no plan


class LicenseStateCache:
    """A bounded LRU with a TTL, and a generation counter against a lost invalidation.

    A loader reads ``generation`` before it queries and passes it to ``put``: if its license
    or its account was invalidated in between, the (possibly stale) result is not stored. Each
    invalidation is remembered by the generation it made, per license and per account, so
    invalidations of other accounts do not cost a load its place in the cache (a migration run
    invalidates a batch of accounts every second or so: with one global counter, every load in
    flight then was thrown away). Past ``TRACKED`` remembered invalidations they are forgotten
    and every load older than that moment is refused, as after ``clear``. One instance per
    process (``default_cache``); it is used from one event loop and takes no locks.
    """

    #: Invalidations remembered per license and per account before they are forgotten.
    TRACKED = 100_000

    def __init__(
        self,
        ttl_seconds: float = DEFAULT_TTL,
        max_entries: int = DEFAULT_SIZE,
        clock: Callable[[], float] = time.monotonic,
        listening_ttl_seconds: float = LISTENING_TTL,
        stale_seconds: float = DEFAULT_STALE,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.stale_seconds = stale_seconds
        self.listening_ttl_seconds = listening_ttl_seconds
        #: Set by ``InvalidationListener`` while it hears other processes' invalidations.
        self.listening = False
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, CachedLicense]] = OrderedDict()
        self._by_account: dict[str, set[str]] = {}
        self.generation = 0
        #: A load that began before this generation is not stored (``clear``, ``expire_all``,
        #: or the remembered invalidations forgotten).
        self._floor = 0
        #: The generation each license (by lookup) and each account was last invalidated at.
        self._invalidated: dict[str, int] = {}
        self.hits = 0
        self.misses = 0

    def configure(self, settings: Settings) -> None:
        """Apply the ``KEYSHIFT_VALIDATION_CACHE_*`` settings (the app does, as it starts)."""
        self.ttl_seconds = settings.validation_cache_ttl
        self.listening_ttl_seconds = settings.validation_cache_ttl_listening
        self.max_entries = settings.validation_cache_size
        self.stale_seconds = settings.validation_cache_stale_seconds

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:  # an empty cache is still a cache (`cache or default` bit us)
        return True

    def get(self, lookup: str) -> CachedLicense | None:
        found = self._entries.get(lookup)
        if found is None or self._clock() >= found[0]:
            if found is not None and self._clock() >= found[0] + self.stale_seconds:
                self._drop(lookup)  # (kept until then for ``get_stale``)
            self.misses += 1
            return None
        self._entries.move_to_end(lookup)
        self.hits += 1
        return found[1]

    def get_stale(self, lookup: str) -> CachedLicense | None:
        """The entry even if expired, up to ``stale_seconds`` past its expiry: what validation
        answers from while the database cannot be reached. Nothing invalidated is kept."""
        found = self._entries.get(lookup)
        if found is None or self._clock() >= found[0] + self.stale_seconds:
            return None
        return found[1]

    def put(self, lookup: str, value: CachedLicense, *, generation: int) -> None:
        if self.ttl_seconds <= 0 or self._changed_since(lookup, value, generation):
            return
        ttl = (
            max(self.ttl_seconds, self.listening_ttl_seconds)
            if self.listening
            else self.ttl_seconds
        )
        self._drop(lookup)
        self._entries[lookup] = (self._clock() + ttl, value)
        self._by_account.setdefault(value.state.account_id, set()).add(lookup)
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))

    def _changed_since(self, lookup: str, value: CachedLicense, generation: int) -> bool:
        """Whether the license or its account was invalidated after ``generation``."""
        if generation == self.generation:
            return False
        if generation < self._floor:
            return True
        seen = self._invalidated
        return (
            seen.get("license:" + lookup, -1) > generation
            or seen.get("account:" + value.state.account_id, -1) > generation
        )

    def _remember(self, key: str) -> None:
        self.generation += 1
        if len(self._invalidated) >= self.TRACKED:
            self._invalidated.clear()
            self._floor = self.generation
        self._invalidated[key] = self.generation

    def _drop(self, lookup: str) -> None:
        found = self._entries.pop(lookup, None)
        if found is not None:
            lookups = self._by_account.get(found[1].state.account_id)
            if lookups is not None:
                lookups.discard(lookup)
                if not lookups:
                    del self._by_account[found[1].state.account_id]

    def invalidate_license(self, lookup: str) -> None:
        """Forget one license (by its key lookup hash, ``License.key_lookup``)."""
        self._remember("license:" + lookup)
        self._drop(lookup)

    def invalidate_account(self, account_id: str) -> None:
        """Forget every license of an account (its plan or entitlements changed)."""
        self._remember("account:" + account_id)
        for lookup in list(self._by_account.get(account_id, ())):
            self._drop(lookup)

    def clear(self) -> None:
        self.generation += 1
        self._floor = self.generation
        self._invalidated.clear()
        self._entries.clear()
        self._by_account.clear()

    def expire_all(self) -> None:
        """Expire every entry now (the next validation reads the database), keeping each
        only for ``get_stale``: for when invalidations may have gone unheard."""
        self.generation += 1
        self._floor = self.generation
        self._invalidated.clear()
        now = self._clock()
        for lookup in list(self._entries):
            expires, value = self._entries[lookup]
            if expires > now:
                self._entries[lookup] = (now, value)

    def apply(self, message: str) -> None:
        """Apply an invalidation message: ``license:<lookup>``, ``account:<id>`` or ``clear``."""
        kind, _, value = message.partition(":")
        if kind == "license" and value:
            self.invalidate_license(value)
        elif kind == "account" and value:
            self.invalidate_account(value)
        else:
            self.clear()  # unknown or "clear": the safe answer is to forget everything


#: The process's cache; the validation routes use it. It hears every change announced in this
#: process (``keyshift.db.changes``) when the announcing transaction commits.
default_cache = LicenseStateCache()
changes.subscribe(default_cache.apply)

# -- cross-process: PostgreSQL LISTEN --------------------------------------------------------


class InvalidationListener:
    """Applies ``NOTIFY keyshift_validation`` messages from other processes to a cache.

    Start it in the app's lifespan on PostgreSQL. While disconnected it cannot hear anything,
    so on every (re)connect it clears the cache; the TTL bounds staleness meanwhile.
    """

    def __init__(
        self, database_url: str, cache: LicenseStateCache, *, retry_seconds: float = 1.0
    ) -> None:
        self.dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self.cache = cache
        self.retry_seconds = retry_seconds
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reported_down = False  # one warning per outage, not one per reconnect attempt

    async def start(self, *, wait_seconds: float = 5.0) -> None:
        self._task = asyncio.create_task(self._run(), name="keyshift-cache-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), wait_seconds)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.cache.apply(payload)

    async def _run(self) -> None:
        import asyncpg  # type: ignore[import-untyped]

        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                self.cache.clear()  # whatever was sent while we were away is lost
                self.cache.listening = True
                self.connected.set()
                if self._reported_down:
                    log.info("cache listener reconnected")
                    self._reported_down = False
                while not lost.is_set() and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnect on anything; never take the server down
                if self._reported_down:
                    log.debug("cache listener still disconnected: %s", exc)
                else:
                    log.warning("cache listener disconnected: %s; reconnecting", exc)
                    self._reported_down = True
            finally:
                if self.cache.listening:
                    # Deaf from now on: long-lived entries could go stale unheard. They are
                    # expired (read again from the database), kept only to answer while the
                    # database cannot be reached (``get_stale``).
                    self.cache.listening = False
                    self.cache.expire_all()
                self.connected.clear()
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(self.retry_seconds)


async def start_listener(
    database_url: str, cache: LicenseStateCache | None = None
) -> InvalidationListener | None:
    """Start a listener on PostgreSQL (None on SQLite, where the TTL is the bound)."""
    if not database_url.startswith("postgresql"):
        return None
    listener = InvalidationListener(database_url, cache if cache is not None else default_cache)
    await listener.start()
    return listener
