"""What changes between two catalog versions: features and quotas gained, lost and changed, and
(for plans) the licensing terms. Pure functions over resolved entitlements; migration planning
reads the result, `catalog diff` prints it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from keyshift.catalog.entitlements import Entitlements, FeatureGrant, feature_grants
from keyshift.catalog.manifests import Edition

Change = Literal["gained", "lost", "changed"]


def describe_grant(grant: FeatureGrant | None) -> str:
    """``enabled``, ``disabled``, ``throttled 100/day`` or ``-`` (not declared)."""
    if grant is None:
        return "-"
    if grant.mode == "throttled":
        return f"throttled {grant.limit}/{grant.period}"
    return grant.mode


@dataclass(frozen=True)
class FeatureChange:
    """A feature whose grant differs. ``None`` means the version does not declare it."""

    name: str
    change: Change
    old: FeatureGrant | None
    new: FeatureGrant | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "change": self.change,
            "old": self.old.to_dict() if self.old else None,
            "new": self.new.to_dict() if self.new else None,
        }


@dataclass(frozen=True)
class QuotaChange:
    """A quota declared on one side only (gained/lost) or with a different limit (changed)."""

    name: str
    change: Change
    old: int | None
    new: int | None

    @property
    def is_lowered(self) -> bool:
        return self.old is not None and self.new is not None and self.new < self.old

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "change": self.change,
            "old": self.old,
            "new": self.new,
        }
        if self.change == "changed":
            body["direction"] = "lowered" if self.is_lowered else "raised"
        return body


@dataclass(frozen=True)
class TermChange:
    """A licensing or term field of a plan that differs (``max_activations``, ``term`` …)."""

    field: str
    old: Any
    new: Any

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class MeterChange:
    name: str
    change: Change
    old: dict[str, Any] | None
    new: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "change": self.change, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class CatalogDiff:
    """Everything that differs from ``old_ref`` to ``new_ref``, each list sorted by name."""

    kind: Literal["edition", "plan"]
    old_ref: str
    new_ref: str
    features: tuple[FeatureChange, ...] = ()
    quotas: tuple[QuotaChange, ...] = ()
    licensing: tuple[TermChange, ...] = ()
    meters: tuple[MeterChange, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.features or self.quotas or self.licensing or self.meters)

    def features_where(self, change: Change) -> tuple[FeatureChange, ...]:
        return tuple(f for f in self.features if f.change == change)

    def quotas_where(self, change: Change) -> tuple[QuotaChange, ...]:
        return tuple(q for q in self.quotas if q.change == change)

    def to_dict(self) -> dict[str, Any]:
        def grouped(items: tuple[FeatureChange, ...] | tuple[QuotaChange, ...]) -> dict[str, Any]:
            return {
                change: [i.to_dict() for i in items if i.change == change]
                for change in ("gained", "lost", "changed")
            }

        return {
            "kind": self.kind,
            "from": self.old_ref,
            "to": self.new_ref,
            "features": grouped(self.features),
            "quotas": grouped(self.quotas),
            "licensing": [c.to_dict() for c in self.licensing],
            "meters": [m.to_dict() for m in self.meters],
        }


def diff_features(
    old: dict[str, FeatureGrant], new: dict[str, FeatureGrant]
) -> tuple[FeatureChange, ...]:
    """Gained: usable now, not before (absent or disabled). Lost: the reverse. Changed: usable on
    both sides with a different grant (enabled ↔ throttled, another limit or period). A feature
    that is unusable on both sides (absent ↔ disabled) grants nothing either way and is skipped."""
    changes: list[FeatureChange] = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        was, now = bool(before and before.is_usable), bool(after and after.is_usable)
        if now and not was:
            changes.append(FeatureChange(name, "gained", before, after))
        elif was and not now:
            changes.append(FeatureChange(name, "lost", before, after))
        elif was and now and before != after:
            changes.append(FeatureChange(name, "changed", before, after))
    return tuple(changes)


def diff_quotas(old: dict[str, int], new: dict[str, int]) -> tuple[QuotaChange, ...]:
    changes: list[QuotaChange] = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before is None and after is not None:
            changes.append(QuotaChange(name, "gained", None, after))
        elif before is not None and after is None:
            changes.append(QuotaChange(name, "lost", before, None))
        elif before != after:
            changes.append(QuotaChange(name, "changed", before, after))
    return tuple(changes)


_TERM_FIELDS = (
    "edition_ref",
    "model",
    "max_activations",
    "activation_mode",
    "lease_seconds",
    "term",
    "grace_seconds",
    "offline_seconds",
)


def diff_plans(old: Entitlements, new: Entitlements) -> CatalogDiff:
    """The difference between what two plan versions grant (their resolved entitlements)."""
    licensing = tuple(
        TermChange(name, getattr(old, name), getattr(new, name))
        for name in _TERM_FIELDS
        if getattr(old, name) != getattr(new, name)
    )
    meters: list[MeterChange] = []
    for name in sorted(old.meters.keys() | new.meters.keys()):
        before, after = old.meters.get(name), new.meters.get(name)
        if before is None:
            meters.append(MeterChange(name, "gained", None, after))
        elif after is None:
            meters.append(MeterChange(name, "lost", before, None))
        elif before != after:
            meters.append(MeterChange(name, "changed", before, after))
    return CatalogDiff(
        kind="plan",
        old_ref=old.plan_ref,
        new_ref=new.plan_ref,
        features=diff_features(old.features, new.features),
        quotas=diff_quotas(old.quotas, new.quotas),
        licensing=licensing,
        meters=tuple(meters),
    )


def diff_editions(old: Edition, new: Edition) -> CatalogDiff:
    """The difference in features and quotas between two edition versions."""
    return CatalogDiff(
        kind="edition",
        old_ref=f"{old.edition.key}@{old.edition.version}",
        new_ref=f"{new.edition.key}@{new.edition.version}",
        features=diff_features(feature_grants(old), feature_grants(new)),
        quotas=diff_quotas(old.quota_limits(), new.quota_limits()),
    )
