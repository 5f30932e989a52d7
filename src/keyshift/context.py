"""Who is acting: every mutating service call takes an ``Actor`` and audits under its id."""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass, field

#: Every scope a token can hold. ``admin`` implies all of them.
SCOPES: frozenset[str] = frozenset(
    {
        "admin",
        "catalog:read",
        "catalog:write",
        "accounts:read",
        "accounts:write",
        "licenses:read",
        "licenses:write",
        "tokens:write",
        "audit:read",
        "usage:write",
        "migrations:read",
        "migrations:run",
        "migrations:approve",
        "notices:read",
        "notices:write",
    }
)


@dataclass(frozen=True)
class Actor:
    id: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    request_id: str | None = None

    def can(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def cli_actor() -> Actor:
    """The CLI acts with the authority of whoever can read the database URL and the secrets;
    it is audited as ``cli:user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Actor(id=f"cli:{user}@{socket.gethostname()}", scopes=frozenset({"admin"}))


SYSTEM = Actor(id="system", scopes=frozenset({"admin"}))
