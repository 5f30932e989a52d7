"""Token buckets for the rate limits: per client address and per license key on the
key-authenticated endpoints (validate, activate, heartbeat, deactivate, checkout, check-in,
usage), per bearer token on everything a token calls. Each is off unless configured
(``KEYSHIFT_{CLIENT,KEY,TOKEN}_RATE_PER_SECOND``; docs/operations.md).

In-process: each worker keeps its own buckets, so with N workers a client gets up to N
times the rate. Good enough to blunt key guessing from one address and a runaway client; a
shared limiter belongs in front of the server (or in PostgreSQL) if that matters.
"""

from __future__ import annotations

import math
import time

from keyshift.errors import KeyshiftError
from keyshift.observability import metrics


class RateLimited(KeyshiftError):
    """Too many requests from one client; ``retry_after`` is in whole seconds."""

    code = "rate_limited"

    def __init__(self, retry_after: float, limit: str = "address") -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        self.limit = limit  # "address" | "key" | "token"
        super().__init__(
            f"too many requests for this {limit}; retry after {self.retry_after} s", limit=limit
        )
        metrics.record_rate_limited(limit)


class TokenBucket:
    """``rate`` tokens per second per key, holding at most ``burst``."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, updated at)

    def take(self, key: str, now: float | None = None) -> float:
        """Spend one token for ``key``: 0.0 if allowed, else the seconds until one is due."""
        now = time.monotonic() if now is None else now
        tokens, updated = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket: drop those to bound memory.
        refill = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill}
        if len(self._buckets) >= self.max_keys:
            # Still full (a flood of new keys): keep the most recently used half. A client
            # being limited right now uses its bucket all the time, so a flood of other keys
            # cannot empty it (clearing everything would have handed it a fresh burst).
            recent = sorted(self._buckets.items(), key=lambda item: item[1][1])
            self._buckets = dict(recent[len(recent) // 2 :])
