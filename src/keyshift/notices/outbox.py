"""The outbox: notice rows written in the caller's transaction, with the change they
announce, so a change that rolls back announces nothing and one that commits is announced
once. Rows are built as plain dicts and inserted together (one statement per batch); each
row's ``key`` makes a replayed step insert nothing twice."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Insert, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.db.tables import Notice
from keyshift.notices.kinds import NoticeKind, NoticeState


def notice(
    kind: NoticeKind,
    account_id: str,
    *,
    now: datetime,
    about: str,
    payload: dict[str, Any],
    migration_id: str | None = None,
    run_id: str | None = None,
    due: datetime | None = None,
) -> dict[str, Any]:
    """One outbox row: ``kind`` of notice to ``account_id`` about ``about`` (a migration or a
    run, which with the kind and the account makes its deterministic key), sent from ``due``
    (default: at once)."""
    return {
        "id": str(uuid.uuid4()),
        "key": f"{kind}:{about}:{account_id}",
        "account_id": account_id,
        "kind": kind,
        "state": NoticeState.PENDING,
        "migration_id": migration_id,
        "run_id": run_id,
        "payload": payload,
        "created_at": now,
        "next_attempt_at": max(due, now) if due is not None else now,
        "attempts": 0,
    }


def _insert(session: AsyncSession) -> Insert:
    # ON CONFLICT (key) DO NOTHING on both databases: a row already written stays as it is.
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(Notice).on_conflict_do_nothing(index_elements=["key"])
    return sqlite.insert(Notice).on_conflict_do_nothing(index_elements=["key"])


async def write(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Insert the rows in one statement, in the caller's transaction."""
    if rows:
        await session.execute(_insert(session), list(rows))


async def cancel(
    session: AsyncSession,
    *,
    kinds: Iterable[NoticeKind],
    migration_ids: Sequence[str] = (),
    run_id: str | None = None,
    reason: str,
) -> None:
    """Cancel the pending notices of ``kinds`` about these migrations (or this run): what they
    announce will not happen. Delivered ones stay as they are."""
    about: list[ColumnElement[bool]] = []
    if migration_ids:
        about.append(Notice.migration_id.in_(list(migration_ids)))
    if run_id is not None:
        about.append(Notice.run_id == run_id)
    if not about:
        return
    await session.execute(
        update(Notice)
        .where(
            or_(*about),
            Notice.kind.in_(list(kinds)),
            Notice.state == NoticeState.PENDING,
        )
        .values(state=NoticeState.CANCELLED, last_error=reason, lease_until=None)
        .execution_options(synchronize_session=False)
    )


async def cancel_other(session: AsyncSession, *, run_id: str, kind: NoticeKind, keep: str) -> None:
    """Cancel the run's pending notices of ``kind`` other than those about ``keep`` (an
    announcement replaced by a newer one)."""
    await session.execute(
        update(Notice)
        .where(
            Notice.run_id == run_id,
            Notice.kind == kind,
            Notice.state == NoticeState.PENDING,
            Notice.key.not_like(f"{kind}:{keep}:%"),
        )
        .values(state=NoticeState.CANCELLED, last_error="announced again for another date")
        .execution_options(synchronize_session=False)
    )
