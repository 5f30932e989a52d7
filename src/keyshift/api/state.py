"""What the app holds for its lifetime: settings, the database, the secrets."""

from __future__ import annotations

from dataclasses import dataclass, field

from keyshift.api.ratelimit import TokenBucket
from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.security.secrets_store import Secrets


@dataclass
class AppState:
    settings: Settings
    db: Database
    secrets: Secrets
    client_bucket: TokenBucket | None = field(default=None)

    def __post_init__(self) -> None:
        if self.client_bucket is None and self.settings.client_rate_per_second > 0:
            self.client_bucket = TokenBucket(
                self.settings.client_rate_per_second, self.settings.client_rate_burst
            )
