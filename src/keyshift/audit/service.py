"""Append audit events under a lock on the chain's head, and verify the chain.

Each event's hash covers the previous event's hash and the event's canonical content, so an
edited, inserted or deleted row breaks the chain at a place ``verify`` can name.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.canonical import canonical_json, sha256_hex
from keyshift.context import Actor
from keyshift.db.tables import AuditEvent, AuditHead
from keyshift.db.types import utcnow

GENESIS = "0" * 64
_AUDIT_COLUMNS = [c.key for c in AuditEvent.__table__.columns]


@dataclass(frozen=True)
class EventIn:
    action: str
    target_type: str
    target_id: str
    account_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def event_hash(prev_hash: str, row: dict[str, Any]) -> str:
    body = {
        "seq": row["seq"],
        "id": row["id"],
        "occurred_at": row["occurred_at"],
        "actor": row["actor"],
        "action": row["action"],
        "target_type": row["target_type"],
        "target_id": row["target_id"],
        "account_id": row["account_id"],
        "request_id": row["request_id"],
        "details": row["details"],
    }
    return sha256_hex(prev_hash.encode() + canonical_json(body))


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


async def record_many(session: AsyncSession, actor: Actor, events: Sequence[EventIn]) -> None:
    """Append events in one statement, under a row lock on the head (the chain cannot fork)."""
    if not events:
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


@dataclass(frozen=True)
class Problem:
    seq: int
    kind: str  # "edited" | "deleted" | "inserted" | "head_mismatch"
    message: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.kind}: {self.message}"


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify(session: AsyncSession, *, batch: int = 5000) -> VerifyReport:
    """Walk the chain in order and name every broken link."""
    report = VerifyReport()
    expected_seq, prev = 1, GENESIS
    result = await session.stream(
        select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=batch)
    )
    async for event in result.scalars():
        report.checked += 1
        row = {c: getattr(event, c) for c in _AUDIT_COLUMNS}
        recomputed = event_hash(event.prev_hash, {**row, "occurred_at": _ts(event.occurred_at)})
        if event.seq > expected_seq:
            report.problems.append(
                Problem(
                    event.seq,
                    "deleted",
                    f"events {expected_seq}..{event.seq - 1} are missing",
                )
            )
        if recomputed != event.hash:
            report.problems.append(Problem(event.seq, "edited", "content does not match its hash"))
        elif event.prev_hash != prev and event.seq == expected_seq:
            report.problems.append(
                Problem(
                    event.seq,
                    "inserted",
                    "links to a previous hash that is not its predecessor's",
                )
            )
        expected_seq, prev = event.seq + 1, event.hash
    head = (await session.execute(select(AuditHead).where(AuditHead.id == 1))).scalar_one()
    if head.seq != expected_seq - 1 or head.hash != prev:
        kind = "inserted" if head.seq < expected_seq - 1 else "deleted"
        report.problems.append(
            Problem(
                head.seq,
                kind if head.seq != expected_seq - 1 else "head_mismatch",
                f"chain ends at seq {expected_seq - 1} but the head says {head.seq}",
            )
        )
    return report


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
