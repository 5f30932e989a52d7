"""Reset periods: the half-open span ``[start, end)`` of a meter or throttle containing an
instant. Pure: no I/O, no clock. Periods are anchored on the subscription's start
(``Subscription.started_at``) and tile time without gaps or overlaps."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from keyshift.catalog.durations import Duration

#: The span of a ``never`` period. Stored as a real timestamp so counters need no NULLs.
BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)
FOREVER = datetime(9999, 1, 1, tzinfo=UTC)

_FIXED_STEPS = {
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
    "week": timedelta(weeks=1),
}


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime  # exclusive; FOREVER for a meter that never resets

    def __contains__(self, when: datetime) -> bool:
        return self.start <= when < self.end

    @property
    def is_endless(self) -> bool:
        return self.end >= FOREVER

    def public_end(self) -> datetime | None:
        """The end as shown to callers: None when the period never ends."""
        return None if self.is_endless else self.end


def add_months(anchor: datetime, months: int) -> datetime:
    """``anchor`` moved by ``months`` (may be negative), the day clamped to the month's end
    like ``Duration.after``: always computed from the anchor, so Jan 31 → Feb 28 → Mar 31."""
    index = anchor.month - 1 + months
    year, month = anchor.year + index // 12, index % 12 + 1
    for day in (anchor.day, 30, 29, 28):
        try:
            return anchor.replace(year=year, month=month, day=min(anchor.day, day))
        except ValueError:
            continue
    raise AssertionError("unreachable")


def _fixed(anchor: datetime, step: timedelta, when: datetime) -> Period:
    k = (when - anchor) // step  # floor division: negative before the anchor
    start = anchor + k * step
    return Period(start, start + step)


def _monthly(anchor: datetime, months: int, when: datetime) -> Period:
    k = ((when.year - anchor.year) * 12 + when.month - anchor.month) // months
    while add_months(anchor, k * months) > when:
        k -= 1
    while add_months(anchor, (k + 1) * months) <= when:
        k += 1
    return Period(add_months(anchor, k * months), add_months(anchor, (k + 1) * months))


def period_containing(reset: str, anchor: datetime, when: datetime, *, term: str = "1y") -> Period:
    """The period of a ``reset`` (``minute``/``hour``/``day``/``week``/``month``/``term``/
    ``never``) that contains ``when``. ``term`` is the plan's term length (``1y``, ``30d``,
    ``perpetual``) and only matters for ``reset = "term"``; a perpetual term never resets."""
    if anchor.tzinfo is None or when.tzinfo is None:
        raise ValueError("periods need timezone-aware instants")
    if reset == "never" or (reset == "term" and term == "perpetual"):
        return Period(BEGINNING, FOREVER)
    if reset in _FIXED_STEPS:
        return _fixed(anchor, _FIXED_STEPS[reset], when)
    if reset == "month":
        return _monthly(anchor, 1, when)
    if reset == "term":
        length = Duration.parse(term)
        if length.is_calendar:
            return _monthly(anchor, length.amount * (12 if length.unit == "y" else 1), when)
        return _fixed(anchor, timedelta(seconds=length.seconds()), when)
    raise ValueError(f"unknown reset period {reset!r}")


def previous_period(reset: str, anchor: datetime, current: Period, *, term: str = "1y") -> Period:
    """The period just before ``current`` (the same one for a period that never resets)."""
    if current.start <= BEGINNING:
        return current
    return period_containing(reset, anchor, current.start - timedelta(microseconds=1), term=term)
