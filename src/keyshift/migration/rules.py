"""Migration rules: the manifest that says how accounts move from one plan to another.

A rules file is TOML with a documented schema (``docs/migration-rules.md``). ``MigrationRules``
is its shape; ``check_against_catalog`` is the cross-check with the plans and editions it names
(pure: the caller passes the manifests in). Nothing here touches a database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from keyshift.canonical import content_hash
from keyshift.catalog.manifests import (
    MAX_LIMIT,
    Edition,
    Header,
    Key,
    Plan,
    Strict,
    parse_ref,
)

ConflictPolicy = Literal["archive", "read_only", "grace", "block"]


def _ref(value: str) -> str:
    parse_ref(value)
    return value


class RulesHeader(Header):
    """``key@version`` of the rules, plus the plans they move between."""

    from_plans: list[str] = Field(alias="from", min_length=1, max_length=20)
    to: str

    @field_validator("from_plans")
    @classmethod
    def _refs(cls, value: list[str]) -> list[str]:
        for ref in value:
            _ref(ref)
        if len(set(value)) != len(value):
            raise ValueError("a source plan is listed twice")
        return value

    @field_validator("to")
    @classmethod
    def _to(cls, value: str, info: ValidationInfo) -> str:
        _ref(value)
        # Checked here (not on the whole manifest) so the problem names ``rules.to`` and its line.
        if value in (info.data.get("from_plans") or ()):
            raise ValueError(f"cycle: the target plan {value} is also a source plan")
        return value


class AttributePredicate(Strict):
    """A test on one account attribute; ``exists`` needs no value."""

    name: Key
    op: Literal["eq", "ne", "in", "not_in", "exists", "missing", "gte", "lte"]
    value: str | int | float | bool | list[str | int | float] | None = None

    @model_validator(mode="after")
    def _value(self) -> AttributePredicate:
        needs_list = self.op in ("in", "not_in")
        if self.op in ("exists", "missing"):
            if self.value is not None:
                raise ValueError(f"op {self.op!r} takes no value")
        elif self.value is None:
            raise ValueError(f"op {self.op!r} needs a value")
        elif needs_list != isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs {'a list' if needs_list else 'one value'}")
        elif self.op in ("gte", "lte") and not isinstance(self.value, int | float):
            raise ValueError(f"op {self.op!r} compares numbers")
        return self

    def holds(self, attributes: dict[str, Any]) -> bool:
        present = self.name in attributes
        actual = attributes.get(self.name)
        match self.op:
            case "exists":
                return present
            case "missing":
                return not present
            case "eq":
                return present and actual == self.value
            case "ne":
                return actual != self.value
            case "in":
                assert isinstance(self.value, list)
                return present and actual in self.value
            case "not_in":
                assert isinstance(self.value, list)
                return actual not in self.value
            case "gte" | "lte":
                if isinstance(actual, bool) or not isinstance(actual, int | float):
                    return False
                assert isinstance(self.value, int | float)
                return actual >= self.value if self.op == "gte" else actual <= self.value
        raise AssertionError(self.op)


AccountStatus = Literal["active", "suspended"]


def _active_only() -> list[AccountStatus]:
    return ["active"]


class Eligibility(Strict):
    account_status: list[AccountStatus] = Field(default_factory=_active_only, min_length=1)
    attributes: list[AttributePredicate] = Field(default_factory=list, max_length=50)


class FeatureRule(Strict):
    """``keep`` (same name in the target), ``drop`` (lost on purpose) or ``rename`` to ``to``."""

    action: Literal["keep", "drop", "rename"]
    to: Key | None = None

    @model_validator(mode="after")
    def _to(self) -> FeatureRule:
        if (self.action == "rename") != (self.to is not None):
            raise ValueError("'to' is required with action 'rename' and only with it")
        return self


class QuotaRule(Strict):
    """How a quota maps, and what to do when the account is over the target's limit."""

    action: Literal["keep", "drop", "rename"] = "keep"
    to: Key | None = None
    on_conflict: ConflictPolicy = "block"
    grace_days: int | None = Field(default=None, ge=1, le=365)

    @model_validator(mode="after")
    def _check(self) -> QuotaRule:
        if (self.action == "rename") != (self.to is not None):
            raise ValueError("'to' is required with action 'rename' and only with it")
        if (self.on_conflict == "grace") != (self.grace_days is not None):
            raise ValueError("'grace_days' is required with on_conflict 'grace' and only with it")
        return self


class SeatRules(Strict):
    """What happens to activations, and (seat → usage) how seats become metered units."""

    activations: Literal["keep_all", "trim_to_cap"] = "keep_all"
    convert_to_meter: Key | None = None
    units_per_seat: int | None = Field(default=None, ge=1, le=MAX_LIMIT)
    seat_basis: Literal["cap", "active"] = "cap"

    @model_validator(mode="after")
    def _convert(self) -> SeatRules:
        if (self.convert_to_meter is None) != (self.units_per_seat is None):
            raise ValueError("'convert_to_meter' and 'units_per_seat' go together")
        return self


class CounterRule(Strict):
    """``carry`` the current period's count, ``reset`` it, ``prorate`` it into the target's
    period, or ``convert`` it (``factor``) into the meter ``to``."""

    action: Literal["carry", "reset", "prorate", "convert"]
    to: Key | None = None
    factor: float | None = Field(default=None, gt=0, le=1_000_000)

    @model_validator(mode="after")
    def _convert(self) -> CounterRule:
        if self.action == "convert":
            if self.factor is None:
                raise ValueError("action 'convert' needs a factor")
        elif self.to is not None or self.factor is not None:
            raise ValueError("'to' and 'factor' only go with action 'convert'")
        return self


class OverrideRules(Strict):
    """Per-license hand-set values: ``carry`` them, ``reset`` them to the plan's, or ``drop``
    them (features). Each change is recorded per license."""

    max_activations: Literal["carry", "reset"] = "carry"
    features: Literal["carry", "drop"] = "carry"
    quotas: Literal["carry", "drop"] = "carry"


class AddonRule(Strict):
    action: Literal["carry", "drop", "rename"]
    to: Key | None = None

    @model_validator(mode="after")
    def _to(self) -> AddonRule:
        if (self.action == "rename") != (self.to is not None):
            raise ValueError("'to' is required with action 'rename' and only with it")
        return self


class Schedule(Strict):
    effective: Literal["immediately", "period_end", "at"] = "immediately"
    at: datetime | None = None

    @field_validator("at")
    @classmethod
    def _zoned(cls, value: datetime | None) -> datetime | None:
        # A field check, so the problem names ``schedule.at`` and its line.
        if value is not None and value.tzinfo is None:
            raise ValueError("'at' needs a time zone offset (e.g. 2026-12-01T00:00:00Z)")
        return value

    @model_validator(mode="after")
    def _at(self) -> Schedule:
        if (self.effective == "at") != (self.at is not None):
            raise ValueError("'at' is required with effective = 'at' and only with it")
        return self


def _short(value: Any) -> Any:
    """``legacy = "drop"`` is short for ``legacy = { action = "drop" }``."""
    return {"action": value} if isinstance(value, str) else value


class MigrationRules(Strict):
    """One versioned rules manifest."""

    rules: RulesHeader
    eligibility: Eligibility = Field(default_factory=Eligibility)
    features: dict[Key, FeatureRule] = Field(default_factory=dict, max_length=500)
    quotas: dict[Key, QuotaRule] = Field(default_factory=dict, max_length=200)
    seats: SeatRules = Field(default_factory=SeatRules)
    counters: dict[Key, CounterRule] = Field(default_factory=dict, max_length=50)
    overrides: OverrideRules = Field(default_factory=OverrideRules)
    addons: dict[Key, AddonRule] = Field(default_factory=dict, max_length=50)
    addons_default: Literal["carry", "drop", "refuse"] = "refuse"
    schedule: Schedule = Field(default_factory=Schedule)

    @field_validator("features", "quotas", "counters", "addons", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _short(v) for k, v in value.items()}
        return value

    @property
    def ref(self) -> str:
        return f"{self.rules.key}@{self.rules.version}"

    def content(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def content_hash(self) -> str:
        return content_hash(self.content())


# -- the cross-check with the catalog ---------------------------------------------------------


@dataclass(frozen=True)
class RuleProblem:
    """One reason the rules cannot be used with these plans: a dotted field path and why."""

    field: str
    reason: str


@dataclass(frozen=True)
class PlanPair:
    """A published plan with its edition, as the planner needs them."""

    plan: Plan
    plan_hash: str
    edition: Edition

    @property
    def ref(self) -> str:
        return f"{self.plan.plan.key}@{self.plan.plan.version}"


def check_against_catalog(
    rules: MigrationRules,
    sources: dict[str, PlanPair | None],
    target: PlanPair | None,
) -> list[RuleProblem]:
    """Every way the rules fail to fit the plans they name (``None``: not published).

    Refused: unknown plans; a source edition's feature or quota left unmapped; ``keep`` of a
    name the target lacks; a rename onto a name the target lacks; two sources mapped onto one
    target (contradictory); rename chains (a → b while b is itself renamed: a cycle or an
    ambiguity); counters of meters neither plan has; seat conversion into a meter the target
    lacks; ``reset``/``convert``/``prorate`` of a ``unique`` meter (its members cannot be
    scaled).
    """
    problems: list[RuleProblem] = []

    def add(field: str, reason: str) -> None:
        problems.append(RuleProblem(field, reason))

    for index, ref in enumerate(rules.rules.from_plans):
        if sources.get(ref) is None:
            add(f"rules.from.{index}", f"no published plan {ref}")
    if target is None:
        add("rules.to", f"no published plan {rules.rules.to}")
    known_sources = [p for p in sources.values() if p is not None]
    if target is None or not known_sources:
        return problems

    target_features = set(target.edition.features)
    target_quotas = set(target.edition.quota_limits())
    source_features = set().union(*(set(p.edition.features) for p in known_sources))
    source_quotas = set().union(*(set(p.edition.quota_limits()) for p in known_sources))

    def mapping_problems(
        section: str,
        mapping: Mapping[str, FeatureRule | QuotaRule],
        source_names: set[str],
        target_names: set[str],
    ) -> None:
        for name in sorted(source_names - set(mapping)):
            add(f"{section}.{name}", f"the source edition's {section[:-1]} {name!r} is unmapped")
        destinations: dict[str, str] = {}
        for name, rule in sorted(mapping.items()):
            if name not in source_names:
                add(f"{section}.{name}", f"no source edition has a {section[:-1]} {name!r}")
                continue
            if rule.action == "drop":
                continue
            to = rule.to if rule.action == "rename" and rule.to else name
            if to not in target_names:
                add(f"{section}.{name}", f"the target edition has no {section[:-1]} {to!r}")
                continue
            if rule.action == "rename" and to in mapping and to != name:
                other = mapping[to]
                if other.action != "drop":
                    add(
                        f"{section}.{name}.to",
                        f"{to!r} is itself mapped ({other.action}); rename chains are ambiguous",
                    )
            if to in destinations:
                add(
                    f"{section}.{name}",
                    f"contradictory: {destinations[to]!r} is already mapped onto {to!r}",
                )
            destinations[to] = name

    mapping_problems("features", rules.features, source_features, target_features)
    mapping_problems("quotas", rules.quotas, source_quotas, target_quotas)

    source_meters = {m.key: m for p in known_sources for m in p.plan.meters}
    target_meters = {m.key: m for m in target.plan.meters}
    into: dict[str, str] = {}
    for name, rule in sorted(rules.counters.items()):
        field = f"counters.{name}"
        if name not in source_meters:
            add(field, f"no source plan has a meter {name!r}")
            continue
        to = rule.to or name
        if rule.action in ("carry", "prorate", "convert") and to not in target_meters:
            add(field, f"the target plan has no meter {to!r}")
            continue
        if rule.action != "carry" and source_meters[name].aggregation == "unique":
            add(field, f"meter {name!r} counts unique members: only 'carry' can keep it")
        if to in target_meters and target_meters[to].aggregation == "unique" and to != name:
            add(field, f"meter {to!r} counts unique members: nothing can be converted into it")
        if rule.action != "reset":
            if to in into:
                add(field, f"contradictory: {into[to]!r} already goes into meter {to!r}")
            into[to] = name
    for name in sorted(set(source_meters) - set(rules.counters)):
        if name in target_meters:
            add(f"counters.{name}", f"meter {name!r} is in both plans: say carry, reset, …")

    seats = rules.seats
    if seats.convert_to_meter is not None:
        meter = target_meters.get(seats.convert_to_meter)
        if meter is None:
            add(
                "seats.convert_to_meter", f"the target plan has no meter {seats.convert_to_meter!r}"
            )
        elif not any(p.plan.licensing.model == "seat" for p in known_sources):
            add("seats.convert_to_meter", "no source plan is seat-based: there are no seats")
    if seats.activations == "trim_to_cap" and target.plan.licensing.max_activations is None:
        add("seats.activations", "the target plan has no activation cap to trim to")
    for name, addon in sorted(rules.addons.items()):
        if addon.action == "rename" and addon.to in rules.addons and addon.to != name:
            add(f"addons.{name}.to", f"{addon.to!r} is itself mapped; rename chains are ambiguous")
    return problems
