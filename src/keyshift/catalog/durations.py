"""The duration grammar manifests use: ``<n><unit>``, e.g. ``30m``, ``14d``, ``12mo``, ``1y``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

_PATTERN = re.compile(r"^(\d{1,6})(s|m|h|d|w|mo|y)$")
_FIXED = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


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
        return cls(int(match.group(1)), match.group(2))

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
            return start + timedelta(seconds=self.seconds())
        months = self.amount * (12 if self.unit == "y" else 1)
        month_index = start.month - 1 + months
        year, month = start.year + month_index // 12, month_index % 12 + 1
        for day in (start.day, 30, 29, 28):
            try:
                return start.replace(year=year, month=month, day=min(start.day, day))
            except ValueError:
                continue
        raise AssertionError("unreachable")

    def __str__(self) -> str:
        return f"{self.amount}{self.unit}"
