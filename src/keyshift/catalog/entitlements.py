"""What a plan grants, resolved from the plan and its edition: a pure function, no I/O.

This is the object the validation hot path caches and signs; migrations compare two of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from keyshift.catalog.durations import Duration
from keyshift.catalog.manifests import Edition, Plan, SeatLicensing, ThrottledFeature

#: A floating plan always names its lease (the manifest requires ``lease_ttl``); this is only
#: the fallback for entitlements built without one.
DEFAULT_LEASE_SECONDS = 3600


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
    #: Set by an account's overrides (see ``with_overrides``): quotas the account may read but
    #: not grow, and the end of a downgrade's grace (the old features and quotas until then).
    read_only: tuple[str, ...] = ()
    grace_until: datetime | None = None
    #: During a downgrade's grace: the account's grant before the migration (``plan``,
    #: ``edition``, ``features``, ``quotas``), shown beside the merged one.
    previous: dict[str, Any] | None = None
    addons: tuple[str, ...] = ()

    @property
    def is_floating(self) -> bool:
        """Machines hold leases that heartbeats extend (else node-locked seats)."""
        return self.activation_mode == "floating"

    @property
    def machine_mode(self) -> str:
        """The ``mode`` of an activation under this plan: ``floating`` or ``node``."""
        return "floating" if self.is_floating else "node"

    def lease_until(self, start: datetime) -> datetime | None:
        """The end of a lease taken or extended at ``start``; None on a node-locked plan."""
        if not self.is_floating:
            return None
        return start + timedelta(seconds=self.lease_seconds or DEFAULT_LEASE_SECONDS)

    def to_dict(self) -> dict[str, Any]:
        """The public form, as signed into validation responses and license files."""
        out: dict[str, Any] = {
            "plan": self.plan_ref,
            "edition": self.edition_ref,
            "model": self.model,
            "features": {k: v.to_dict() for k, v in sorted(self.features.items())},
            "quotas": dict(sorted(self.quotas.items())),
            "max_activations": self.max_activations,
            "activation_mode": self.activation_mode,
        }
        if self.read_only:
            out["read_only"] = list(self.read_only)
        if self.grace_until is not None:
            out["grace_until"] = self.grace_until
        if self.previous is not None:
            out["previous"] = self.previous
        if self.addons:
            out["addons"] = list(self.addons)
        return out

    def public_dict(self) -> dict[str, Any]:
        """``to_dict()``, built once per instance and shared: the caller must not change it.

        The validation hot path signs this on every request; a plan's entitlements object is
        cached for the process's life, so its public form is too. (An instance is frozen, and
        its public form depends on nothing else: one built with overrides for a given moment,
        by ``with_overrides``, is a new instance with its own.)"""
        cached: dict[str, Any] | None = self.__dict__.get("_public_dict")
        if cached is None:
            cached = self.to_dict()
            object.__setattr__(self, "_public_dict", cached)
        return cached


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


def _grant(spec: Any) -> FeatureGrant:
    if isinstance(spec, dict):
        return FeatureGrant(str(spec.get("mode")), spec.get("limit"), spec.get("period"))
    return FeatureGrant(str(spec))


def with_overrides(
    base: Entitlements,
    subscription: dict[str, Any] | None,
    license_overrides: dict[str, Any] | None,
    now: datetime,
) -> Entitlements:
    """The plan's entitlements as one account and license actually hold them.

    ``subscription`` (``Subscription.overrides``): ``addons`` (each with ``features`` and extra
    ``quotas``), ``meters`` (``{meter: {"included": n}}``), ``read_only`` quota names, and a
    ``grace`` (``{"until": …, "entitlements": {"features", "quotas"}, "previous": …}``) under
    which the old features and quotas still apply until ``until`` (and ``previous``, the whole
    old grant, is shown beside them). ``license_overrides``: hand-set
    ``features`` and extra ``quotas`` on one license. Pure; ``now`` decides the grace.
    """
    if not subscription and not license_overrides:
        return base
    subscription = subscription or {}
    features = dict(base.features)
    quotas = dict(base.quotas)
    meters = {k: dict(v) for k, v in base.meters.items()}
    grace_until = None
    previous: dict[str, Any] | None = None
    grace = subscription.get("grace")
    if grace:
        until = datetime.fromisoformat(str(grace["until"]).replace("Z", "+00:00"))
        if until.tzinfo is None:
            until = until.replace(tzinfo=UTC)
        if now < until:
            grace_until = until
            # Absent from graces planned before it was recorded: then only the merged set.
            previous = grace.get("previous")
            old = grace.get("entitlements") or {}
            features.update({k: _grant(v) for k, v in (old.get("features") or {}).items()})
            for name, limit in (old.get("quotas") or {}).items():
                quotas[name] = max(int(limit), quotas.get(name, 0))
    addons = subscription.get("addons") or {}
    for addon in addons.values():
        features.update({k: _grant(v) for k, v in (addon.get("features") or {}).items()})
        for name, extra in (addon.get("quotas") or {}).items():
            quotas[name] = quotas.get(name, 0) + int(extra)
    for name, change in (subscription.get("meters") or {}).items():
        if name in meters and "included" in change:
            meters[name]["included"] = int(change["included"])
    for source in (license_overrides or {},):
        features.update({k: _grant(v) for k, v in (source.get("features") or {}).items()})
        for name, extra in (source.get("quotas") or {}).items():
            quotas[name] = quotas.get(name, 0) + int(extra)
    return replace(
        base,
        features=features,
        quotas=quotas,
        meters=meters,
        read_only=tuple(sorted(subscription.get("read_only") or ())),
        grace_until=grace_until,
        previous=previous,
        addons=tuple(sorted(addons)),
    )
