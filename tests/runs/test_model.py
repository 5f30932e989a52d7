"""The pure parts of a run: moves between states, cohort and option documents, windows,
lanes and waves."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from keyshift.runs.model import (
    TRANSITIONS,
    Cohort,
    Priority,
    RunOptions,
    RunState,
    Window,
    WrongRunState,
    check_move,
    failure_rate_exceeded,
    priority_of,
    wave_after_canary,
)


def test_every_move_names_what_it_needs() -> None:
    check_move("pause", RunState.RUNNING, "r1")
    with pytest.raises(WrongRunState, match="run r1 is completed; pause needs it to be running"):
        check_move("pause", RunState.COMPLETED, "r1")
    with pytest.raises(WrongRunState, match="resume needs it to be paused"):
        check_move("resume", RunState.ABORTED, "r1")
    # Nothing moves a finalized or rolled-back run.
    for move, allowed in TRANSITIONS.items():
        assert RunState.FINALIZED not in allowed, move
        assert RunState.ROLLED_BACK not in allowed, move


def test_cohort_problems_name_duplicate_ids_a_double_sample_and_bad_predicates() -> None:
    assert Cohort(ids=["a", "b", "a"]).problems() == [("ids", "1 duplicate id(s): a")]
    assert Cohort.model_validate({"sample": {"count": 3, "percent": 10}}).problems() == [
        ("sample", "give exactly one of count and percent")
    ]
    where = Cohort.model_validate({"where": [{"name": "tier", "op": "gte"}]})
    assert where.problems() == [("where[0]", "op 'gte' needs a value")]
    assert (
        Cohort.model_validate({"where": [{"name": "tier", "op": "gte", "value": 2}]}).problems()
        == []
    )
    with pytest.raises(ValidationError):
        Cohort.model_validate({"plans": ["not a ref"]})


@pytest.mark.parametrize(
    ("start", "end", "utc_hour", "inside"),
    [
        ("01:00", "05:00", 0, False),
        ("01:00", "05:00", 1, True),
        ("01:00", "05:00", 5, False),
        ("22:00", "04:00", 23, True),  # spans midnight
        ("22:00", "04:00", 3, True),
        ("22:00", "04:00", 12, False),
    ],
)
def test_windows_in_utc(start: str, end: str, utc_hour: int, inside: bool) -> None:
    window = Window(start=start, end=end)
    assert window.contains(datetime(2026, 6, 1, utc_hour, 30, tzinfo=UTC)) is inside


def test_windows_are_local_to_their_time_zone() -> None:
    window = Window(start="01:00", end="05:00", timezone="Europe/Berlin")
    # 00:30 UTC in June is 02:30 in Berlin (CEST, UTC+2): inside.
    assert window.contains(datetime(2026, 6, 1, 0, 30, tzinfo=UTC))
    assert not window.contains(datetime(2026, 6, 1, 3, 30, tzinfo=UTC))  # 05:30 there
    assert window.problems() == []
    assert Window(start="01:00", end="05:00", timezone="Mars/Olympus").problems() == [
        ("window.timezone", "unknown time zone 'Mars/Olympus'")
    ]
    assert Window(start="01:00", end="01:00").problems()[0][0] == "window"
    with pytest.raises(ValidationError):
        Window(start="25:00", end="01:00")  # the schema says HH:MM


def test_lanes_put_listed_accounts_first_then_the_attribute() -> None:
    spec = Priority(attribute="mrr", ids=["vip"])
    assert priority_of({"mrr": 10}, "vip", spec) > priority_of({"mrr": 10**12}, "x", spec)
    assert priority_of({"mrr": 900}, "a", spec) > priority_of({"mrr": 20}, "b", spec)
    assert priority_of({"mrr": "lots"}, "a", spec) == 0
    assert priority_of({"mrr": True}, "a", spec) == 0
    assert priority_of({}, "a", None) == 0


def test_waves_follow_the_canary() -> None:
    options = RunOptions(canary=2, wave_size=3)
    assert options.canary_size(10) == 2
    assert [wave_after_canary(i, 2, options) for i in range(7)] == [1, 1, 1, 2, 2, 2, 3]
    assert RunOptions(canary_percent=1).canary_size(10) == 1  # at least one account
    assert [wave_after_canary(i, 0, RunOptions()) for i in range(3)] == [0, 0, 0]
    assert "no canary" in RunOptions(strategy="blue_green", canary=5).problems()[0][1]
    assert "not both" in RunOptions(canary=5, canary_percent=10).problems()[0][1]


def test_failure_rate_waits_for_enough_attempts() -> None:
    options = RunOptions(failure_threshold=0.1, min_attempts=10)
    assert not failure_rate_exceeded(5, 5, options)
    assert not failure_rate_exceeded(10, 1, options)
    assert failure_rate_exceeded(10, 2, options)
