"""What the app holds for its lifetime: settings, the database, the secrets, and the services
built on them (the migration engine)."""

from __future__ import annotations

from dataclasses import dataclass, field

from keyshift.api.ratelimit import TokenBucket
from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.migration.executor import Executor
from keyshift.security.abuse import AbuseSettings, AnomalyDetector
from keyshift.security.secrets_store import Secrets
from keyshift.validation.cache import default_cache


@dataclass
class AppState:
    settings: Settings
    db: Database
    secrets: Secrets
    client_bucket: TokenBucket | None = field(default=None)
    key_bucket: TokenBucket | None = field(default=None)
    token_bucket: TokenBucket | None = field(default=None)
    #: Anomaly flags (key on many machines, migration bursts); tests pass one with a clock.
    anomalies: AnomalyDetector = field(default=None)  # type: ignore[assignment]
    #: Built from ``db`` and ``secrets`` unless given (tests pass one with their own clock).
    #: It invalidates the process's validation cache, the one the validation routes read.
    executor: Executor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        s = self.settings
        if self.client_bucket is None and s.client_rate_per_second > 0:
            self.client_bucket = TokenBucket(s.client_rate_per_second, s.client_rate_burst)
        if self.key_bucket is None and s.key_rate_per_second > 0:
            self.key_bucket = TokenBucket(s.key_rate_per_second, s.key_rate_burst)
        if self.token_bucket is None and s.token_rate_per_second > 0:
            self.token_bucket = TokenBucket(s.token_rate_per_second, s.token_rate_burst)
        if self.anomalies is None:
            self.anomalies = AnomalyDetector(self.db, AbuseSettings.from_settings(s))
        if self.executor is None:
            self.executor = Executor(self.db, self.secrets.signing, cache=default_cache)
