"""Announce a change after commit: the low-level half of cache invalidation.

A service that changes a license, its activations or its account's plan calls ``announce`` in
its transaction. The message (``license:<lookup>``, ``account:<id>`` or ``clear``) is queued on
the session and handed, when the transaction commits (not before: a reader in between would
re-cache the old state), to every callback registered with ``subscribe`` — or only to ``to``
when the caller names one. On PostgreSQL a ``NOTIFY`` on ``CHANNEL`` in the same transaction
reaches every other process's listener exactly when it commits.

This module knows nothing of what listens: the validation cache (``keyshift.validation.cache``)
subscribes itself, so the writers below it need not import it.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

#: The NOTIFY channel other processes listen on; its name and messages are a wire format.
CHANNEL = "keyshift_validation"

Subscriber = Callable[[str], None]

_PENDING = "keyshift.cache.pending"
_subscribers: list[Subscriber] = []


def subscribe(callback: Subscriber) -> None:
    """Hand every committed message to ``callback`` (once per callback, however often called)."""
    if callback not in _subscribers:
        _subscribers.append(callback)


def message_for(lookup: str | None, account_id: str | None) -> str:
    if lookup is not None:
        return f"license:{lookup}"
    if account_id is not None:
        return f"account:{account_id}"
    return "clear"


async def announce(
    session: AsyncSession,
    *,
    lookup: str | None = None,
    account_id: str | None = None,
    to: Subscriber | None = None,
) -> None:
    """Announce a change when the caller's transaction commits. Give ``lookup`` for one
    license, ``account_id`` for all of an account's, neither for everything; ``to`` hands the
    message to that callback only instead of to the subscribers. On PostgreSQL also
    ``pg_notify`` in the same transaction, so other processes hear of it when it commits."""
    message = message_for(lookup, account_id)
    pending: list[tuple[Subscriber | None, str]] = session.sync_session.info.setdefault(
        _PENDING, []
    )
    pending.append((to, message))
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(
            text("SELECT pg_notify(:channel, :message)"), {"channel": CHANNEL, "message": message}
        )


async def announce_accounts(
    session: AsyncSession, account_ids: list[str], *, to: Subscriber | None = None
) -> None:
    """``announce`` for each of many accounts: the same messages, and on PostgreSQL one
    statement for all their ``pg_notify`` calls (a batch of migrations cuts over together)."""
    if not account_ids:
        return
    messages = [message_for(None, account_id) for account_id in account_ids]
    pending: list[tuple[Subscriber | None, str]] = session.sync_session.info.setdefault(
        _PENDING, []
    )
    pending += [(to, message) for message in messages]
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(
            text("SELECT pg_notify(:channel, m) FROM unnest(CAST(:messages AS text[])) AS m"),
            {"channel": CHANNEL, "messages": messages},
        )


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    for to, message in session.info.pop(_PENDING, []):
        for callback in [to] if to is not None else list(_subscribers):
            callback(message)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)
