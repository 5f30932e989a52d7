"""Runtime settings: every ``KEYSHIFT_*`` variable, read from the environment once, when a command
or the app starts (never at import), and checked then — a bad value is one
``ConfigurationError`` naming the variable.

Some variables are read elsewhere on purpose. ``PROMETHEUS_MULTIPROC_DIR`` belongs to
prometheus-client, which reads it itself (``observability/metrics.py``); the ``OTEL_*``
variables belong to OpenTelemetry, whose SDK reads them itself — keyshift only looks whether an
OTLP endpoint is set, to trace at all (``observability/tracing.py``). ``KEYSHIFT_FAULT_POINT``
is the crash tests' fault-injection hook (``migration/batching.py``): it is not configuration —
an operator never sets it — so it is read where the fault fires, and it is not documented here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The prefix of every variable: field ``max_body_bytes`` is ``KEYSHIFT_MAX_BODY_BYTES``.
ENV_PREFIX = "KEYSHIFT_"
#: Longest usage window, in the unit of its variable (ten years in minutes).
_MAX_WINDOW = 10 * 365 * 24 * 60

LogLevel = Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Burst = Annotated[int, Field(ge=1)]


class Settings(BaseSettings):
    """Where the database and the secrets live, the server's limits, the validation cache, the
    anomaly detectors and the usage windows. Each field is the variable ``KEYSHIFT_<FIELD>``;
    docs/operations.md lists them all (a test holds the table to this class)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,  # VAR= means "the default", as an unset variable does
        frozen=True,
        extra="ignore",
    )

    #: Base directory of the two defaults below.
    home: Path = Path(".keyshift")
    #: Default: SQLite in ``home``; any URL is normalised to its async driver.
    database_url: str
    #: Default: ``home/secrets``.
    secrets_dir: Path
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    #: The request line and headers together; more is refused with 431 (`keyshift serve`).
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    log_level: LogLevel = "INFO"
    #: Requests per second per client address on the key-authenticated endpoints (validate,
    #: activate, heartbeat, deactivate, checkout); 0 turns the limit off.
    client_rate_per_second: Rate = 0.0
    client_rate_burst: Burst = 50
    #: Requests per second per license key on the same endpoints; 0 turns it off.
    key_rate_per_second: Rate = 0.0
    key_rate_burst: Burst = 20
    #: Requests per second per bearer token on every token-authenticated endpoint; 0: off.
    token_rate_per_second: Rate = 0.0
    token_rate_burst: Burst = 100
    #: Seconds a validation cache entry lives with no invalidation listener; 0: no cache.
    validation_cache_ttl: Seconds = 1.0
    #: Seconds an entry lives while the PostgreSQL LISTEN connection is up (a backstop).
    validation_cache_ttl_listening: Seconds = 300.0
    #: Licenses each process's validation cache holds at most.
    validation_cache_size: int = Field(100_000, ge=1)
    #: While the database cannot be reached, a validation whose license is in the validation
    #: cache answers from it for up to this many seconds past the entry's expiry; 0: never.
    validation_cache_stale_seconds: float = Field(60.0, ge=0, le=3600, allow_inf_nan=False)
    #: Connections per worker for validation's reads on PostgreSQL.
    db_read_pool_size: int = Field(10, ge=1)
    anomaly_window: float = Field(3600.0, ge=1, allow_inf_nan=False)
    anomaly_fingerprints_min: int = Field(10, ge=1)
    anomaly_fingerprints_per_seat: int = Field(3, ge=1)
    anomaly_migrations: int = Field(60, ge=1)
    idempotency_window_hours: float = Field(72.0, ge=48, le=_MAX_WINDOW, allow_inf_nan=False)
    usage_clock_skew_minutes: float = Field(5.0, ge=0, le=_MAX_WINDOW, allow_inf_nan=False)
    usage_late_hours: float = Field(48.0, ge=0, le=_MAX_WINDOW, allow_inf_nan=False)
    #: Four eyes: the person who created a migration run may not approve it.
    runs_four_eyes: bool = False
    #: The CLI prints the traceback of an unexpected error.
    debug: bool = False
    #: The CLI acts through this server's HTTP API instead of the local database (`--server`).
    server: str | None = None
    #: The bearer token the CLI sends to ``server``; never printed.
    token: SecretStr | None = None
    #: Customer notices: how many days before a run's announced date its ``scheduled``
    #: notices are sent (``keyshift runs announce``).
    notice_lead_days: int = Field(7, ge=0, le=365)
    #: Seconds a webhook delivery may take (connect, send, answer) before it counts as failed.
    webhook_timeout: float = Field(10.0, gt=0, le=300, allow_inf_nan=False)
    #: Deliveries of one notice before it goes to the dead-letter list.
    webhook_max_attempts: int = Field(8, ge=1, le=100)
    #: The first retry's delay in seconds; each next one doubles, up to the maximum below.
    webhook_backoff_seconds: float = Field(30.0, gt=0, le=86400, allow_inf_nan=False)
    webhook_backoff_max_seconds: float = Field(6 * 3600.0, gt=0, le=7 * 86400, allow_inf_nan=False)

    @classmethod
    def from_env(cls) -> Settings:
        """The settings from the environment, or ConfigurationError naming the variable(s) whose
        value is wrong, on one line (the CLI prints it and exits before anything starts)."""
        try:
            return cls()
        except ValidationError as error:
            raise configuration_error(error) from None

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _defaults_under_home(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        home = Path(str(data.get("home") or ".keyshift")).resolve()
        return {
            "database_url": f"sqlite:///{home / 'keyshift.db'}",
            "secrets_dir": home / "secrets",
            **data,
        }

    @field_validator("home", "secrets_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.resolve()

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        return normalise_database_url(value)


def env_name(field: str) -> str:
    """The variable that sets ``field``."""
    return f"{ENV_PREFIX}{field.upper()}"


def configuration_error(error: ValidationError) -> Exception:
    """``error`` as one line: ``KEYSHIFT_X='abc': <what was expected>`` per wrong variable."""
    from keyshift.errors import ConfigurationError

    problems: list[tuple[str, str]] = []
    for problem in error.errors(include_url=False):
        field = str(problem["loc"][0]) if problem["loc"] else ""
        name = env_name(field) if field else ENV_PREFIX + "*"
        expected = problem["msg"][0].lower() + problem["msg"][1:]
        problems.append((name, f"{name}={problem['input']!r}: {expected}"))
    return ConfigurationError("; ".join(text for _, text in problems), field=problems[0][0])


def normalise_database_url(url: str) -> str:
    """Accept the URLs people paste (``postgresql://``, ``sqlite:///``) and pick the async driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://") :]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    return url
