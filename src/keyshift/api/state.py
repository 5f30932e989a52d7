"""What the app holds for its lifetime: settings, the database, the secrets."""

from __future__ import annotations

from dataclasses import dataclass

from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.security.secrets_store import Secrets


@dataclass
class AppState:
    settings: Settings
    db: Database
    secrets: Secrets
