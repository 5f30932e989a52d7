"""Append audit events under a lock on the chain's head, and verify the chain.

Each event's hash covers the previous event's hash and the event's canonical content, so an
edited, inserted or deleted row breaks the chain at a place ``verify`` can name (the walk
itself is ``keyshift.audit.chain``).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit.chain import ChainWalk, VerifyReport, event_hash
from keyshift.context import Actor
from keyshift.db.tables import AuditEvent, AuditHead
from keyshift.db.types import utcnow


@dataclass(frozen=True)
class EventIn:
    action: str
    target_type: str
    target_id: str
    account_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def _ts(value: datetime) -> str:
    # Microsecond precision survives both databases; the hash covers this exact text.
    return value.isoformat(timespec="microseconds")


async def record(
    session: AsyncSession,
    actor: Actor,
    action: str,
    target_type: str,
    target_id: str,
    *,
    account_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Append one event in the caller's transaction."""
    await record_many(
        session, actor, [EventIn(action, target_type, target_id, account_id, details or {})]
    )


#: ``session.info`` key of a list that collects events instead of appending them (``deferred``).
_DEFERRED = "keyshift.audit.deferred"


@contextlib.contextmanager
def deferred(session: AsyncSession) -> Iterator[list[tuple[Actor, EventIn]]]:
    """Collect the events recorded in ``session`` inside the block instead of appending each
    at once; the caller appends them with ``append_deferred`` when its work is done. A batch
    of accounts in one transaction takes the chain's head once, at its end, instead of
    holding it from its first account's event to its commit (every other writer would wait)."""
    collected: list[tuple[Actor, EventIn]] = []
    outer = session.info.get(_DEFERRED)
    session.info[_DEFERRED] = collected
    try:
        yield collected
    finally:
        if outer is None:
            session.info.pop(_DEFERRED, None)
        else:
            session.info[_DEFERRED] = outer


async def append_deferred(
    session: AsyncSession, collected: Sequence[tuple[Actor, EventIn]]
) -> None:
    """Append collected events in order, one statement per run of events by the same actor."""
    group: list[EventIn] = []
    actor: Actor | None = None
    for who, event in collected:
        if actor is not None and who != actor:
            await record_many(session, actor, group)
            group = []
        actor = who
        group.append(event)
    if actor is not None:
        await record_many(session, actor, group)


async def record_many(session: AsyncSession, actor: Actor, events: Sequence[EventIn]) -> None:
    """Append events in one statement, under a row lock on the head (the chain cannot fork)."""
    if not events:
        return
    collecting = session.info.get(_DEFERRED)
    if collecting is not None:
        collecting.extend((actor, event) for event in events)
        return
    head = (
        await session.execute(select(AuditHead).where(AuditHead.id == 1).with_for_update())
    ).scalar_one()
    seq, prev = head.seq, head.hash
    now = utcnow()
    rows = []
    for event in events:
        seq += 1
        row: dict[str, Any] = {
            "seq": seq,
            "id": str(uuid.uuid4()),
            "occurred_at": now,
            "actor": actor.id,
            "action": event.action,
            "target_type": event.target_type,
            "target_id": event.target_id,
            "account_id": event.account_id,
            "request_id": actor.request_id,
            "details": event.details,
        }
        row["prev_hash"] = prev
        row["hash"] = prev = event_hash(prev, {**row, "occurred_at": _ts(now)})
        rows.append(row)
    await session.execute(insert(AuditEvent), rows)
    await session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=seq, hash=prev))


async def _head(session: AsyncSession) -> tuple[int, str]:
    # Columns, not the ORM row: a second read in the session must see the database, not the
    # identity map.
    row = (
        await session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1))
    ).one()
    return int(row.seq), str(row.hash)


async def verify(session: AsyncSession, *, batch: int = 5000) -> VerifyReport:
    """Walk the chain in order and name the first row whose content or link is wrong (and any
    later, independent break); see ``keyshift.audit.chain``."""
    head_seq, head_hash = await _head(session)
    highest = (await session.execute(select(func.max(AuditEvent.seq)))).scalar() or 0
    walk = ChainWalk(head_seq, head_hash, renumber_hint=head_seq - highest)
    table = AuditEvent.__table__
    result = await session.stream(
        select(table).order_by(table.c.seq).execution_options(yield_per=batch)
    )
    async for event in result.mappings():
        walk.feed({**event, "occurred_at": _ts(event["occurred_at"])})
    # Appends that committed while the walk ran are beyond the head read first; the head read
    # again covers them (a row and its head update commit together).
    return walk.finish((await _head(session))[0] if walk.needs_head_again else None)


async def list_events(
    session: AsyncSession,
    *,
    account_id: str | None = None,
    after_seq: int = 0,
    limit: int = 100,
) -> list[AuditEvent]:
    query = select(AuditEvent).where(AuditEvent.seq > after_seq)
    if account_id is not None:
        query = query.where(AuditEvent.account_id == account_id)
    return list((await session.execute(query.order_by(AuditEvent.seq).limit(limit))).scalars())
