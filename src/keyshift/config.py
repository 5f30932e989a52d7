"""Runtime settings, read once from the environment (``KEYSHIFT_*``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def env_number(name: str, default: float, minimum: float, maximum: float = float("inf")) -> float:
    """A numeric setting from the environment, or ConfigurationError naming the variable
    (``keyshift serve`` prints it as one line and exits before any worker starts)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not minimum <= value <= maximum:  # NaN fails this too
        from keyshift.errors import ConfigurationError

        bound = f">= {minimum:g}" if maximum == float("inf") else f"in {minimum:g}..{maximum:g}"
        raise ConfigurationError(f"{name}={raw!r}: expected a number {bound}", field=name)
    return value


def _default_home() -> Path:
    return Path(os.environ.get("KEYSHIFT_HOME", ".keyshift")).resolve()


@dataclass(frozen=True)
class Settings:
    """Where the database and the secrets live, and the server's input limits."""

    database_url: str
    secrets_dir: Path
    max_body_bytes: int = 64 * 1024
    #: The request line and headers together; more is refused with 431 (`keyshift serve`).
    max_header_bytes: int = 32 * 1024
    log_level: str = "INFO"
    #: Requests per second per client address on the key-authenticated endpoints (validate,
    #: activate, heartbeat, deactivate, checkout); 0 turns the limit off.
    client_rate_per_second: float = 0.0
    client_rate_burst: int = 50
    #: Requests per second per license key on the same endpoints; 0 turns it off.
    key_rate_per_second: float = 0.0
    key_rate_burst: int = 20
    #: Requests per second per bearer token on every token-authenticated endpoint; 0: off.
    token_rate_per_second: float = 0.0
    token_rate_burst: int = 100
    #: While the database cannot be reached, a validation whose license is in the validation
    #: cache answers from it for up to this many seconds past the entry's expiry; 0: never.
    validation_cache_stale_seconds: float = 60.0

    @classmethod
    def from_env(cls) -> Settings:
        home = _default_home()
        url = (
            os.environ.get("KEYSHIFT_DATABASE_URL") or f"sqlite+aiosqlite:///{home / 'keyshift.db'}"
        )
        secrets = Path(os.environ.get("KEYSHIFT_SECRETS_DIR", str(home / "secrets"))).resolve()
        return cls(
            database_url=normalise_database_url(url),
            secrets_dir=secrets,
            max_body_bytes=int(env_number("KEYSHIFT_MAX_BODY_BYTES", 64 * 1024, 1024)),
            max_header_bytes=int(env_number("KEYSHIFT_MAX_HEADER_BYTES", 32 * 1024, 1024)),
            log_level=os.environ.get("KEYSHIFT_LOG_LEVEL", "INFO"),
            client_rate_per_second=env_number("KEYSHIFT_CLIENT_RATE_PER_SECOND", 0, 0),
            client_rate_burst=int(env_number("KEYSHIFT_CLIENT_RATE_BURST", 50, 1)),
            key_rate_per_second=env_number("KEYSHIFT_KEY_RATE_PER_SECOND", 0, 0),
            key_rate_burst=int(env_number("KEYSHIFT_KEY_RATE_BURST", 20, 1)),
            token_rate_per_second=env_number("KEYSHIFT_TOKEN_RATE_PER_SECOND", 0, 0),
            token_rate_burst=int(env_number("KEYSHIFT_TOKEN_RATE_BURST", 100, 1)),
            validation_cache_stale_seconds=env_number(
                "KEYSHIFT_VALIDATION_CACHE_STALE_SECONDS", 60, 0, 3600
            ),
        )


def normalise_database_url(url: str) -> str:
    """Accept the URLs people paste (``postgresql://``, ``sqlite:///``) and pick the async driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://") :]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    return url
