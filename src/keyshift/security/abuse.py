"""Abuse signals: anomaly flags for a license key presented from many machines and for bursts of
migration requests, raised as audit events and a metric.

Both detectors are in-process, like the rate limits (``api/ratelimit.py``): each worker sees the
requests it serves, so with N workers a pattern spread evenly needs up to N times the threshold
before one worker flags it. They exist to make key sharing and runaway automation *visible*
(an ``anomaly.*`` audit event, ``keyshift_anomalies_total{kind}``, a warning log line), not to
refuse anyone: refusing is the rate limits' job. Each flag fires once per subject per window.

Thresholds (``AbuseSettings``, from the environment):

- ``KEYSHIFT_ANOMALY_WINDOW`` (seconds, default 3600): the window both detectors count in.
- ``KEYSHIFT_ANOMALY_FINGERPRINTS_MIN`` (default 10) and ``..._PER_SEAT`` (default 3): a key
  whose license caps activations at ``cap`` is flagged when more than
  ``max(MIN, PER_SEAT * cap)`` distinct fingerprints present it within the window. Licenses
  without a cap (usage plans) do not bind to machines and are not watched.
- ``KEYSHIFT_ANOMALY_MIGRATIONS`` (default 60): more migration requests than this from one
  token within the window is a burst.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keyshift.audit import service as audit
from keyshift.config import Settings
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.observability import metrics

log = logging.getLogger("keyshift.anomaly")

#: The actor anomaly events are written by.
DETECTOR = Actor(id="system:anomaly-detector")

KEY_MANY_FINGERPRINTS = "key_many_fingerprints"
#: Keys whose limit is above this many machines are not watched (memory per key is bounded).
MAX_WATCHED_MACHINES = 10_000
MIGRATION_BURST = "migration_burst"


@dataclass(frozen=True)
class AbuseSettings:
    window_seconds: float = 3600.0
    fingerprints_min: int = 10
    fingerprints_per_seat: int = 3
    migrations_per_window: int = 60

    @classmethod
    def from_settings(cls, settings: Settings) -> AbuseSettings:
        return cls(
            window_seconds=settings.anomaly_window,
            fingerprints_min=settings.anomaly_fingerprints_min,
            fingerprints_per_seat=settings.anomaly_fingerprints_per_seat,
            migrations_per_window=settings.anomaly_migrations,
        )

    @classmethod
    def from_env(cls) -> AbuseSettings:
        """The thresholds the environment sets, through ``Settings`` (a bad value is a
        ConfigurationError naming the variable)."""
        return cls.from_settings(Settings.from_env())

    def fingerprint_limit(self, cap: int) -> int:
        return max(self.fingerprints_min, self.fingerprints_per_seat * cap)


@dataclass
class _Seen:
    """One subject's window: when it started, the distinct values or the count so far, and
    whether it has been flagged in this window."""

    started: float
    values: set[int] = field(default_factory=set)  # hashes of the values: 8 bytes, not 255
    count: int = 0
    flagged: bool = False


class _Windows:
    """Per-subject fixed windows, bounded: at most ``max_subjects`` subjects (expired windows
    go first, then the older half)."""

    default_max_subjects = 10_000

    def __init__(
        self,
        window_seconds: float,
        *,
        max_subjects: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_seconds = window_seconds
        self.max_subjects = max_subjects or self.default_max_subjects
        self._clock = clock
        self._seen: dict[str, _Seen] = {}

    def _window(self, subject: str) -> _Seen:
        now = self._clock()
        seen = self._seen.get(subject)
        if seen is None or now - seen.started >= self.window_seconds:
            if seen is None and len(self._seen) >= self.max_subjects:
                self._forget_oldest(now)
            seen = self._seen[subject] = _Seen(now)
        return seen

    def _forget_oldest(self, now: float) -> None:
        live = {k: v for k, v in self._seen.items() if now - v.started < self.window_seconds}
        if len(live) >= self.max_subjects:
            ordered = sorted(live.items(), key=lambda item: item[1].started)
            live = dict(ordered[len(ordered) // 2 :])
        self._seen = live


class DistinctInWindow(_Windows):
    """Distinct values seen per subject in a fixed window; reports a subject the first time
    its count passes a limit within a window. At most ``limit + 1`` values per subject."""

    default_max_subjects = 100_000

    def observe(self, subject: str, value: str, limit: int) -> int | None:
        """Count ``value`` for ``subject``; the distinct count if this pushed it past
        ``limit`` for the first time in the current window, else None."""
        seen = self._window(subject)
        digest = hash(value)  # salted per process; a collision only undercounts by one
        if seen.flagged or digest in seen.values:
            return None
        seen.values.add(digest)
        if len(seen.values) <= limit:
            return None
        seen.flagged = True
        count, seen.values = len(seen.values), set()  # flagged: the values are not needed
        return count


class CountInWindow(_Windows):
    """Events per subject in a fixed window; reports the first time a subject passes
    ``limit`` within a window."""

    default_max_subjects = 10_000

    def observe(self, subject: str, limit: int) -> int | None:
        seen = self._window(subject)
        seen.count += 1
        if seen.count == limit + 1:
            seen.flagged = True
            return seen.count
        return None


class AnomalyDetector:
    """The app's detectors and the writer of their events."""

    def __init__(
        self,
        db: Database,
        settings: AbuseSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.settings = settings or AbuseSettings()
        self.fingerprints = DistinctInWindow(self.settings.window_seconds, clock=clock)
        self.migrations = CountInWindow(self.settings.window_seconds, clock=clock)
        self._writes: set[asyncio.Task[None]] = set()

    def key_presented(
        self,
        lookup: str,
        fingerprint: str | None,
        cap: int | None,
        *,
        license_id: str,
        account_id: str,
        request_id: str | None = None,
    ) -> None:
        """A license (found by ``lookup``) was presented from ``fingerprint``."""
        if fingerprint is None or cap is None:
            return
        limit = self.settings.fingerprint_limit(cap)
        if limit > MAX_WATCHED_MACHINES:
            return  # a fleet this large is not watched: its set would cost megabytes
        seen = self.fingerprints.observe(lookup, fingerprint, limit)
        if seen is not None:
            self._flag(
                KEY_MANY_FINGERPRINTS,
                "license",
                license_id,
                account_id,
                {
                    "distinct_fingerprints": seen,
                    "limit": limit,
                    "max_activations": cap,
                    "window_seconds": self.settings.window_seconds,
                },
                request_id,
            )

    def migration_requested(self, actor: Actor, *, request_id: str | None = None) -> None:
        """A migration request (plan, apply, rollback …) arrived from ``actor``."""
        limit = self.settings.migrations_per_window
        count = self.migrations.observe(actor.id, limit)
        if count is not None:
            self._flag(
                MIGRATION_BURST,
                "token",
                actor.id,
                None,
                {
                    "requests": count,
                    "limit": limit,
                    "window_seconds": self.settings.window_seconds,
                },
                request_id,
            )

    def _flag(
        self,
        kind: str,
        target_type: str,
        target_id: str,
        account_id: str | None,
        details: dict[str, Any],
        request_id: str | None,
    ) -> None:
        metrics.record_anomaly(kind)
        log.warning(
            "anomaly: %s on %s %s",
            kind,
            target_type,
            target_id,
            extra={"anomaly": kind, "target": target_id, "details": details},
        )
        # Written off the request's path and transaction: the request that tripped the
        # detector is answered as usual whether or not the event can be stored.
        task = asyncio.get_running_loop().create_task(
            self._write(kind, target_type, target_id, account_id, details, request_id)
        )
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(
        self,
        kind: str,
        target_type: str,
        target_id: str,
        account_id: str | None,
        details: dict[str, Any],
        request_id: str | None,
    ) -> None:
        actor = Actor(id=DETECTOR.id, request_id=request_id)
        try:
            async with self.db.transaction() as session:
                await audit.record(
                    session,
                    actor,
                    f"anomaly.{kind}",
                    target_type,
                    target_id,
                    account_id=account_id,
                    details=details,
                )
        except Exception:  # logged, never raised into a request
            log.exception("could not store the anomaly event %s on %s", kind, target_id)

    async def drain(self) -> None:
        """Wait for pending event writes (shutdown, tests)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
