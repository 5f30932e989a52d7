"""Usage queries. Counters only ever move by deltas, inside the caller's transaction, under
the row's lock (``ON CONFLICT DO UPDATE`` locks it; ``lock_counter`` takes it explicitly)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.db.tables import UsageCounter, UsageEvent, UsageNotice, UsageUniqueMember
from keyshift.db.types import utcnow
from keyshift.metering.periods import Period


def _insert(session: AsyncSession, table: Any) -> Any:
    # Both dialects speak INSERT … ON CONFLICT; SQLAlchemy exposes it per dialect.
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


async def claim_event(session: AsyncSession, row: dict[str, Any]) -> bool:
    """Insert an event unless its (account, idempotency key) exists; True if inserted."""
    statement = (
        _insert(session, UsageEvent)
        .values(**row)
        .on_conflict_do_nothing(index_elements=["account_id", "idempotency_key"])
        .returning(UsageEvent.id)
    )
    return (await session.execute(statement)).first() is not None


async def event_by_key(session: AsyncSession, account_id: str, key: str) -> UsageEvent | None:
    return (
        await session.execute(
            select(UsageEvent)
            .where(UsageEvent.account_id == account_id, UsageEvent.idempotency_key == key)
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()


async def release_key(session: AsyncSession, event_id: str) -> None:
    """Forget an expired event's idempotency key (the event stays in the history)."""
    await session.execute(
        update(UsageEvent).where(UsageEvent.id == event_id).values(idempotency_key=None)
    )


async def store_response(session: AsyncSession, event_id: str, response: dict[str, Any]) -> None:
    await session.execute(
        update(UsageEvent).where(UsageEvent.id == event_id).values(response=response)
    )


async def lock_counter(session: AsyncSession, account_id: str, meter: str, period: Period) -> int:
    """Create the counter row if missing, lock it (FOR UPDATE; SQLite's BEGIN IMMEDIATE already
    serialises writers) and return ``used``."""
    await session.execute(
        _insert(session, UsageCounter)
        .values(
            account_id=account_id,
            meter=meter,
            period_start=period.start,
            period_end=period.end,
            used=0,
            updated_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["account_id", "meter", "period_start"])
    )
    used = (
        await session.execute(
            select(UsageCounter.used)
            .where(
                UsageCounter.account_id == account_id,
                UsageCounter.meter == meter,
                UsageCounter.period_start == period.start,
            )
            .with_for_update()
        )
    ).scalar_one()
    return int(used)


async def set_counter(
    session: AsyncSession, account_id: str, meter: str, period: Period, used: int
) -> None:
    """Write a locked counter's new value (the caller holds the lock from ``lock_counter``)."""
    await session.execute(
        update(UsageCounter)
        .where(
            UsageCounter.account_id == account_id,
            UsageCounter.meter == meter,
            UsageCounter.period_start == period.start,
        )
        .values(used=used, updated_at=utcnow())
    )


async def add_to_counter(
    session: AsyncSession,
    account_id: str,
    meter: str,
    period: Period,
    value: int,
    *,
    aggregation: str,
) -> int:
    """Upsert: ``used + value`` (sum, unique) or ``max(used, value)`` (max). Returns ``used``."""
    insert = _insert(session, UsageCounter)
    stmt = insert.values(
        account_id=account_id,
        meter=meter,
        period_start=period.start,
        period_end=period.end,
        used=value,
        updated_at=utcnow(),
    )
    current = UsageCounter.__table__.c.used
    if aggregation == "max":
        new_used: Any = case((stmt.excluded.used > current, stmt.excluded.used), else_=current)
    else:
        new_used = current + stmt.excluded.used
    stmt = stmt.on_conflict_do_update(
        index_elements=["account_id", "meter", "period_start"],
        set_={"used": new_used, "updated_at": stmt.excluded.updated_at},
    ).returning(UsageCounter.used)
    return int((await session.execute(stmt)).scalar_one())


async def add_member(
    session: AsyncSession, account_id: str, meter: str, period: Period, member_hash: str
) -> bool:
    """Remember a unique meter's member for the period; True if it is new."""
    statement = (
        _insert(session, UsageUniqueMember)
        .values(
            account_id=account_id, meter=meter, period_start=period.start, member_hash=member_hash
        )
        .on_conflict_do_nothing()
        .returning(UsageUniqueMember.member_hash)
    )
    return (await session.execute(statement)).first() is not None


async def add_notice(
    session: AsyncSession,
    account_id: str,
    meter: str,
    period: Period,
    kind: str,
    threshold: int,
    used: int,
) -> bool:
    """Record that a threshold/overage fired this period; True only the first time."""
    statement = (
        _insert(session, UsageNotice)
        .values(
            account_id=account_id,
            meter=meter,
            period_start=period.start,
            kind=kind,
            threshold=threshold,
            used=used,
            fired_at=utcnow(),
        )
        .on_conflict_do_nothing()
        .returning(UsageNotice.threshold)
    )
    return (await session.execute(statement)).first() is not None


async def counters_at(
    session: AsyncSession, account_id: str, when: datetime
) -> dict[tuple[str, datetime], int]:
    """Every counter of the account whose period contains ``when``: (meter, start) → used."""
    rows = await session.execute(
        select(UsageCounter.meter, UsageCounter.period_start, UsageCounter.used).where(
            UsageCounter.account_id == account_id,
            UsageCounter.period_start <= when,
            UsageCounter.period_end > when,
        )
    )
    return {(r.meter, r.period_start): int(r.used) for r in rows}


async def counter_values(
    session: AsyncSession, account_id: str, keys: list[tuple[str, datetime]]
) -> dict[tuple[str, datetime], int]:
    """The counters named by (meter, period start); missing ones are absent."""
    if not keys:
        return {}
    condition = [
        and_(UsageCounter.meter == meter, UsageCounter.period_start == start)
        for meter, start in keys
    ]

    rows = await session.execute(
        select(UsageCounter.meter, UsageCounter.period_start, UsageCounter.used).where(
            UsageCounter.account_id == account_id, or_(*condition)
        )
    )
    return {(r.meter, r.period_start): int(r.used) for r in rows}


async def history(
    session: AsyncSession, account_id: str, meter: str, period_start: datetime, limit: int
) -> list[UsageEvent]:
    """The period's most recent events of a meter, newest first."""
    rows = await session.execute(
        select(UsageEvent)
        .where(
            UsageEvent.account_id == account_id,
            UsageEvent.meter == meter,
            UsageEvent.period_start == period_start,
        )
        .order_by(UsageEvent.occurred_at.desc(), UsageEvent.id)
        .limit(limit)
    )
    return list(rows.scalars())


async def release_expired_keys(session: AsyncSession, now: datetime) -> int:
    """Forget every idempotency key whose window has passed; returns how many."""
    result = await session.execute(
        update(UsageEvent)
        .where(UsageEvent.idempotency_key.is_not(None), UsageEvent.idempotency_expires_at <= now)
        .values(idempotency_key=None)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
