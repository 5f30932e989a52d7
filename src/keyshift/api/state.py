"""What the app holds for its lifetime: settings, the database, the secrets, and the services
built on them (the migration engine)."""

from __future__ import annotations

from dataclasses import dataclass, field

from keyshift.api.ratelimit import TokenBucket
from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.licensing.cache import default_cache
from keyshift.migration.executor import Executor
from keyshift.security.secrets_store import Secrets


@dataclass
class AppState:
    settings: Settings
    db: Database
    secrets: Secrets
    client_bucket: TokenBucket | None = field(default=None)
    #: Built from ``db`` and ``secrets`` unless given (tests pass one with their own clock).
    #: It invalidates the process's validation cache, the one the validation routes read.
    executor: Executor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.client_bucket is None and self.settings.client_rate_per_second > 0:
            self.client_bucket = TokenBucket(
                self.settings.client_rate_per_second, self.settings.client_rate_burst
            )
        if self.executor is None:
            self.executor = Executor(self.db, self.secrets.signing, cache=default_cache)
