"""What can be metered for a plan, and a meter's state in a period: pure, no I/O.

A plan's ``[[meters]]`` are meters; every ``throttled`` feature of its edition is one too, an
implicit ``block`` meter named after the feature (``limit`` per ``period``). A plan meter of
the same name wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from keyshift.catalog.entitlements import Entitlements
from keyshift.metering.periods import Period, period_containing

#: Thresholds a ``notify`` meter uses when its plan lists none.
DEFAULT_NOTIFY_AT = (80, 100)


@dataclass(frozen=True)
class MeterSpec:
    key: str
    unit: str
    aggregation: str  # "sum" | "max" | "unique"
    reset: str  # "minute" … "month" | "term" | "never"
    included: int
    overage: str  # "block" | "allow" | "notify"
    notify_at: tuple[int, ...] = ()
    is_throttle: bool = False  # an implicit meter of a throttled feature

    @property
    def is_blocking(self) -> bool:
        return self.overage == "block"

    def period(self, anchor: datetime, when: datetime, term: str) -> Period:
        return period_containing(self.reset, anchor, when, term=term)

    def threshold_units(self, percent: int) -> int:
        """The counter value at which ``percent`` of ``included`` is reached (at least 1)."""
        return max(1, math.ceil(self.included * percent / 100))


def meter_specs(entitlements: Entitlements) -> dict[str, MeterSpec]:
    """Every meter usage may be recorded against under these entitlements."""
    specs: dict[str, MeterSpec] = {}
    for name, grant in entitlements.features.items():
        if grant.mode == "throttled" and grant.limit is not None and grant.period is not None:
            specs[name] = MeterSpec(
                name, "use", "sum", grant.period, grant.limit, "block", is_throttle=True
            )
    for key, meter in entitlements.meters.items():
        notify_at = tuple(meter.get("notify_at") or ())
        if meter["overage"] == "notify" and not notify_at:
            notify_at = DEFAULT_NOTIFY_AT
        specs[key] = MeterSpec(
            key,
            meter["unit"],
            meter["aggregation"],
            meter["reset"],
            meter["included"],
            meter["overage"],
            tuple(sorted(set(notify_at))),
        )
    return specs


@dataclass(frozen=True)
class MeterState:
    spec: MeterSpec
    period: Period
    used: int

    @property
    def remaining(self) -> int:
        return max(self.spec.included - self.used, 0)

    @property
    def is_exhausted(self) -> bool:
        """A blocking meter with no room left: the next unit would be refused."""
        return self.spec.is_blocking and self.used >= self.spec.included

    @property
    def is_over(self) -> bool:
        return self.used > self.spec.included

    def to_dict(self) -> dict[str, Any]:
        """The form validation signs (``meters.<key>``)."""
        return {
            "used": self.used,
            "included": self.spec.included,
            "remaining": self.remaining,
            "overage": self.spec.overage,
            "over": self.is_over,
            "unit": self.spec.unit,
            "period_start": self.period.start,
            "period_end": self.period.public_end(),
        }
