"""What a database failure means to the caller, decided in one place: a transient conflict (a
deadlock, a serialization failure, SQLite's lock) for which a whole transaction may run again,
an outage (the database cannot be reached), or neither (a bug, a constraint: raised as it is).
Also the one retry policy for whole transactions, and the once-per-outage log.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from keyshift.errors import DatabaseBusy, DatabaseUnavailable, KeyshiftError, Unavailable

T = TypeVar("T")
log = logging.getLogger("keyshift.db")

#: deadlock_detected, serialization_failure: PostgreSQL rolled the transaction back whole.
TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})
#: Besides class 08 (connection exceptions): admin/crash shutdown, starting up, too many
#: connections.
UNREACHABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
_SQLITE_BUSY = ("database is locked", "database is busy", "database table is locked")
_SQLITE_UNREACHABLE = ("unable to open database file", "disk i/o error")
_NETWORK_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE}
)
_ASYNCPG_UNREACHABLE = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InternalClientError,  # a connection terminated mid-operation
)

#: Tries of one transaction (the first and the retries) before a conflict is answered 503.
TRANSACTION_ATTEMPTS = 4
#: Seconds a client is told to wait (``Retry-After``) after a 503 for the database.
RETRY_AFTER_SECONDS = 1


def sqlstate(error: BaseException) -> str | None:
    orig = error.orig if isinstance(error, DBAPIError) else error
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def _sqlite_message(error: DBAPIError) -> str | None:
    return str(error.orig).lower() if isinstance(error.orig, sqlite3.Error) else None


def is_transient(error: BaseException) -> bool:
    """The database rolled the whole transaction back to break a conflict with another one:
    the same transaction, run again, may well succeed."""
    if not isinstance(error, DBAPIError):
        return False
    if sqlstate(error) in TRANSIENT_SQLSTATES:
        return True
    message = _sqlite_message(error)
    return message is not None and any(text in message for text in _SQLITE_BUSY)


def _is_network(error: BaseException) -> bool:
    if isinstance(error, ConnectionError | TimeoutError | socket.gaierror):
        return True
    return isinstance(error, OSError) and error.errno in _NETWORK_ERRNOS


def is_unreachable(error: BaseException) -> bool:
    """The database cannot be reached: refused, dropped, shutting down or starting up, out of
    connections, or no pooled connection came free in time."""
    if isinstance(error, (PoolTimeout, *_ASYNCPG_UNREACHABLE)) or _is_network(error):
        return True
    if isinstance(error, asyncpg.exceptions.InterfaceError):
        return "closed" in str(error) or "connection" in str(error).lower()
    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return True
        code = sqlstate(error)
        if code is not None and (code.startswith("08") or code in UNREACHABLE_SQLSTATES):
            return True
        message = _sqlite_message(error)
        if message is not None:
            return any(text in message for text in _SQLITE_UNREACHABLE)
        return error.orig is not None and error.orig is not error and is_unreachable(error.orig)
    return False


def describe(error: BaseException) -> str:
    """One line naming the failure (for the log; never the caller's business)."""
    inner = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    first = (str(inner).strip().splitlines() or [""])[0]
    return f"{type(inner).__name__}: {first}" if first else type(inner).__name__


def translate(error: BaseException) -> Unavailable | None:
    """The domain error a database failure means, or None if it means neither a transient
    conflict nor an outage (then it is raised as it is)."""
    if isinstance(error, KeyshiftError):
        return None
    if is_transient(error):
        return DatabaseBusy(
            "the database rolled this request back to resolve a conflict with another one;"
            " nothing of it was kept, try again",
            retry_after=RETRY_AFTER_SECONDS,
        )
    if is_unreachable(error):
        return DatabaseUnavailable(
            "the database cannot be reached; try again shortly", retry_after=RETRY_AFTER_SECONDS
        )
    return None


#: The pause before each retry: random in [0, 20 ms * 2^(n-1)], at most 0.5 s (jitter, so the
#: transactions that collided do not collide again).
_PAUSE = wait_random_exponential(multiplier=0.02, max=0.5)


async def retry_whole(work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` again while it fails with ``DatabaseBusy``: at most
    ``TRANSACTION_ATTEMPTS`` tries, with a random (jittered) exponential pause before each
    retry. ``work`` must be a whole unit: one transaction, or a request whose one transaction
    is all it writes — never the second half of something whose first half committed. When
    every try failed, the last ``DatabaseBusy`` is raised with ``attempts`` set (the API
    answers it 503)."""
    try:
        # The first try costs no retry machinery: a tenacity loop is ~70 µs, as much as a
        # cached validation, and nearly every unit succeeds at once.
        return await work()
    except DatabaseBusy as first:
        log.info("retrying a transaction the database rolled back: %s", first.message)
    await asyncio.sleep(random.uniform(0, 0.02))  # the first pause, as _PAUSE would choose it
    retrying = AsyncRetrying(
        stop=stop_after_attempt(TRANSACTION_ATTEMPTS - 1),
        wait=_PAUSE,
        retry=retry_if_exception_type(DatabaseBusy),
        before_sleep=before_sleep_log(log, logging.INFO),
        reraise=True,
    )
    try:
        return await retrying(work)
    except DatabaseBusy as exc:
        exc.attempts = 1 + int(retrying.statistics.get("attempt_number", 1))
        raise


class OutageLog:
    """Logs an outage once: one warning when the database first cannot be reached, one info
    line when it answers again — not a traceback per failed request."""

    def __init__(self, *, report: bool = True) -> None:
        self.report = report
        self.since: float | None = None
        self.failures = 0

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, error: BaseException) -> None:
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            if not self.report:
                return
            log.warning(
                "database unreachable (%s); requests that need it are answered 503 until it"
                " is back",
                describe(error),
            )

    def recovered(self) -> None:
        if self.since is None:
            return
        if self.report:
            log.info(
                "database reachable again after %.1f s (%d database calls failed meanwhile)",
                time.monotonic() - self.since,
                self.failures,
            )
        self.since, self.failures = None, 0
