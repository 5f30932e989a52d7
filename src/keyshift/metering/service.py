"""Recording usage and reading it back. Each function takes a session; the caller owns the
transaction, so an event row, its counter delta, its unique member and its notices commit
together, and a refusal anywhere (block quota, idempotency conflict) leaves nothing behind."""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit import service as audit
from keyshift.canonical import canonical_json, sha256_hex
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.db.tables import UsageEvent
from keyshift.db.types import utcnow
from keyshift.errors import ConfigurationError, Conflict, InvalidInput
from keyshift.metering import repository as repo
from keyshift.metering.errors import (
    IdempotencyConflict,
    QuotaExceeded,
    UsageOutOfWindow,
)
from keyshift.metering.meters import MeterSpec, MeterState, iso
from keyshift.metering.periods import Period
from keyshift.metering.subjects import Subject

#: Largest quantity one event may carry (integers of the meter's unit; fits a BIGINT sum).
MAX_QUANTITY = 10**12
MAX_BATCH = 1000
MAX_MEMBER = 255


@dataclass(frozen=True)
class UsagePolicy:
    """The time windows of usage recording (see ``docs/usage.md``)."""

    idempotency_window: timedelta = timedelta(hours=72)
    clock_skew: timedelta = timedelta(minutes=5)
    late_window: timedelta = timedelta(hours=48)

    @classmethod
    def from_env(cls) -> UsagePolicy:
        """Read the windows from the environment; a bad value is a ConfigurationError naming
        the variable (``keyshift serve`` checks this at start, so it never surfaces as a 500)."""
        return cls(
            idempotency_window=timedelta(
                hours=_env_number("KEYSHIFT_IDEMPOTENCY_WINDOW_HOURS", 72, 48)
            ),
            clock_skew=timedelta(minutes=_env_number("KEYSHIFT_USAGE_CLOCK_SKEW_MINUTES", 5, 0)),
            late_window=timedelta(hours=_env_number("KEYSHIFT_USAGE_LATE_HOURS", 48, 0)),
        )


def _env_number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (minimum <= value <= 10 * 365 * 24 * 60):  # NaN fails this too
        raise ConfigurationError(f"{name}={raw!r}: expected a number >= {minimum:g}")
    return value


@dataclass(frozen=True)
class UsageIn:
    """One event as a caller sends it."""

    meter: str
    quantity: int
    idempotency_key: str
    timestamp: datetime | None = None
    member: str | None = None  # what a ``unique`` meter counts (a device id, a user id …)

    def request_hash(self, subject: Subject) -> str:
        """The body that makes a replay a replay: same key + same hash = same request."""
        return sha256_hex(
            canonical_json(
                {
                    "account_id": subject.account_id,
                    "license_id": subject.license_id,
                    "meter": self.meter,
                    "quantity": self.quantity,
                    "timestamp": self.timestamp,
                    "member": self.member,
                }
            )
        )


# -- checks (before any write) -----------------------------------------------------------------


def _check(
    subject: Subject, event: UsageIn, policy: UsagePolicy, now: datetime, where: str = ""
) -> tuple[MeterSpec, Period, datetime]:
    """Shape, meter and time window of one event; nothing is written before all pass."""
    spec = subject.spec(event.meter, f"{where}meter")
    if isinstance(event.quantity, bool) or not isinstance(event.quantity, int):
        raise InvalidInput("quantity must be an integer", field=f"{where}quantity")
    if not 0 <= event.quantity <= MAX_QUANTITY:
        raise InvalidInput(
            f"quantity must be between 0 and {MAX_QUANTITY}", field=f"{where}quantity"
        )
    if not 1 <= len(event.idempotency_key) <= 255 or not event.idempotency_key.isprintable():
        raise InvalidInput(
            "an idempotency key has 1 to 255 printable characters", field=f"{where}idempotency_key"
        )
    if spec.aggregation == "unique":
        if not event.member or len(event.member) > MAX_MEMBER:
            raise InvalidInput(
                f"meter {spec.key!r} counts distinct members: give a member (1 to "
                f"{MAX_MEMBER} characters)",
                field=f"{where}member",
            )
        if event.quantity != 1:
            raise InvalidInput(
                "an event of a unique meter counts one member: quantity must be 1",
                field=f"{where}quantity",
            )
    elif event.member is not None:
        raise InvalidInput(
            f"meter {spec.key!r} aggregates by {spec.aggregation}; member is only for unique",
            field=f"{where}member",
        )
    occurred = event.timestamp or now
    if occurred.tzinfo is None:
        raise InvalidInput("give the timestamp a timezone", field=f"{where}timestamp")
    if occurred > now + policy.clock_skew:
        raise UsageOutOfWindow(
            f"timestamp is more than {_span(policy.clock_skew)} in the future "
            f"(server time {now.isoformat()})",
            field=f"{where}timestamp",
        )
    period = subject.period(spec, occurred)
    if period.end + policy.late_window <= now:
        raise UsageOutOfWindow(
            f"timestamp falls in the period {period.start.isoformat()} to "
            f"{period.end.isoformat()}, which closed more than {_span(policy.late_window)} ago; "
            "late events are accepted only within that window",
            field=f"{where}timestamp",
        )
    return spec, period, occurred


def _span(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes // 60} h" if minutes % 60 == 0 and minutes >= 60 else f"{minutes} min"


# -- recording ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """The answer to one event. ``replayed``: an earlier request with this idempotency key and
    the same body was accepted, and this is its stored answer."""

    body: dict[str, Any]
    replayed: bool

    def to_dict(self) -> dict[str, Any]:
        return {**self.body, "replayed": self.replayed}


async def _apply(
    session: AsyncSession, subject: Subject, spec: MeterSpec, period: Period, event: UsageIn
) -> tuple[int, int]:
    """Move the counter; returns (units counted, used after). Refuses a block overshoot."""
    account, meter = subject.account_id, spec.key
    member_hash = sha256_hex(event.member.encode()) if event.member is not None else None
    if spec.is_blocking:
        used = await repo.lock_counter(session, account, meter, period)
        if spec.aggregation == "unique":
            assert member_hash is not None
            is_new = await repo.add_member(session, account, meter, period, member_hash)
            proposed = used + (1 if is_new else 0)
        elif spec.aggregation == "max":
            proposed = max(used, event.quantity)
        else:
            proposed = used + event.quantity
        if proposed > used and proposed > spec.included:
            raise QuotaExceeded(
                f"meter {meter!r} allows {spec.included} {spec.unit} per period; "
                f"{used} used, this event needs {proposed - used}",
                field="quantity",
                meter=meter,
                used=used,
                included=spec.included,
                remaining=max(spec.included - used, 0),
                resets_at=iso(period.public_end()),
            )
        if proposed != used:
            await repo.set_counter(session, account, meter, period, proposed)
        return proposed - used, proposed
    if spec.aggregation == "unique":
        assert member_hash is not None
        is_new = await repo.add_member(session, account, meter, period, member_hash)
        delta = 1 if is_new else 0
        used = await repo.add_to_counter(session, account, meter, period, delta, aggregation="sum")
        return delta, used
    used = await repo.add_to_counter(
        session, account, meter, period, event.quantity, aggregation=spec.aggregation
    )
    return (event.quantity if spec.aggregation == "sum" else 0), used


async def _notices(
    session: AsyncSession,
    subject: Subject,
    spec: MeterSpec,
    period: Period,
    counted: int,
    used: int,
) -> tuple[list[audit.EventIn], list[int], bool]:
    """Thresholds crossed by this event (each fires once per period) and the overage flag."""
    before = used - counted
    fired: list[int] = []
    events: list[audit.EventIn] = []
    base = {
        "meter": spec.key,
        "period_start": iso(period.start),
        "included": spec.included,
        "used": used,
    }
    for percent in spec.notify_at:
        units = spec.threshold_units(percent)
        # Exact crossing detection for sums (the counter is locked); max meters may jump.
        crossed = before < units <= used or (spec.aggregation == "max" and used >= units)
        if crossed and await repo.add_notice(
            session, subject.account_id, spec.key, period, "threshold", percent, used
        ):
            fired.append(percent)
            events.append(
                audit.EventIn(
                    "usage.threshold",
                    "account",
                    subject.account_id,
                    subject.account_id,
                    {**base, "threshold": percent},
                )
            )
    flagged = False
    if not spec.is_blocking and used > spec.included:
        flagged = await repo.add_notice(
            session, subject.account_id, spec.key, period, "overage", 0, used
        )
        if flagged:
            events.append(
                audit.EventIn(
                    "usage.overage", "account", subject.account_id, subject.account_id, base
                )
            )
    return events, fired, flagged


async def _record_checked(
    session: AsyncSession,
    actor: Actor,
    subject: Subject,
    event: UsageIn,
    checked: tuple[MeterSpec, Period, datetime],
    policy: UsagePolicy,
    now: datetime,
) -> tuple[Recorded, list[audit.EventIn]]:
    spec, period, occurred = checked
    request_hash = event.request_hash(subject)
    event_id = str(uuid.uuid4())
    row: dict[str, Any] = {
        "id": event_id,
        "account_id": subject.account_id,
        "license_id": subject.license_id,
        "meter": spec.key,
        "quantity": event.quantity,
        "member_hash": sha256_hex(event.member.encode()) if event.member else None,
        "occurred_at": occurred,
        "received_at": now,
        "period_start": period.start,
        "idempotency_key": event.idempotency_key,
        "idempotency_expires_at": now + policy.idempotency_window,
        "request_hash": request_hash,
        "actor": actor.id,
        "response": {},
    }
    # Claim the key first: a concurrent request with the same key waits here for ours to
    # commit or roll back, then sees it, so a retried event is never counted twice.
    for _attempt in range(3):
        if await repo.claim_event(session, row):
            break
        existing = await repo.event_by_key(session, subject.account_id, event.idempotency_key)
        if existing is None:  # released concurrently; claim again
            continue
        if existing.idempotency_expires_at <= now:
            await repo.release_key(session, existing.id)
            continue
        return _replay(existing, request_hash), []
    else:
        raise Conflict("could not claim the idempotency key; retry", field="idempotency_key")
    counted, used = await _apply(session, subject, spec, period, event)
    audit_events, fired, flagged = await _notices(session, subject, spec, period, counted, used)
    state = MeterState(spec, period, used)
    body = {
        "id": event_id,
        "account_id": subject.account_id,
        "license_id": subject.license_id,
        "meter": spec.key,
        "quantity": event.quantity,
        "counted": counted,
        "occurred_at": iso(occurred),
        "received_at": iso(now),
        "period": {"start": iso(period.start), "end": iso(period.public_end())},
        "used": used,
        "included": spec.included,
        "remaining": state.remaining,
        "policy": spec.overage,
        "over": state.is_over,
        "overage_flagged": flagged,
        "notices": fired,
    }
    await repo.store_response(session, event_id, body)
    return Recorded(body, False), audit_events


def _replay(existing: UsageEvent, request_hash: str) -> Recorded:
    if existing.request_hash != request_hash:
        raise IdempotencyConflict(
            "this idempotency key was used with a different request body",
            field="idempotency_key",
            first_event_id=existing.id,
        )
    return Recorded(dict(existing.response), True)


async def record(
    session: AsyncSession,
    actor: Actor,
    subject: Subject,
    event: UsageIn,
    *,
    policy: UsagePolicy | None = None,
    now: datetime | None = None,
) -> Recorded:
    """Record one event (or replay its first answer) in the caller's transaction."""
    policy, now = policy or UsagePolicy(), now or utcnow()
    checked = _check(subject, event, policy, now)
    recorded, audit_events = await _record_checked(
        session, actor, subject, event, checked, policy, now
    )
    await audit.record_many(session, actor, audit_events)
    return recorded


async def record_batch(
    session: AsyncSession,
    actor: Actor,
    subject: Subject,
    events: Sequence[UsageIn],
    *,
    policy: UsagePolicy | None = None,
    now: datetime | None = None,
) -> list[Recorded]:
    """Record many events, all or nothing: every event is checked before anything is
    written, and any refusal (block quota, changed body) fails the batch, naming the index."""
    policy, now = policy or UsagePolicy(), now or utcnow()
    if not 1 <= len(events) <= MAX_BATCH:
        raise InvalidInput(f"a batch has 1 to {MAX_BATCH} events", field="events")
    checked = [_check(subject, e, policy, now, f"events.{i}.") for i, e in enumerate(events)]
    # One lock order for every writer — counter (meter, period), then idempotency key — so
    # two batches touching the same counters or keys cannot deadlock. The outcome does not
    # depend on the order (all or nothing; sums, maxima and distinct counts commute), only
    # the running ``used`` in each answer does.
    order = sorted(
        range(len(events)),
        key=lambda i: (checked[i][0].key, checked[i][1].start, events[i].idempotency_key),
    )
    results: list[Recorded | None] = [None] * len(events)
    audit_events: list[audit.EventIn] = []
    for index in order:
        try:
            recorded, notices = await _record_checked(
                session, actor, subject, events[index], checked[index], policy, now
            )
        except (QuotaExceeded, IdempotencyConflict) as error:
            error.field = f"events.{index}.{error.field or 'quantity'}"
            error.details["index"] = index
            error.message = f"event {index}: {error.message}; nothing in the batch was recorded"
            error.args = (error.message,)
            raise
        results[index] = recorded
        audit_events += notices
    await audit.record_many(session, actor, audit_events)
    return [r for r in results if r is not None]


T = TypeVar("T")
_RETRYABLE = ("40P01", "40001")  # deadlock detected, serialization failure


async def in_transaction(
    db: Database, work: Callable[[AsyncSession], Awaitable[T]], *, attempts: int = 3
) -> T:
    """Run ``work`` in a transaction, retrying the whole of it when PostgreSQL reports a
    deadlock or serialization failure (both roll back everything, so a retry is safe)."""
    for attempt in range(attempts):
        try:
            async with db.transaction() as session:
                return await work(session)
        except DBAPIError as error:
            code = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
            if code not in _RETRYABLE or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


async def prune(session: AsyncSession, actor: Actor, now: datetime | None = None) -> int:
    """Release every idempotency key past its window (events stay); audited."""
    released = await repo.release_expired_keys(session, now or utcnow())
    await audit.record(
        session, actor, "usage.prune", "usage", "idempotency", details={"released": released}
    )
    return released
