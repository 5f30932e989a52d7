"""Reset periods: every instant falls in exactly one period, and periods tile without gaps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyshift.metering.periods import (
    FOREVER,
    Period,
    add_months,
    period_containing,
    previous_period,
)

instants = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
RESETS = ["minute", "hour", "day", "week", "month", "term"]
TERMS = ["1y", "1mo", "3mo", "30d", "12h", "perpetual"]


@settings(max_examples=300, deadline=None)
@given(anchor=instants, when=instants, reset=st.sampled_from(RESETS), term=st.sampled_from(TERMS))
def test_every_instant_is_in_its_period_and_periods_tile(
    anchor: datetime, when: datetime, reset: str, term: str
) -> None:
    period = period_containing(reset, anchor, when, term=term)
    assert when in period and period.start < period.end
    if period.end >= FOREVER:
        return
    # The next period starts exactly where this one ends (no gap, no overlap) …
    following = period_containing(reset, anchor, period.end, term=term)
    assert following.start == period.end
    # … the instant just before the start belongs to the previous one …
    before = period_containing(reset, anchor, period.start - timedelta(microseconds=1), term=term)
    assert before.end == period.start
    assert previous_period(reset, anchor, period, term=term) == before
    # … and any instant inside gives back the same period.
    middle = period.start + (period.end - period.start) / 2
    assert period_containing(reset, anchor, middle, term=term) == period


@given(anchor=instants, months=st.integers(-240, 240))
def test_months_are_anchored_and_clamped(anchor: datetime, months: int) -> None:
    moved = add_months(anchor, months)
    assert moved.day == anchor.day or moved.day >= 28
    assert moved.time() == anchor.time()
    assert add_months(anchor, months + 1) > moved


def test_month_periods_clamp_to_month_end_from_the_anchor() -> None:
    anchor = datetime(2026, 1, 31, 9, 30, tzinfo=UTC)
    feb = period_containing("month", anchor, datetime(2026, 3, 1, tzinfo=UTC))
    assert feb == Period(
        datetime(2026, 2, 28, 9, 30, tzinfo=UTC), datetime(2026, 3, 31, 9, 30, tzinfo=UTC)
    )
    before = period_containing("month", anchor, datetime(2025, 12, 31, 9, 29, tzinfo=UTC))
    assert before.start == datetime(2025, 11, 30, 9, 30, tzinfo=UTC)
    assert before.end == datetime(2025, 12, 31, 9, 30, tzinfo=UTC)


def test_never_and_perpetual_terms_do_not_reset() -> None:
    anchor = datetime(2026, 1, 1, tzinfo=UTC)
    when = datetime(2030, 6, 1, tzinfo=UTC)
    assert period_containing("never", anchor, when).is_endless
    assert period_containing("term", anchor, when, term="perpetual").is_endless
    assert period_containing("term", anchor, when, term="1y").start == datetime(
        2030, 1, 1, tzinfo=UTC
    )


def test_naive_instants_and_unknown_resets_are_refused() -> None:
    with pytest.raises(ValueError):
        period_containing("day", datetime(2026, 1, 1), datetime(2026, 1, 2, tzinfo=UTC))
    with pytest.raises(ValueError):
        period_containing(
            "fortnight", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
        )
