"""Usage queries, set-based: each writes or reads the rows of a whole request in one
statement, inside the caller's transaction. Counters are written only under the row locks
``lock_counters`` takes. Core statements on the tables (no ORM unit of work on the hot path)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.db.tables import UsageCounter, UsageEvent, UsageNotice, UsageUniqueMember
from keyshift.db.types import utcnow
from keyshift.metering.periods import Period

EVENTS = cast(Table, UsageEvent.__table__)
COUNTERS = cast(Table, UsageCounter.__table__)
MEMBERS = cast(Table, UsageUniqueMember.__table__)
NOTICES = cast(Table, UsageNotice.__table__)


def _is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


_BUILT: dict[tuple[str, str], Any] = {}


def _built(session: AsyncSession, name: str, build: Callable[[Any], Any]) -> Any:
    """A statement built once per dialect (both speak INSERT … ON CONFLICT; SQLAlchemy
    exposes it per dialect). Building an INSERT … ON CONFLICT anew for every
    request was about a seventh of a single usage event's server time (``.excluded`` makes
    an alias and its column collection each time)."""
    key = (session.get_bind().dialect.name, name)
    statement = _BUILT.get(key)
    if statement is None:
        statement = _BUILT[key] = build(
            postgresql.insert if key[0] == "postgresql" else sqlite.insert
        )
    return statement


def _insert_events(insert: Any) -> Any:
    return (
        insert(EVENTS)
        .on_conflict_do_nothing(index_elements=["account_id", "idempotency_key"])
        .returning(EVENTS.c.idempotency_key)
    )


def _lock_counters(insert: Any) -> Any:
    return (
        insert(COUNTERS)
        .on_conflict_do_update(
            index_elements=["account_id", "meter", "period_start"],
            set_={"used": COUNTERS.c.used},
        )
        .returning(COUNTERS.c.meter, COUNTERS.c.period_start, COUNTERS.c.used)
    )


def _write_counters(insert: Any) -> Any:
    statement = insert(COUNTERS)
    return statement.on_conflict_do_update(
        index_elements=["account_id", "meter", "period_start"],
        set_={"used": statement.excluded.used, "updated_at": statement.excluded.updated_at},
    ).returning(COUNTERS.c.meter)  # RETURNING makes it one multi-row statement


def _add_members(insert: Any) -> Any:
    return (
        insert(MEMBERS)
        .on_conflict_do_nothing()
        .returning(MEMBERS.c.meter, MEMBERS.c.period_start, MEMBERS.c.member_hash)
    )


def _add_notices(insert: Any) -> Any:
    return (
        insert(NOTICES)
        .on_conflict_do_nothing()
        .returning(NOTICES.c.meter, NOTICES.c.period_start, NOTICES.c.kind, NOTICES.c.threshold)
    )


@dataclass(frozen=True)
class StoredEvent:
    """What an earlier event left behind for its idempotency key: enough to decide a replay
    or a conflict, and to rebuild its answer (``row``: the columns of ``STORED_COLUMNS``)."""

    id: str
    request_hash: str
    idempotency_expires_at: datetime
    row: Mapping[Any, Any]


#: The columns a replay needs (``metering.service.answer`` rebuilds the answer from them).
STORED_COLUMNS = [
    EVENTS.c[name]
    for name in (
        "idempotency_key",
        "id",
        "request_hash",
        "idempotency_expires_at",
        "account_id",
        "license_id",
        "meter",
        "quantity",
        "occurred_at",
        "received_at",
        "period_start",
        "counted",
        "used",
        "included",
        "policy",
        "period_end",
        "overage_flagged",
        "notices",
        "response",
    )
]

# One index probe per key: the LIMIT keeps the lateral subquery from being flattened into a
# join (a plain ``= ANY(keys)`` may be planned as a scan of the account's whole history when
# statistics are stale). The probe is on the unique index only when planned for its
# parameters: a cached generic plan may pick the history index, which leads with account_id
# too, and filter the whole history per key. The engine forbids generic plans on the main
# pool for that reason (``db.engine.create_engine``).
_PG_EVENTS_BY_KEY = text(
    f"""
    SELECT {", ".join(f"e.{c.name}" for c in STORED_COLUMNS)}
    FROM unnest(CAST(:keys AS varchar[])) AS k(key)
    CROSS JOIN LATERAL (
        SELECT * FROM usage_events
        WHERE account_id = :account_id AND idempotency_key = k.key
        LIMIT 1
    ) AS e
    """
).columns(*STORED_COLUMNS)


async def events_by_key(
    session: AsyncSession, account_id: str, keys: Sequence[str]
) -> dict[str, StoredEvent]:
    """The account's events holding any of ``keys`` (one query; no locks)."""
    if _is_postgres(session):
        statement: Any = _PG_EVENTS_BY_KEY.bindparams(account_id=account_id, keys=list(keys))
    else:
        statement = select(*STORED_COLUMNS).where(
            EVENTS.c.account_id == account_id, EVENTS.c.idempotency_key.in_(keys)
        )
    rows = (await session.execute(statement)).mappings()
    return {
        r["idempotency_key"]: StoredEvent(
            r["id"], r["request_hash"], r["idempotency_expires_at"], r
        )
        for r in rows
    }


async def release_keys(session: AsyncSession, event_ids: Sequence[str], now: datetime) -> None:
    """Forget expired events' idempotency keys (the events stay in the history)."""
    await session.execute(
        update(EVENTS)
        .where(EVENTS.c.id.in_(event_ids), EVENTS.c.idempotency_expires_at <= now)
        .values(idempotency_key=None)
    )


# The columns of an event that vary per row; the others are the same for a whole request.
_EVENT_ARRAYS = {
    "id": "varchar[]",
    "meter": "varchar[]",
    "quantity": "bigint[]",
    "member_hash": "varchar[]",
    "occurred_at": "timestamptz[]",
    "period_start": "timestamptz[]",
    "idempotency_key": "varchar[]",
    "request_hash": "varchar[]",
    "counted": "bigint[]",
    "used": "bigint[]",
    "included": "bigint[]",
    "policy": "varchar[]",
    "period_end": "timestamptz[]",
    "overage_flagged": "boolean[]",
    "notices": "varchar[]",
}
_EVENT_SHARED = ("account_id", "license_id", "received_at", "idempotency_expires_at", "actor")
_PG_INSERT_EVENTS = text(
    f"""
    INSERT INTO usage_events ({", ".join([*_EVENT_ARRAYS, *_EVENT_SHARED])})
    SELECT {", ".join(f"r.{c}" for c in _EVENT_ARRAYS)}, {", ".join(f":{c}" for c in _EVENT_SHARED)}
    FROM unnest({", ".join(f"CAST(:{c} AS {t})" for c, t in _EVENT_ARRAYS.items())})
         AS r({", ".join(_EVENT_ARRAYS)})
    ON CONFLICT (account_id, idempotency_key) DO NOTHING
    RETURNING idempotency_key
    """
).bindparams(
    bindparam("received_at", type_=EVENTS.c.received_at.type),
    bindparam("idempotency_expires_at", type_=EVENTS.c.idempotency_expires_at.type),
)


async def insert_events(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert events unless their (account, idempotency key) exists, in one statement and in
    the order given; returns the keys inserted. A key held by an uncommitted transaction
    waits for it. Every row must share the request's columns (account, license, actor,
    received and expiry times)."""
    if not rows:
        return set()
    if _is_postgres(session):
        # One row of arrays through unnest(): a thousand events cost one bind per column,
        # not one per cell, and the statement is prepared once whatever the batch size.
        params: dict[str, Any] = {c: [r[c] for r in rows] for c in _EVENT_ARRAYS}
        params.update({c: rows[0][c] for c in _EVENT_SHARED})
        return set((await session.execute(_PG_INSERT_EVENTS, params)).scalars())
    statement = _built(session, "insert_events", _insert_events)
    return set((await session.execute(statement, list(rows))).scalars())


CounterKey = tuple[str, datetime]  # (meter, period start)


async def lock_counters(
    session: AsyncSession, account_id: str, counters: Sequence[tuple[str, Period]]
) -> dict[CounterKey, int]:
    """Create the counters that are missing, lock every one (the no-op ``DO UPDATE`` takes the
    row lock of an existing row; SQLite's BEGIN IMMEDIATE already serialises writers) and
    return ``used``, in one statement. Rows are locked in (meter, period) order, the order
    every writer uses, so two writers cannot deadlock on counters."""
    stamp = utcnow()
    rows = [
        {
            "account_id": account_id,
            "meter": meter,
            "period_start": period.start,
            "period_end": period.end,
            "used": 0,
            "updated_at": stamp,
        }
        for meter, period in sorted(counters, key=lambda c: (c[0], c[1].start))
    ]
    result = await session.execute(_built(session, "lock_counters", _lock_counters), rows)
    return {(r.meter, r.period_start): int(r.used) for r in result}


async def write_counters(
    session: AsyncSession, account_id: str, values: Sequence[tuple[str, Period, int]]
) -> None:
    """Write the new values of counters this transaction holds locked (``lock_counters``)."""
    stamp = utcnow()
    rows = [
        {
            "account_id": account_id,
            "meter": meter,
            "period_start": period.start,
            "period_end": period.end,
            "used": used,
            "updated_at": stamp,
        }
        for meter, period, used in sorted(values, key=lambda v: (v[0], v[1].start))
    ]
    await session.execute(_built(session, "write_counters", _write_counters), rows)


async def add_members(
    session: AsyncSession, account_id: str, members: set[tuple[str, datetime, str]]
) -> set[tuple[str, datetime, str]]:
    """Remember unique meters' members (meter, period start, member hash); returns the new."""
    rows = [
        {"account_id": account_id, "meter": m, "period_start": start, "member_hash": h}
        for m, start, h in sorted(members)
    ]
    result = await session.execute(_built(session, "add_members", _add_members), rows)
    return {(r.meter, r.period_start, r.member_hash) for r in result}


NoticeKey = tuple[str, datetime, str, int]  # (meter, period start, kind, threshold)


async def add_notices(
    session: AsyncSession, account_id: str, notices: Sequence[tuple[NoticeKey, int]]
) -> set[NoticeKey]:
    """Record thresholds/overage flags (with ``used`` when they fired); returns those that
    fired now, i.e. were not already recorded for their period."""
    stamp = utcnow()
    rows = [
        {
            "account_id": account_id,
            "meter": meter,
            "period_start": start,
            "kind": kind,
            "threshold": threshold,
            "used": used,
            "fired_at": stamp,
        }
        for (meter, start, kind, threshold), used in sorted(notices, key=lambda n: n[0])
    ]
    result = await session.execute(_built(session, "add_notices", _add_notices), rows)
    return {(r.meter, r.period_start, r.kind, int(r.threshold)) for r in result}


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
