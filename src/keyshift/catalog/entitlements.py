"""What a plan grants, resolved from the plan and its edition: a pure function, no I/O.

This is the object the validation hot path caches and signs; migrations compare two of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keyshift.catalog.durations import Duration
from keyshift.catalog.manifests import Edition, Plan, SeatLicensing, ThrottledFeature


@dataclass(frozen=True)
class FeatureGrant:
    mode: str  # "enabled" | "disabled" | "throttled"
    limit: int | None = None
    period: str | None = None

    @property
    def is_usable(self) -> bool:
        return self.mode != "disabled"

    def to_dict(self) -> dict[str, Any]:
        if self.mode == "throttled":
            return {"mode": self.mode, "limit": self.limit, "period": self.period}
        return {"mode": self.mode}


@dataclass(frozen=True)
class Entitlements:
    """The effective grant of one plan version."""

    plan_ref: str
    plan_hash: str
    edition_ref: str
    model: str  # "seat" | "usage"
    features: dict[str, FeatureGrant] = field(default_factory=dict)
    quotas: dict[str, int] = field(default_factory=dict)
    max_activations: int | None = None
    activation_mode: str = "node-locked"  # "node-locked" | "floating"
    lease_seconds: int | None = None
    term: str = "1y"
    grace_seconds: int = 0
    offline_seconds: int = 0
    meters: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The public form, as signed into validation responses and license files."""
        return {
            "plan": self.plan_ref,
            "edition": self.edition_ref,
            "model": self.model,
            "features": {k: v.to_dict() for k, v in sorted(self.features.items())},
            "quotas": dict(sorted(self.quotas.items())),
            "max_activations": self.max_activations,
            "activation_mode": self.activation_mode,
        }


def feature_grants(edition: Edition) -> dict[str, FeatureGrant]:
    """Each feature the edition declares, as a grant."""
    return {
        name: FeatureGrant(spec.mode, spec.limit, spec.period)
        if isinstance(spec, ThrottledFeature)
        else FeatureGrant(spec)
        for name, spec in edition.features.items()
    }


def resolve(plan: Plan, plan_hash: str, edition: Edition) -> Entitlements:
    """Combine a plan and its edition into the entitlements a license under it carries."""
    features = feature_grants(edition)
    licensing = plan.licensing
    seat = licensing if isinstance(licensing, SeatLicensing) else None
    return Entitlements(
        plan_ref=f"{plan.plan.key}@{plan.plan.version}",
        plan_hash=plan_hash,
        edition_ref=f"{edition.edition.key}@{edition.edition.version}",
        model=licensing.model,
        features=features,
        quotas=edition.quota_limits(),
        max_activations=licensing.max_activations,
        activation_mode=seat.activation if seat else "node-locked",
        lease_seconds=seat.lease_seconds() if seat else None,
        term=plan.term.length,
        grace_seconds=Duration.parse(plan.term.grace_period).seconds(),
        offline_seconds=Duration.parse(plan.term.offline_allowance).seconds(),
        meters={m.key: m.model_dump() for m in plan.meters},
    )
