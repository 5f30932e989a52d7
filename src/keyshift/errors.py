"""The domain's error vocabulary: one base class with a stable ``code``.

The API maps these to HTTP statuses in ``keyshift.api.errors`` and the CLI to exit codes in
``keyshift.cli.output``; nothing else decides how an error is shown.
"""

from __future__ import annotations

from typing import Any


class KeyshiftError(Exception):
    """Base of every error the domain raises on purpose."""

    code: str = "keyshift_error"

    def __init__(self, message: str, *, field: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.details:
            body["details"] = self.details
        return body


class InvalidInput(KeyshiftError):
    """The caller sent something malformed; ``field`` names what."""

    code = "invalid_input"


class NotFound(KeyshiftError):
    code = "not_found"


class Conflict(KeyshiftError):
    """The request is well-formed but contradicts stored state (duplicate, wrong status …)."""

    code = "conflict"


class AuthenticationFailed(KeyshiftError):
    code = "unauthenticated"


class PermissionDenied(KeyshiftError):
    code = "forbidden"


class ConfigurationError(KeyshiftError):
    """The server is not set up (missing keyring, signing key, schema …)."""

    code = "not_configured"


class Unavailable(KeyshiftError):
    """The request could not be served now and nothing of it was kept; the same request may
    succeed after ``retry_after`` seconds."""

    code = "unavailable"

    def __init__(self, message: str, *, retry_after: int = 1, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after = retry_after


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached (refused, dropped, shutting down, no free connection)."""

    code = "database_unavailable"


class DatabaseBusy(Unavailable):
    """The database rolled the transaction back to break a deadlock or a serialization
    conflict (or SQLite stayed locked). ``attempts``: how many times it was tried."""

    code = "database_busy"

    def __init__(self, message: str, *, attempts: int = 1, retry_after: int = 1) -> None:
        super().__init__(message, retry_after=retry_after)
        self.attempts = attempts


# -- catalog ---------------------------------------------------------------------------------


class ManifestError(InvalidInput):
    """One or more manifest files are invalid. ``problems`` lists each (file, field, reason)."""

    code = "invalid_manifest"

    def __init__(self, problems: list[Any]) -> None:
        self.problems = problems
        lines = "; ".join(str(p) for p in problems[:5])
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{len(problems)} manifest problem(s): {lines}{more}")

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["problems"] = [p.to_dict() if hasattr(p, "to_dict") else str(p) for p in self.problems]
        return body


class PlanNotFound(NotFound):
    code = "plan_not_found"


class EditionNotFound(NotFound):
    code = "edition_not_found"


class VersionConflict(Conflict):
    """A published version exists with different content; published versions are immutable."""

    code = "version_conflict"


# -- licensing -------------------------------------------------------------------------------


class AccountNotFound(NotFound):
    code = "account_not_found"


class LicenseNotFound(NotFound):
    code = "license_not_found"


class ActivationNotFound(NotFound):
    code = "activation_not_found"


class MalformedKey(InvalidInput):
    code = "malformed_key"


class ActivationLimitReached(Conflict):
    code = "activation_limit_reached"


class LicenseNotActive(Conflict):
    code = "license_not_active"


class TokenNotFound(NotFound):
    code = "token_not_found"


class MigrationInProgress(Conflict):
    """The account already has a migration holding it (the database refused a second). Shared:
    every admin change to an account is refused with it while a migration runs, so the
    domain packages below the migration engine raise it too."""

    code = "migration_in_progress"
