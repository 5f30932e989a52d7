"""Reading usage back: each meter's state in its current period (for validation) and an
account's counters and history for a chosen period (for the API and CLI)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time

from sqlalchemy.ext.asyncio import AsyncSession

from keyshift import dates
from keyshift.db.tables import UsageEvent
from keyshift.db.types import utcnow
from keyshift.errors import InvalidInput
from keyshift.metering import repository as repo
from keyshift.metering.meters import MeterState
from keyshift.metering.periods import Period, previous_period
from keyshift.metering.subjects import Subject, subject_for_account

HISTORY_LIMIT = 100


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One recorded event as the history shows it (``counted``: what it added)."""

    id: str
    license_id: str | None
    quantity: int
    counted: int | None
    occurred_at: datetime
    received_at: datetime
    idempotency_key: str | None

    @classmethod
    def of(cls, row: UsageEvent) -> HistoryEvent:
        # A row stored before revision 0004 keeps what it counted in its stored answer.
        counted = row.counted if row.response is None else row.response.get("counted")
        return cls(
            row.id,
            row.license_id,
            row.quantity,
            counted,
            row.occurred_at,
            row.received_at,
            row.idempotency_key,
        )


@dataclass(frozen=True, slots=True)
class MeterUsage:
    """A meter's counter in the chosen period, what it is, and its latest events."""

    state: MeterState
    history: list[HistoryEvent]

    @property
    def used(self) -> int:
        return self.state.used

    @property
    def included(self) -> int:
        return self.state.spec.included

    @property
    def remaining(self) -> int:
        return self.state.remaining

    @property
    def over(self) -> bool:
        return self.state.is_over

    @property
    def unit(self) -> str:
        return self.state.spec.unit

    @property
    def overage(self) -> str:
        return self.state.spec.overage

    @property
    def aggregation(self) -> str:
        return self.state.spec.aggregation

    @property
    def reset(self) -> str:
        return self.state.spec.reset

    @property
    def throttle(self) -> bool:
        return self.state.spec.is_throttle

    @property
    def period_start(self) -> datetime:
        return self.state.period.start

    @property
    def period_end(self) -> datetime | None:
        return self.state.period.public_end()


@dataclass(frozen=True, slots=True)
class UsageReport:
    """Every meter of an account in the selected period (``current``, ``previous``, a date)."""

    account_id: str
    plan: str
    period: str
    server_time: datetime
    meters: dict[str, MeterUsage]


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
) -> UsageReport:
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
        meters[key] = MeterUsage(state, [HistoryEvent.of(e) for e in events])
    return UsageReport(account_id, subject.entitlements.plan_ref, period, now, meters)
