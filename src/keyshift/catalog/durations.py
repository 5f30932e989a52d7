"""The duration grammar manifests use: ``<n><unit>``, e.g. ``30m``, ``14d``, ``12mo``, ``1y``.

A duration is at most 100 years (``keyshift.dates.MAX_SPAN``), so a date in the accepted range
plus any duration stays a date (docs/security.md, "Input limits")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from keyshift.dates import MAX_SPAN

_PATTERN = re.compile(r"^(\d{1,6})(s|m|h|d|w|mo|y)$")
_FIXED = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_YEARS = 100
_MAX_AMOUNT = {
    "mo": MAX_YEARS * 12,
    "y": MAX_YEARS,
    **{unit: int(MAX_SPAN.total_seconds()) // seconds for unit, seconds in _FIXED.items()},
}


@dataclass(frozen=True)
class Duration:
    """A fixed span (s/m/h/d/w) or a calendar span (mo/y, which vary in length)."""

    amount: int
    unit: str

    @classmethod
    def parse(cls, text: str) -> Duration:
        match = _PATTERN.match(text.strip())
        if not match:
            raise ValueError(
                f"{text!r} is not a duration like '30m', '14d', '12mo' or '1y' "
                "(units: s, m, h, d, w, mo, y)"
            )
        amount, unit = int(match.group(1)), match.group(2)
        if amount > _MAX_AMOUNT[unit]:
            raise ValueError(f"{text!r} is longer than the longest duration, {MAX_YEARS} years")
        return cls(amount, unit)

    @property
    def is_calendar(self) -> bool:
        return self.unit in ("mo", "y")

    def seconds(self) -> int:
        """Length in seconds; only for fixed units."""
        if self.is_calendar:
            raise ValueError(f"{self} is a calendar span with no fixed length")
        return self.amount * _FIXED[self.unit]

    def after(self, start: datetime) -> datetime:
        """``start`` plus this span; months clamp to the last day (Jan 31 + 1mo = Feb 28/29)."""
        if not self.is_calendar:
            try:
                return start + timedelta(seconds=self.seconds())
            except OverflowError:
                raise ValueError(
                    f"{start.isoformat()} + {self} is past the end of the calendar"
                ) from None
        months = self.amount * (12 if self.unit == "y" else 1)
        month_index = start.month - 1 + months
        year, month = start.year + month_index // 12, month_index % 12 + 1
        for day in (start.day, 30, 29, 28):
            try:
                return start.replace(year=year, month=month, day=min(start.day, day))
            except ValueError:
                continue
        raise ValueError(f"{start.isoformat()} + {self} is past the end of the calendar")

    def __str__(self) -> str:
        return f"{self.amount}{self.unit}"
