"""The planner: a pure function of (snapshot, rules, source plan, target plan, now) that decides
every step of one account's migration and the state expected after it. It imports no database
code; the executor performs what it decides, and verification compares against ``expected``.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar, cast

import orjson
from typing_extensions import TypedDict

from keyshift.canonical import content_hash
from keyshift.catalog.entitlements import (
    DEFAULT_LEASE_SECONDS,
    Entitlements,
    FeatureGrant,
    resolve,
)
from keyshift.catalog.manifests import Meter
from keyshift.metering.periods import period_containing
from keyshift.migration.rules import FeatureRule, MigrationRules, PlanPair, QuotaRule
from keyshift.migration.state import (
    ActivationData,
    CounterData,
    EntitlementsView,
    ExpectedState,
    FeatureGrantData,
    GraceData,
    GrantsData,
    LicenseData,
    ObjectData,
    PreviousView,
    Snapshot,
    SubscriptionOverrides,
    derived_id,
    iso,
    parse_iso,
    sort_state,
)
from keyshift.states import STEPS as FORWARD_STEPS

STEPS = FORWARD_STEPS  # the steps a plan lists, in order

_V = TypeVar("_V")


class MachineTerms(TypedDict):
    """What an activation is under a plan: ``mode`` (node | floating) and its lease length
    (None: node-locked)."""

    mode: str
    lease_seconds: int | None


@dataclass(frozen=True)
class QuotaConflict:
    """The account uses more of a quota than the target allows, and what the rules do."""

    quota: str  # the target's quota name
    source_quota: str
    used: int
    limit: int
    policy: str  # archive | read_only | grace | block
    resolution: str
    objects_to_archive: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "quota": self.quota,
            "source_quota": self.source_quota,
            "used": self.used,
            "limit": self.limit,
            "policy": self.policy,
            "resolution": self.resolution,
            "objects_to_archive": list(self.objects_to_archive),
        }


@dataclass(frozen=True)
class CounterMove:
    """How one counter row changes at cutover: ``value`` is a function of the count then."""

    meter: str  # the target row's meter
    period_start: str
    period_end: str
    source_meter: str | None  # the row whose count is read (None: a fixed value)
    source_period_start: str | None
    action: str  # carry | reset | prorate | convert
    factor: float = 1.0  # value = round(count * factor); reset: 0

    def value(self, count: int) -> int:
        return 0 if self.action == "reset" else round(count * self.factor)

    @property
    def same_row(self) -> bool:
        return (self.source_meter, self.source_period_start) == (self.meter, self.period_start)

    def to_dict(self) -> dict[str, Any]:
        return {
            "meter": self.meter,
            "period_start": self.period_start,
            "period_end": self.period_end,
            "source_meter": self.source_meter,
            "source_period_start": self.source_period_start,
            "action": self.action,
            "factor": self.factor,
        }


@dataclass(frozen=True)
class MigrationPlan:
    account_id: str
    rules_ref: str
    rules_hash: str
    source_ref: str | None
    target_ref: str
    target_hash: str
    eligible: bool
    reasons: tuple[str, ...]  # why not eligible, or why blocked
    blocked: bool
    effective: str  # immediately | period_end | at
    effective_at: str | None
    steps: tuple[dict[str, Any], ...]
    expected: ExpectedState
    conflicts: tuple[QuotaConflict, ...]
    counter_moves: tuple[CounterMove, ...]
    deactivate: tuple[str, ...]  # activation ids trimmed over the new cap
    archive: tuple[str, ...]  # object ids moved to the archive tier
    risks: tuple[str, ...]
    #: The target's activation terms (``mode``: node | floating, ``lease_seconds``), and the
    #: kept activations switched to them at cutover (ids).
    machine_terms: MachineTerms
    changes: dict[str, Any] = field(default_factory=dict)
    convert: tuple[str, ...] = ()
    #: Licenses with more live machines than their cap at the snapshot (they validated as
    #: ``TOO_MANY_ACTIVATIONS`` then): verify does not blame the migration for it.
    over_cap_before: tuple[str, ...] = ()

    @property
    def can_apply(self) -> bool:
        return self.eligible and not self.blocked

    def outcome_digest(self) -> str:
        """What a scheduled change previews and re-checks at execution: if this differs then,
        the change is held for review instead of applied. Worked out once per plan (``to_dict``
        holds it too): every field it covers is immutable."""
        digest: str | None = self.__dict__.get("_outcome_digest")
        if digest is None:
            digest = content_hash(
                {
                    "eligible": self.eligible,
                    "blocked": self.blocked,
                    "conflicts": [c.to_dict() for c in self.conflicts],
                    "deactivate": list(self.deactivate),
                    "archive": list(self.archive),
                    "risks": list(self.risks),
                    "target": self.target_ref,
                }
            )
            object.__setattr__(self, "_outcome_digest", digest)
        return digest

    def to_dict(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "rules": self.rules_ref,
            "rules_hash": self.rules_hash,
            "from": self.source_ref,
            "to": self.target_ref,
            "to_hash": self.target_hash,
            "eligible": self.eligible,
            "blocked": self.blocked,
            "can_apply": self.can_apply,
            "reasons": list(self.reasons),
            "effective": self.effective,
            "effective_at": self.effective_at,
            "steps": list(self.steps),
            "changes": self.changes,
            "conflicts": [c.to_dict() for c in self.conflicts],
            "counter_moves": [m.to_dict() for m in self.counter_moves],
            "deactivate": list(self.deactivate),
            "machine_terms": self.machine_terms,
            "convert": list(self.convert),
            "over_cap_before": list(self.over_cap_before),
            "archive": list(self.archive),
            "risks": list(self.risks),
            "expected": self.expected,
            "outcome_digest": self.outcome_digest(),
        }


# -- entitlements with the account's overrides --------------------------------------------------


def quota_usage(state: ExpectedState) -> dict[str, int]:
    """Units of each quota held by live objects in the standard tier."""
    used: dict[str, int] = {}
    for obj in state["objects"]:
        if obj["state"] == "active" and obj["tier"] == "standard":
            used[obj["quota"]] = used.get(obj["quota"], 0) + int(obj["units"])
    return used


def effective_view(
    entitlements: Entitlements, overrides: SubscriptionOverrides
) -> EntitlementsView:
    """Features and quotas a subscription's overrides make of its plan's (for the plan diff)."""
    features = {k: cast(FeatureGrantData, v.to_dict()) for k, v in entitlements.features.items()}
    quotas = dict(entitlements.quotas)
    for addon in (overrides.get("addons") or {}).values():
        for name, mode in (addon.get("features") or {}).items():
            features[name] = {"mode": mode}
        for name, extra in (addon.get("quotas") or {}).items():
            quotas[name] = quotas.get(name, 0) + int(extra)
    return {"features": features, "quotas": quotas}


def previous_view(source: Entitlements, overrides: SubscriptionOverrides) -> PreviousView:
    """The account's whole grant before the migration (plan and add-ons), which validation
    shows beside the merged set during a grace (``entitlements.previous``)."""
    return {
        "plan": source.plan_ref,
        "edition": source.edition_ref,
        **effective_view(source, overrides),
    }


def grace_view(
    source: Entitlements,
    overrides: SubscriptionOverrides,
    target: Entitlements,
    carried_addons: dict[str, GrantsData],
) -> EntitlementsView:
    """The old entitlements a grace keeps, as ``with_overrides`` lays them over the new ones.

    Features: each one the old plan granted more of than the new one; one the old plan left
    disabled, or granted no more of, is left out (the grace must not take away what the new
    plan grants). Quotas: the old limits less what the carried add-ons add again on top, so the
    account gets the larger of its old and its new limit, each add-on counted once.
    """
    view = effective_view(source, overrides)
    view["features"] = {
        name: grant
        for name, grant in view["features"].items()
        if _more_generous(grant, target.features.get(name))
    }
    for addon in carried_addons.values():
        for name, extra in (addon.get("quotas") or {}).items():
            if name in view["quotas"]:
                view["quotas"][name] = max(0, view["quotas"][name] - int(extra))
    return view


def _more_generous(old: FeatureGrantData, new: FeatureGrant | None) -> bool:
    if old.get("mode") == "disabled":
        return False
    if new is None or not new.is_usable or (new.mode == "throttled" and old["mode"] == "enabled"):
        return True
    if new.mode == "throttled" and old["mode"] == "throttled":
        if old.get("period") != new.period:
            return True  # not comparable: the old grant, as the grace promises
        return int(old.get("limit") or 0) > int(new.limit or 0)
    return False


# -- what no account changes: worked out once per (rules, source plan, target plan) -----------


@dataclass(frozen=True)
class _Pairing:
    """Everything a plan needs of its rules and its two plans that no account changes: the
    resolved entitlements, the rules' hash, the features lost, the target's machine terms, the
    quota mappings, the meters, and the parts of the plan that are the same for every account
    without add-ons. Made once per combination (``_pairing``), not once per account."""

    rules: MigrationRules
    source: PlanPair | None
    target: PlanPair
    rules_ref: str
    rules_hash: str
    source_ref: str | None
    target_ref: str
    source_ent: Entitlements | None
    target_ent: Entitlements
    lost: tuple[str, ...]  # ``loses_feature:…`` risks, by feature name
    machine_terms: MachineTerms
    source_reasons: tuple[str, ...]  # why not eligible, from the source plan alone
    #: (source quota, its rule, the target quota it maps to, the target's limit), by name.
    quotas: tuple[tuple[str, QuotaRule, str, int | None], ...]
    source_meters: dict[str, Meter]
    target_meters: dict[str, Meter]
    effective: tuple[str, str | None] | None  # None: it depends on the account
    #: ``_entitlement_changes`` when neither side has an add-on, as JSON (each plan gets its
    #: own copy).
    plain_changes: bytes
    #: A grace's ``entitlements`` and ``previous`` when neither side has an add-on, as JSON
    #: (None: no source plan).
    plain_grace: bytes | None
    #: ``_entitlement_changes`` as JSON by the add-ons of each side (``_changes_of``).
    changes_by_addons: dict[bytes, bytes] = field(default_factory=dict)


#: Pairings by the identity of (rules, source, target); a pairing holds the three, so their
#: ids cannot be reused while it is here. The executor and the run planner pass the same
#: objects for every account of a batch (as ``Batch.digest`` relies on too): rules and
#: published plans are immutable.
_PAIRINGS: dict[tuple[int, int, int], _Pairing] = {}
_MAX_PAIRINGS = 64
_MAX_ADDON_SETS = 256


def _pairing(rules: MigrationRules, source: PlanPair | None, target: PlanPair) -> _Pairing:
    key = (id(rules), id(source), id(target))
    found = _PAIRINGS.get(key)
    if (
        found is not None
        and found.rules is rules
        and found.source is source
        and found.target is target
    ):
        return found
    made = _make_pairing(rules, source, target)
    if len(_PAIRINGS) >= _MAX_PAIRINGS:
        del _PAIRINGS[next(iter(_PAIRINGS))]
    _PAIRINGS[key] = made
    return made


def _make_pairing(rules: MigrationRules, source: PlanPair | None, target: PlanPair) -> _Pairing:
    target_ent = resolve(target.plan, target.plan_hash, target.edition)
    source_ent = resolve(source.plan, source.plan_hash, source.edition) if source else None
    if source is None:
        source_reasons: tuple[str, ...] = ("the account has no plan to migrate from",)
    elif source.ref not in rules.rules.from_plans:
        source_reasons = (f"the account's plan {source.ref} is not a source of these rules",)
    else:
        source_reasons = ()
    quotas = []
    for name, rule in sorted(rules.quotas.items()):
        to = rule.to if rule.action == "rename" and rule.to else name
        quotas.append((name, rule, to, target_ent.quotas.get(to)))
    schedule = rules.schedule
    effective: tuple[str, str | None] | None = None
    if schedule.effective == "at":
        effective = ("at", iso(schedule.at))
    elif schedule.effective != "period_end":
        effective = ("immediately", None)
    plain = _entitlement_changes(source_ent, {}, target_ent, {})
    return _Pairing(
        rules=rules,
        source=source,
        target=target,
        rules_ref=rules.ref,
        source_ref=source.ref if source else None,
        target_ref=target.ref,
        rules_hash=rules.content_hash(),
        source_ent=source_ent,
        target_ent=target_ent,
        lost=tuple(
            f"loses_feature:{name}" for name in _lost_features(source_ent, target_ent, rules)
        ),
        machine_terms=machine_terms(target_ent),
        source_reasons=source_reasons,
        quotas=tuple(quotas),
        source_meters={m.key: m for m in source.plan.meters} if source else {},
        target_meters={m.key: m for m in target.plan.meters},
        effective=effective,
        plain_changes=orjson.dumps(plain),
        plain_grace=None
        if source_ent is None
        else orjson.dumps(
            {
                "entitlements": grace_view(source_ent, {}, target_ent, {}),
                "previous": previous_view(source_ent, {}),
            }
        ),
    )


def _changes_of(
    pairing: _Pairing, old: SubscriptionOverrides, new: SubscriptionOverrides
) -> dict[str, Any]:
    """``_entitlement_changes``, a new dict for each plan. It depends on the add-ons alone
    (``effective_view`` reads nothing else), so it is worked out once per pairing and pair of
    add-on sets, and kept as JSON."""
    old_addons, new_addons = old.get("addons"), new.get("addons")
    if not old_addons and not new_addons:
        return cast(dict[str, Any], orjson.loads(pairing.plain_changes))
    try:
        # Add-ons apply in order (a later one's feature wins): the key keeps it.
        key = orjson.dumps([old_addons, new_addons])
    except (orjson.JSONEncodeError, TypeError):  # not JSON: worked out for this plan alone
        return _entitlement_changes(pairing.source_ent, old, pairing.target_ent, new)
    found = pairing.changes_by_addons.get(key)
    if found is None:
        if len(pairing.changes_by_addons) >= _MAX_ADDON_SETS:
            pairing.changes_by_addons.clear()
        changes = _entitlement_changes(pairing.source_ent, old, pairing.target_ent, new)
        found = pairing.changes_by_addons[key] = orjson.dumps(changes)
    return cast(dict[str, Any], orjson.loads(found))


# -- the plan ---------------------------------------------------------------------------------


def _copy(value: _V) -> _V:
    """A deep copy of JSON data: through JSON (orjson), ten times faster than ``deepcopy`` on
    trees of dicts, lists and scalars; ``deepcopy`` for a value JSON cannot hold."""
    try:
        return cast(_V, orjson.loads(orjson.dumps(value)))
    except (orjson.JSONEncodeError, TypeError):
        return copy.deepcopy(value)


def plan_migration(
    snapshot: Snapshot,
    rules: MigrationRules,
    source: PlanPair | None,
    target: PlanPair,
    *,
    migration_id: str,
    now: datetime,
) -> MigrationPlan:
    """Decide every step and the expected end state; touch nothing.

    ``source`` is the account's current plan (None: it has none). ``migration_id`` seeds the
    ids of what the migration creates, so a recomputed plan names the same rows.
    """
    pairing = _pairing(rules, source, target)
    source_ent, target_ent = pairing.source_ent, pairing.target_ent
    reasons = _eligibility_reasons(snapshot, rules, pairing)
    sub = snapshot["subscription"]
    old_overrides: SubscriptionOverrides = (sub["overrides"] if sub else None) or {}

    quotas = _quota_conflicts(snapshot, rules, old_overrides, pairing)
    addons = _subscription_addons(old_overrides, rules)
    overrides = _subscription_overrides(
        snapshot, rules, pairing, old_overrides, addons.carried, quotas, now
    )
    # The expected state is the snapshot without its time, on the target plan: every row in
    # it a new dict (licenses and activations are copied as they are changed below).
    live = _Liveness(now)
    licenses = _map_licenses(snapshot["licenses"], rules)
    seats = _seat_changes(
        snapshot,
        licenses,
        snapshot["activations"],
        rules,
        source_ent,
        target_ent,
        pairing.machine_terms,
        now,
        live,
    )
    moves = _counter_moves(snapshot, rules, pairing, now)
    counters = _apply_moves(snapshot["counters"], moves)
    expected: ExpectedState = {
        "account": _copy(snapshot["account"]),
        "subscription": {
            "plan": pairing.target_ref,
            "plan_hash": target.plan_hash,
            "started_at": (sub["started_at"] if sub else None) or iso(now),
            "overrides": overrides,
        },
        "licenses": seats.licenses,
        "activations": seats.activations,
        "counters": counters,
        "objects": _archive_objects(snapshot["objects"], quotas.archive, migration_id),
    }
    sort_state(expected)

    blocked = quotas.blocked + addons.blocked
    effective, effective_at = pairing.effective or _effective(rules, snapshot, source_ent, now)
    deactivate = sorted(seats.deactivate)
    archive = sorted(quotas.archive)
    converted = sorted(seats.converted, key=_BY_ACTIVATION_ID)
    changes = {
        "plan": {"from": pairing.source_ref, "to": pairing.target_ref},
        "entitlements": _changes_of(pairing, old_overrides, overrides),
        "licenses": _license_changes(snapshot["licenses"], seats.licenses),
        "activations_deactivated": deactivate,
        "activations_converted": converted,
        "activations_grandfathered": seats.grandfathered,
        "objects_archived": archive,
        "counters": _counter_changes(snapshot, expected["counters"]),
        "subscription_overrides": {
            "before": _copy(old_overrides) if old_overrides else {},
            "after": overrides,
        },
    }
    terms: MachineTerms = {**pairing.machine_terms}
    return MigrationPlan(
        account_id=snapshot["account"]["id"],
        rules_ref=pairing.rules_ref,
        rules_hash=pairing.rules_hash,
        source_ref=pairing.source_ref,
        target_ref=pairing.target_ref,
        target_hash=target.plan_hash,
        eligible=not reasons,
        reasons=tuple(reasons + blocked),
        blocked=bool(blocked),
        effective=effective,
        effective_at=effective_at,
        steps=_steps(
            pairing.target_ref,
            archived=len(archive),
            deactivated=len(deactivate),
            converted=len(converted),
            mode=terms["mode"],
            pinned=len(seats.grandfathered),
            moves=len(moves),
        ),
        expected=expected,
        conflicts=tuple(quotas.conflicts),
        counter_moves=tuple(moves),
        deactivate=tuple(deactivate),
        archive=tuple(archive),
        risks=(*pairing.lost, *quotas.risks, *addons.risks, *seats.risks),
        machine_terms=terms,
        changes=changes,
        convert=tuple(c["activation_id"] for c in converted),
        over_cap_before=tuple(seats.over_cap_before),
    )


_BY_ACTIVATION_ID = operator.itemgetter("activation_id")


def _lost_features(
    source_ent: Entitlements | None, target_ent: Entitlements, rules: MigrationRules
) -> list[str]:
    """Features: what the app loses (usable before, not after the mapping)."""
    lost: list[str] = []
    if source_ent is None:
        return lost
    for name, grant in sorted(source_ent.features.items()):
        feature_rule = rules.features.get(name)
        to = (feature_rule.to or name) if feature_rule and feature_rule.action == "rename" else name
        target_grant = target_ent.features.get(to)
        if grant.is_usable and (
            feature_rule is None
            or feature_rule.action == "drop"
            or target_grant is None
            or not target_grant.is_usable
        ):
            lost.append(name)
    return lost


# The outcomes of the steps below are named tuples: made for every account, a tuple is
# cheaper to make than a frozen dataclass.
class _QuotaOutcome(NamedTuple):
    conflicts: list[QuotaConflict]
    archive: list[str]  # object ids, in the order the conflicts found them
    read_only: list[str]  # target quotas that become read-only
    grace_days: int  # 0: no grace
    risks: list[str]
    blocked: list[str]


def _quota_conflicts(
    snapshot: ExpectedState,
    rules: MigrationRules,
    old_overrides: SubscriptionOverrides,
    pairing: _Pairing,
) -> _QuotaOutcome:
    """Quotas: conflicts where the account holds more than the target allows."""
    usage = quota_usage(snapshot)
    conflicts: list[QuotaConflict] = []
    archive: list[str] = []
    read_only: list[str] = []
    grace_days = 0
    risks: list[str] = []
    blocked: list[str] = []
    has_addons = bool(old_overrides.get("addons"))
    for name, rule, to, base in pairing.quotas:
        if rule.action == "drop":
            if usage.get(name):
                risks.append(f"quota_dropped_with_data:{name}")
            continue
        used = usage.get(name, 0)
        limit = _addon_quota(old_overrides, rules, to, base) if has_addons else base
        if limit is None or used <= limit:
            continue
        risks.append(f"over_quota:{to}")
        excess: tuple[str, ...] = ()
        if rule.on_conflict == "archive":
            excess = _objects_over(snapshot, name, limit)
            archive += excess
            resolution = f"archive {len(excess)} object(s) to bring {used} down to {limit}"
            risks.append(f"data_to_archive:{to}:{len(excess)}")
        elif rule.on_conflict == "read_only":
            read_only.append(to)
            resolution = f"{to} becomes read-only: data kept, nothing new until under {limit}"
        elif rule.on_conflict == "grace":
            assert rule.grace_days is not None
            grace_days = max(grace_days, rule.grace_days)
            resolution = f"keep the old entitlements for {rule.grace_days} day(s)"
        else:
            resolution = "the migration is blocked"
            blocked.append(
                f"quota {to}: {used} used, the target allows {limit} (on_conflict=block)"
            )
        conflicts.append(QuotaConflict(to, name, used, limit, rule.on_conflict, resolution, excess))
    return _QuotaOutcome(conflicts, archive, read_only, grace_days, risks, blocked)


class _AddonOutcome(NamedTuple):
    carried: dict[str, GrantsData]  # add-ons on the new subscription, by their new names
    risks: list[str]
    blocked: list[str]


def _subscription_addons(
    old_overrides: SubscriptionOverrides, rules: MigrationRules
) -> _AddonOutcome:
    """Add-ons on the subscription: carried, renamed, dropped, or refused."""
    carried: dict[str, GrantsData] = {}
    risks: list[str] = []
    blocked: list[str] = []
    addons = old_overrides.get("addons")
    if not addons:
        return _AddonOutcome(carried, risks, blocked)
    for name, content in sorted(addons.items()):
        addon_rule = rules.addons.get(name)
        action = addon_rule.action if addon_rule else rules.addons_default
        if action == "refuse":
            blocked.append(f"add-on {name!r} has no rule (addons_default = 'refuse')")
        elif action == "carry":
            carried[name] = _copy(content)
        elif action == "rename" and addon_rule is not None and addon_rule.to:
            carried[addon_rule.to] = _copy(content)
        else:
            risks.append(f"drops_addon:{name}")
    return _AddonOutcome(carried, risks, blocked)


def _subscription_overrides(
    snapshot: ExpectedState,
    rules: MigrationRules,
    pairing: _Pairing,
    old_overrides: SubscriptionOverrides,
    addons: dict[str, GrantsData],
    quotas: _QuotaOutcome,
    now: datetime,
) -> SubscriptionOverrides:
    """Subscription: the overrides the rules produce on the target plan."""
    source_ent, target_ent = pairing.source_ent, pairing.target_ent
    overrides: SubscriptionOverrides = {}
    if addons:
        overrides["addons"] = addons
    if quotas.read_only:
        overrides["read_only"] = sorted(quotas.read_only)
    if quotas.grace_days:
        until = iso(now + timedelta(days=quotas.grace_days))
        if pairing.plain_grace is not None and not addons and not old_overrides.get("addons"):
            plain: GraceData = orjson.loads(pairing.plain_grace)
            overrides["grace"] = {
                "until": until,
                "entitlements": plain["entitlements"],
                "previous": plain["previous"],
            }
        else:
            old_view = (
                grace_view(source_ent, old_overrides, target_ent, addons)
                if source_ent
                else effective_view(target_ent, {})
            )
            overrides["grace"] = {"until": until, "entitlements": old_view}
            if source_ent is not None:
                overrides["grace"]["previous"] = previous_view(source_ent, old_overrides)
    seat_units = _seat_units(snapshot, rules, source_ent)
    if seat_units is not None and rules.seats.convert_to_meter:
        overrides["meters"] = {rules.seats.convert_to_meter: {"included": seat_units}}
    return overrides


def _map_licenses(licenses: list[LicenseData], rules: MigrationRules) -> list[LicenseData]:
    """Licenses: hand-set overrides carried, mapped or reset as the rules say (new rows)."""
    is_reset = rules.overrides.max_activations == "reset"
    return [
        {
            **lic,
            "max_activations_override": None if is_reset else lic["max_activations_override"],
            "overrides": _map_license_overrides(lic["overrides"] or {}, rules),
        }
        for lic in licenses
    ]


class _SeatOutcome(NamedTuple):
    licenses: list[LicenseData]  # with caps pinned by ``keep_all``
    activations: list[ActivationData]  # the kept ones, switched to the target's mode
    deactivate: list[str]
    over_cap_before: list[str]
    grandfathered: list[dict[str, Any]]
    converted: list[dict[str, Any]]
    risks: list[str]


def _seat_changes(
    snapshot: ExpectedState,
    licenses: list[LicenseData],
    activations: list[ActivationData],
    rules: MigrationRules,
    source_ent: Entitlements | None,
    target_ent: Entitlements,
    terms: MachineTerms,
    now: datetime,
    live: _Liveness,
) -> _SeatOutcome:
    """Activations: keep all, or keep up to each license's new cap, most recently seen first.

    Works on copies of the rows it is given (pinning and converting change them)."""
    licenses = [lic.copy() for lic in licenses]
    deactivate: list[str] = []
    risks: list[str] = []
    if rules.seats.activations == "trim_to_cap":
        for lic in licenses:
            cap = lic["max_activations_override"] or target_ent.max_activations
            if cap is None:
                continue
            mine = [a for a in activations if a["license_id"] == lic["id"]]
            mine.sort(key=lambda a: _recency(a, live), reverse=True)
            deactivate += [a["id"] for a in mine[cap:]]
        if deactivate:
            risks.append(f"activations_trimmed:{len(deactivate)}")
    gone = set(deactivate)
    kept = [a.copy() for a in activations if a["id"] not in gone]
    caps_before = _caps(snapshot, source_ent)
    seats_before = _live_seats(snapshot["activations"], live)
    over_cap_before = sorted(
        lic_id
        for lic_id, cap in caps_before.items()
        if cap is not None and seats_before.get(lic_id, 0) > cap
    )
    grandfathered: list[dict[str, Any]] = []
    if rules.seats.activations == "keep_all":
        seats_kept = _live_seats(kept, live) if deactivate else seats_before
        grandfathered = _grandfather_seats(licenses, seats_kept, caps_before, target_ent)
        if grandfathered:
            risks.append(f"activations_grandfathered:{len(grandfathered)}")
    converted = _convert_activations(kept, target_ent, terms, now, live)
    return _SeatOutcome(
        licenses, kept, deactivate, over_cap_before, grandfathered, converted, risks
    )


def _license_changes(before: list[LicenseData], after: list[LicenseData]) -> list[dict[str, Any]]:
    """Each license whose hand-set cap or overrides differ, before and after."""
    was = {
        lic["id"]: {"max": lic["max_activations_override"], "overrides": lic["overrides"]}
        for lic in before
    }
    changed = []
    for lic in after:
        now_is = {"max": lic["max_activations_override"], "overrides": lic["overrides"]}
        if was[lic["id"]] != now_is:
            before_is = _copy(was[lic["id"]])  # the snapshot's own dicts stay its own
            changed.append({"license_id": lic["id"], "before": before_is, "after": now_is})
    return changed


def _archive_objects(
    objects: list[ObjectData], archive: list[str], migration_id: str
) -> list[ObjectData]:
    """Objects over a quota: copied to the archive tier, the originals superseded (released
    only at finalize, so rollback has them)."""
    to_archive = set(archive)
    new_objects: list[ObjectData] = []
    for obj in objects:
        if obj["id"] in to_archive:
            new_objects.append({**obj, "state": "superseded"})
            copy_id = derived_id(migration_id, "archive", obj["id"])
            new_objects.append({**obj, "id": copy_id, "tier": "archive", "state": "active"})
        else:
            new_objects.append(obj.copy())  # a row of scalars
    return new_objects


def _counter_changes(snapshot: ExpectedState, counters: list[CounterData]) -> list[dict[str, Any]]:
    """Each counter whose count the moves change, before and after."""
    return [
        {
            "meter": c["meter"],
            "period_start": c["period_start"],
            "before": _count(snapshot["counters"], c["meter"], c["period_start"]),
            "after": c["used"],
        }
        for c in counters
        if _count(snapshot["counters"], c["meter"], c["period_start"]) != c["used"]
    ]


def _eligibility_reasons(
    snapshot: ExpectedState, rules: MigrationRules, pairing: _Pairing
) -> list[str]:
    account = snapshot["account"]
    reasons = []
    if account["status"] not in rules.eligibility.account_status:
        allowed = ", ".join(rules.eligibility.account_status)
        reasons.append(f"account status is {account['status']!r} (rules allow: {allowed})")
    reasons += pairing.source_reasons
    attributes = account.get("attributes") or {}
    for predicate in rules.eligibility.attributes:
        if not predicate.holds(attributes):
            reasons.append(f"attribute {predicate.name!r} fails {predicate.op} {predicate.value!r}")
    return reasons


def _addon_quota(
    overrides: SubscriptionOverrides, rules: MigrationRules, quota: str, base: int | None
) -> int | None:
    """The target limit plus what carried add-ons add to it."""
    if base is None:
        return None
    extra = 0
    for name, addon in (overrides.get("addons") or {}).items():
        rule = rules.addons.get(name)
        action = rule.action if rule else rules.addons_default
        if action in ("carry", "rename"):
            extra += int((addon.get("quotas") or {}).get(quota, 0))
    return base + extra


def machine_terms(target: Entitlements) -> MachineTerms:
    """What an activation is under the target plan: its ``mode`` and lease length."""
    lease_seconds = (target.lease_seconds or DEFAULT_LEASE_SECONDS) if target.is_floating else None
    return {"mode": target.machine_mode, "lease_seconds": lease_seconds}


def _convert_activations(
    kept: list[ActivationData],
    target: Entitlements,
    terms: MachineTerms,
    now: datetime,
    live: _Liveness,
) -> list[dict[str, Any]]:
    """Switch each kept machine that holds a seat to the target's activation mode, in place:
    node-locked (no lease), or floating with a lease from the cutover (``now`` here; the
    cutover writes its own time). A lapsed lease is a free seat, not a machine: it is left
    as it is, to be reclaimed or re-acquired as ever. Returns what changed, per activation."""
    changed: list[dict[str, Any]] = []
    floating = target.is_floating
    lease: str | None = None
    for activation in kept:
        if (activation["mode"] == "floating") == floating or not live(activation):
            continue
        if not changed:
            lease = iso(target.lease_until(now))
        before = {"mode": activation["mode"], "lease_expires_at": activation["lease_expires_at"]}
        activation["mode"] = target.machine_mode
        activation["lease_expires_at"] = lease
        changed.append(
            {
                "activation_id": activation["id"],
                "license_id": activation["license_id"],
                "fingerprint": activation["fingerprint"],
                "from": before,
                "to": {**terms},
            }
        )
    return changed


def _caps(snapshot: ExpectedState, source: Entitlements | None) -> dict[str, int | None]:
    """Each license's activation cap at the snapshot: its hand-set cap, else the source
    plan's (None: uncapped), as validation reads it."""
    plan_cap = source.max_activations if source is not None else None
    return {
        lic["id"]: lic["max_activations_override"]
        if lic["max_activations_override"] is not None
        else plan_cap
        for lic in snapshot["licenses"]
    }


def _live_seats(activations: list[ActivationData], live: _Liveness) -> dict[str, int]:
    """Live machines per license id."""
    seats: dict[str, int] = {}
    for a in activations:
        if live(a):
            seats[a["license_id"]] = seats.get(a["license_id"], 0) + 1
    return seats


def _grandfather_seats(
    licenses: list[LicenseData],
    live_seats: dict[str, int],
    caps_before: dict[str, int | None],
    target: Entitlements,
) -> list[dict[str, Any]]:
    """``keep_all`` keeps every machine; where a license then holds more live seats than its
    cap on the target (its hand-set cap after the ``[overrides]`` rule, else the plan's), pin
    its hand-set cap to the seats kept, in place, so it keeps validating and a new machine is
    refused until it is under the pin. Never above the cap it had: a license already over its
    cap at the snapshot stays exactly as over it. A revoked license holds no seats that
    matter. ``live_seats``: the live machines kept, per license. Returns what was pinned,
    per license."""
    pinned = []
    for lic in licenses:
        if lic["status"] == "revoked":
            continue
        target_cap = lic["max_activations_override"] or target.max_activations
        if target_cap is None:
            continue
        kept = live_seats.get(lic["id"], 0)
        cap_before = caps_before.get(lic["id"])
        seats = kept if cap_before is None else min(kept, cap_before)
        if seats <= target_cap:
            continue
        lic["max_activations_override"] = seats
        pinned.append(
            {
                "license_id": lic["id"],
                "kept": kept,
                "target_cap": target_cap,
                "pinned_cap": seats,
                "reason": (
                    f"seats.activations = keep_all kept {kept} live machine(s) over the"
                    f" target's cap of {target_cap}: the license's cap is pinned to {seats}"
                ),
            }
        )
    return pinned


class _Liveness:
    """Whether a machine holds its seat at ``now``: no lease, or a lease running past it. Each
    lease instant is parsed once per plan, however many times it is asked about."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self._leases: dict[str, bool] = {}

    def __call__(self, activation: ActivationData) -> bool:
        text = activation["lease_expires_at"]
        if text is None:
            return True
        found = self._leases.get(text)
        if found is None:
            lease = parse_iso(text)
            found = self._leases[text] = lease is None or lease > self.now
        return found


def _objects_over(snapshot: ExpectedState, quota: str, limit: int) -> tuple[str, ...]:
    """Keep the newest objects that fit in ``limit``; the rest go to the archive."""
    live = [
        o
        for o in snapshot["objects"]
        if o["quota"] == quota and o["state"] == "active" and o["tier"] == "standard"
    ]
    live.sort(key=lambda o: (o["created_at"], o["id"]), reverse=True)
    kept, excess = 0, []
    for obj in live:
        if kept + int(obj["units"]) <= limit:
            kept += int(obj["units"])
        else:
            excess.append(obj["id"])
    return tuple(sorted(excess))


def _recency(activation: ActivationData, live: _Liveness) -> tuple[int, str, str, str]:
    is_live = 1 if live(activation) else 0  # a lapsed lease goes first
    return (
        is_live,
        activation["last_seen_at"] or "",
        activation["created_at"] or "",
        activation["id"],
    )


def _map_license_overrides(overrides: GrantsData, rules: MigrationRules) -> GrantsData:
    """A license's hand-set features and quotas, carried through the rules' mappings (a kept
    or unlisted name stays, a renamed one moves, a dropped one goes) or dropped wholesale."""
    out: GrantsData = {}
    if not overrides:
        return out
    features = overrides.get("features") if rules.overrides.features == "carry" else None
    if features and (mapped_features := _map_names(features, rules.features)):
        out["features"] = mapped_features
    quotas = overrides.get("quotas") if rules.overrides.quotas == "carry" else None
    if quotas and (mapped_quotas := _map_names(quotas, rules.quotas)):
        out["quotas"] = mapped_quotas
    return out


def _map_names(
    values: dict[str, _V], mapping: Mapping[str, FeatureRule | QuotaRule]
) -> dict[str, _V]:
    mapped = {}
    for name, value in values.items():
        rule = mapping.get(name)
        if rule is None or rule.action == "keep":
            mapped[name] = value
        elif rule.action == "rename" and rule.to:
            mapped[rule.to] = value
    return mapped


def _seat_units(
    snapshot: ExpectedState, rules: MigrationRules, source_ent: Entitlements | None
) -> int | None:
    seats_rule = rules.seats
    if seats_rule.convert_to_meter is None or seats_rule.units_per_seat is None:
        return None
    active = [lic for lic in snapshot["licenses"] if lic["status"] == "active"]
    if seats_rule.seat_basis == "active":
        ids = {lic["id"] for lic in active}
        seats = sum(1 for a in snapshot["activations"] if a["license_id"] in ids)
    else:
        default_cap = source_ent.max_activations if source_ent else None
        seats = sum((lic["max_activations_override"] or default_cap or 0) for lic in active)
    return seats * seats_rule.units_per_seat


def _period(
    meter: Meter,
    anchor: datetime,
    when: datetime,
    term: str,
    known: dict[tuple[str, str], tuple[str, str]],
) -> tuple[str, str]:
    """The period of ``meter`` containing ``when``, as text; ``known``: those worked out for
    this account already, by (reset, term) (meters of both plans often share one)."""
    key = (meter.reset, term)
    found = known.get(key)
    if found is None:
        span = period_containing(meter.reset, anchor, when, term=term)
        found = known[key] = (iso(span.start) or "", iso(span.end) or "")
    return found


def _counter_moves(
    snapshot: ExpectedState, rules: MigrationRules, pairing: _Pairing, now: datetime
) -> list[CounterMove]:
    source, target = pairing.source, pairing.target
    source_meters, target_meters = pairing.source_meters, pairing.target_meters
    if not rules.counters or not source_meters:
        return []
    sub = snapshot["subscription"]
    anchor = parse_iso(sub["started_at"] if sub else None) or now
    moves = []
    periods: dict[tuple[str, str], tuple[str, str]] = {}
    for name, rule in sorted(rules.counters.items()):
        meter = source_meters.get(name)
        if meter is None or source is None:
            continue
        src_start, _ = _period(meter, anchor, now, source.plan.term.length, periods)
        to = rule.to or name
        to_meter = target_meters.get(to)
        if to_meter is None:
            continue
        start, end = _period(to_meter, anchor, now, target.plan.term.length, periods)
        factor = 1.0
        if rule.action == "convert":
            factor = float(rule.factor or 1.0)
        elif rule.action == "prorate":
            factor = _overlap_share(src_start, parse_iso(start), parse_iso(end), now)
        moves.append(CounterMove(to, start, end, name, src_start, rule.action, factor))
    return moves


def _overlap_share(
    source_start: str, start: datetime | None, end: datetime | None, now: datetime
) -> float:
    """The share of the source period's elapsed time that falls inside the target's current
    period: usage is assumed spread evenly over it."""
    began = parse_iso(source_start)
    if began is None or start is None or end is None or now <= began:
        return 1.0
    elapsed = (now - began).total_seconds()
    overlap = (min(now, end) - max(began, start)).total_seconds()
    return max(0.0, min(1.0, overlap / elapsed))


def _count(counters: list[CounterData], meter: str | None, period_start: str | None) -> int:
    for counter in counters:
        if counter["meter"] == meter and counter["period_start"] == period_start:
            return int(counter["used"])
    return 0


def _apply_moves(counters: list[CounterData], moves: list[CounterMove]) -> list[CounterData]:
    """The counters after the moves, reading every source count before writing any target.

    Each move is a delta, as the executor applies it (``value - count`` on its own row,
    ``+ value`` on another), so the result does not depend on the order of the moves.
    """
    counts = [_count(counters, m.source_meter, m.source_period_start) for m in moves]
    out = {(c["meter"], c["period_start"]): c.copy() for c in counters}
    for move, count in zip(moves, counts, strict=True):
        value = move.value(count)
        key = (move.meter, move.period_start)
        row = out.setdefault(
            key,
            {
                "meter": move.meter,
                "period_start": move.period_start,
                "period_end": move.period_end,
                "used": 0,
            },
        )
        row["used"] = int(row["used"]) + (value - count if move.same_row else value)
    return [out[k] for k in sorted(out)]


def _effective(
    rules: MigrationRules, snapshot: ExpectedState, source_ent: Entitlements | None, now: datetime
) -> tuple[str, str | None]:
    schedule = rules.schedule
    if schedule.effective == "at":
        return "at", iso(schedule.at)
    if schedule.effective == "period_end":
        sub = snapshot["subscription"]
        anchor = parse_iso(sub["started_at"] if sub else None) or now
        term = source_ent.term if source_ent else "1y"
        span = period_containing("term", anchor, now, term=term)
        return "period_end", iso(span.end) if not span.is_endless else None
    return "immediately", None


def _entitlement_changes(
    source: Entitlements | None,
    old_overrides: SubscriptionOverrides,
    target: Entitlements,
    new_overrides: SubscriptionOverrides,
) -> dict[str, Any]:
    before: EntitlementsView = (
        effective_view(source, old_overrides) if source else {"features": {}, "quotas": {}}
    )
    after = effective_view(target, new_overrides)
    return {
        "features": _gained_lost_changed(before["features"], after["features"]),
        "quotas": _gained_lost_changed(before["quotas"], after["quotas"]),
    }


def _gained_lost_changed(old: Mapping[str, object], new: Mapping[str, object]) -> dict[str, Any]:
    return {
        "gained": {k: new[k] for k in sorted(set(new) - set(old))},
        "lost": {k: old[k] for k in sorted(set(old) - set(new))},
        "changed": {
            k: {"from": old[k], "to": new[k]}
            for k in sorted(set(old) & set(new))
            if old[k] != new[k]
        },
    }


#: The steps' members, looked up once (an enum member is a class attribute lookup each time).
_LOCK, _SNAPSHOT, _PREPARE, _CUTOVER, _VERIFY, _RECEIPT = FORWARD_STEPS


def _steps(
    target_ref: str,
    *,
    archived: int,
    deactivated: int,
    converted: int,
    mode: str,
    pinned: int,
    moves: int,
) -> tuple[dict[str, Any], ...]:
    return (
        {"step": _LOCK, "does": "mark the account as migrating (one migration at a time)"},
        {"step": _SNAPSHOT, "does": "record the account's state and its SHA-256 in the ledger"},
        {"step": _PREPARE, "does": f"stage {archived} archive copies and the new entitlement set"},
        {
            "step": _CUTOVER,
            "does": f"one transaction: plan → {target_ref}, {deactivated} activation(s)"
            f" deactivated, {converted} switched to {mode} mode, {pinned} license cap(s) pinned"
            f" to the seats kept, {moves} counter move(s), license overrides mapped, caches"
            " invalidated",
        },
        {
            "step": _VERIFY,
            "does": "actual state == expected; every license validates with its key and with"
            " each kept machine's fingerprint",
        },
        {"step": _RECEIPT, "does": "issue a signed receipt (account, from, to, time, hash)"},
    )
