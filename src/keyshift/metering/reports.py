"""Reading usage back: each meter's state in its current period (for validation) and an
account's counters and history for a chosen period (for the API and CLI)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from keyshift import dates
from keyshift.db.tables import UsageEvent
from keyshift.db.types import utcnow
from keyshift.errors import InvalidInput
from keyshift.metering import repository as repo
from keyshift.metering.meters import MeterState, iso
from keyshift.metering.periods import Period, previous_period
from keyshift.metering.subjects import Subject, subject_for_account

HISTORY_LIMIT = 100


async def meter_states(
    session: AsyncSession, subject: Subject, now: datetime, *, only: Sequence[str] | None = None
) -> dict[str, MeterState]:
    """Each meter's state in its current period, in one query."""
    specs = subject.specs
    if only is not None:
        specs = {k: v for k, v in specs.items() if k in only}
    if not specs:
        return {}
    counters = await repo.counters_at(session, subject.account_id, now)
    states = {}
    for key, spec in specs.items():
        period = subject.period(spec, now)
        states[key] = MeterState(spec, period, counters.get((key, period.start), 0))
    return states


def _reference(selector: str, now: datetime) -> tuple[str, datetime]:
    if selector in ("current", "previous"):
        return selector, now
    try:
        day = date.fromisoformat(selector)
    except ValueError as exc:
        raise InvalidInput(
            "period is current, previous or an ISO date (2026-05-01)", field="period"
        ) from exc
    when = datetime.combine(day, time(), tzinfo=now.tzinfo)
    if not dates.in_range(when):
        raise InvalidInput(f"period must be a date {dates.RANGE_TEXT}", field="period")
    return "date", when


async def account_usage(
    session: AsyncSession,
    account_id: str,
    *,
    period: str = "current",
    history_limit: int = HISTORY_LIMIT,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Counters and recent history of every meter for the selected period: ``current``,
    ``previous`` or the period containing an ISO date (its start of day, UTC)."""
    now = now or utcnow()
    if not 0 <= history_limit <= 1000:
        raise InvalidInput("history_limit must be between 0 and 1000", field="history_limit")
    kind, when = _reference(period, now)
    subject = await subject_for_account(session, account_id)
    periods: dict[str, Period] = {}
    for key, spec in subject.specs.items():
        chosen = subject.period(spec, when)
        if kind == "previous":
            chosen = previous_period(
                spec.reset, subject.anchor, chosen, term=subject.entitlements.term
            )
        periods[key] = chosen
    values = await repo.counter_values(
        session, account_id, [(k, p.start) for k, p in periods.items()]
    )
    meters = {}
    for key, spec in sorted(subject.specs.items()):
        chosen = periods[key]
        state = MeterState(spec, chosen, values.get((key, chosen.start), 0))
        events = (
            await repo.history(session, account_id, key, chosen.start, history_limit)
            if history_limit
            else []
        )
        meters[key] = {
            **state.to_dict(),
            "overage": spec.overage,
            "aggregation": spec.aggregation,
            "reset": spec.reset,
            "throttle": spec.is_throttle,
            "period_start": iso(chosen.start),
            "period_end": iso(chosen.public_end()),
            "history": [_event_view(e) for e in events],
        }
    return {
        "account_id": account_id,
        "plan": subject.entitlements.plan_ref,
        "period": period,
        "server_time": iso(now),
        "meters": meters,
    }


def _event_view(row: UsageEvent) -> dict[str, Any]:
    return {
        "id": row.id,
        "license_id": row.license_id,
        "quantity": row.quantity,
        "counted": row.counted if row.response is None else row.response.get("counted"),
        "occurred_at": iso(row.occurred_at),
        "received_at": iso(row.received_at),
        "idempotency_key": row.idempotency_key,
    }
