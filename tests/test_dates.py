"""The one text form of an instant (``keyshift.dates.rfc3339``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyshift.dates import rfc3339


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (datetime(2026, 1, 1, tzinfo=UTC), "2026-01-01T00:00:00Z"),
        (datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))), "2026-01-01T00:00:00Z"),
        (datetime(2026, 1, 1, 0, 0, 0, 5), "2026-01-01T00:00:00.000005Z"),
        (datetime(2025, 12, 31, 23, tzinfo=timezone(timedelta(hours=-2))), "2026-01-01T01:00:00Z"),
    ],
)
def test_rfc3339_is_utc_with_z(value: datetime, text: str) -> None:
    assert rfc3339(value) == text


@given(
    value=st.datetimes(
        min_value=datetime(1970, 1, 1),
        max_value=datetime(9000, 12, 31),
        timezones=st.sampled_from(
            [None, UTC, ZoneInfo("UTC"), timezone(timedelta(hours=5, minutes=30))]
        ),
    )
)
def test_rfc3339_is_the_general_conversion_whatever_the_zone(value: datetime) -> None:
    # Naive and UTC values take a shorter path: the same text as converting every value.
    general = (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    assert rfc3339(value) == general.isoformat().replace("+00:00", "Z")


def test_rfc3339_keeps_none() -> None:
    assert rfc3339(None) is None


def test_the_cli_prints_instants_in_the_same_form(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from keyshift.cli.output import emit_json

    emit_json(
        {"aware": datetime(2026, 1, 1, tzinfo=UTC), "naive": datetime(2026, 1, 1, 0, 0, 0, 5)}
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "aware": rfc3339(datetime(2026, 1, 1, tzinfo=UTC)),
        "naive": "2026-01-01T00:00:00.000005Z",
    }
