"""The planner: a pure function of (snapshot, rules, source plan, target plan, now). Snapshots
here are plain dicts in the shape ``keyshift.migration.state`` documents; no database."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyshift.canonical import content_hash
from keyshift.catalog.entitlements import resolve, with_overrides
from keyshift.catalog.loader import load as load_catalog
from keyshift.catalog.manifests import Edition, Plan
from keyshift.migration.loader import load_rules
from keyshift.migration.planner import MigrationPlan, plan_migration, quota_usage
from keyshift.migration.rules import AttributePredicate, MigrationRules, PlanPair
from keyshift.migration.state import derived_id, iso, parse_iso
from keyshift.validation.decide import ActivationState, Code, LicenseState, decide
from tests.migration import helpers

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
STARTED = datetime(2025, 6, 1, tzinfo=UTC)
MONTH_START, MONTH_END = "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"
MIGRATION = "00000000-0000-4000-8000-000000000001"
ROOT = Path(__file__).resolve().parents[2]


def _pairs(*plans: Plan) -> dict[str, PlanPair]:
    editions = {
        f"{e['edition']['key']}@{e['edition']['version']}": Edition.model_validate(e)
        for e in helpers.EDITIONS
    }
    return {
        f"{p.plan.key}@{p.plan.version}": PlanPair(
            p, content_hash(p.model_dump(mode="json")), editions[p.plan.edition]
        )
        for p in plans
    }


PAIRS = _pairs(*helpers.PLANS)
OLD, NEW, NEW_USAGE = PAIRS[helpers.OLD], PAIRS[helpers.NEW], PAIRS[helpers.NEW_USAGE]
OLD_FLOAT, NEW_FLOAT = PAIRS[helpers.OLD_FLOAT], PAIRS[helpers.NEW_FLOAT]


def old_seat_with(*meters: dict[str, Any]) -> PlanPair:
    """``old-seat@1`` as the helpers define it, but with these meters."""
    content = {**OLD.plan.model_dump(mode="json"), "meters": list(meters)}
    return _pairs(Plan.model_validate(content))[helpers.OLD]


def at(hours: float) -> str:
    """An instant ``hours`` before NOW."""
    return iso(NOW - timedelta(hours=hours)) or ""


def obj(n: int, *, quota: str = "projects", units: int = 1, age_hours: float | None = None) -> dict:
    return {
        "id": f"obj-{n:02d}",
        "quota": quota,
        "name": f"{quota}-{n}",
        "units": units,
        "tier": "standard",
        "state": "active",
        "content_hash": f"{n:064x}",
        "created_at": at(age_hours if age_hours is not None else 1000 - n),
    }


def activation(
    n: int, license_id: str = "lic-1", *, seen_hours: float | None = 1.0, lease=None
) -> dict:
    return {
        "id": f"act-{n:02d}",
        "license_id": license_id,
        "fingerprint": f"machine-{n}",
        "mode": "node-locked" if lease is None else "floating",
        "label": None,
        "created_at": at(500),
        "last_seen_at": at(seen_hours) if seen_hours is not None else None,
        "lease_expires_at": lease,
    }


def snapshot(
    *,
    status: str = "active",
    attributes: dict | None = None,
    plan: PlanPair = OLD,
    overrides: dict | None = None,
    licenses: list[dict] | None = None,
    activations: list[dict] | None = None,
    counters: list[dict] | None = None,
    objects: list[dict] | None = None,
) -> dict[str, Any]:
    """An account on ``plan`` (by default two licenses, the second with a hand-set cap of 5 and
    feature b; three activations on the first; five projects; 7 exports this month)."""
    return {
        "account": {
            "id": "acc-1",
            "name": "Migrating Co",
            "status": status,
            "external_ref": None,
            "attributes": {"region": "eu", "tier": 2} if attributes is None else attributes,
            "preferences": {"theme": "dark", "locale": "de"},
        },
        "subscription": {
            "plan": plan.ref,
            "plan_hash": plan.plan_hash,
            "started_at": iso(STARTED),
            "overrides": overrides if overrides is not None else {},
        },
        "licenses": licenses
        if licenses is not None
        else [
            license_row("lic-1"),
            license_row("lic-2", max_override=5, overrides={"features": {"b": "enabled"}}),
        ],
        "activations": activations
        if activations is not None
        else [activation(n, seen_hours=10 - n) for n in range(3)],
        "counters": counters if counters is not None else [counter("exports", 7)],
        "objects": objects if objects is not None else [obj(n) for n in range(5)],
        "taken_at": iso(NOW),
    }


def license_row(
    license_id: str, *, status: str = "active", max_override: int | None = None, overrides=None
) -> dict:
    return {
        "id": license_id,
        "key_lookup": f"lookup-{license_id}",
        "status": status,
        "expires_at": None,
        "max_activations_override": max_override,
        "overrides": overrides or {},
    }


def counter(meter: str, used: int, start: str = MONTH_START, end: str = MONTH_END) -> dict:
    return {"meter": meter, "period_start": start, "period_end": end, "used": used}


def rules(text: str = helpers.RULES, *, top: str = "", **replace: str) -> MigrationRules:
    """The helpers' rules with replacements; ``top`` is put before [rules] (top-level keys)."""
    return helpers.rules(top + text, **replace)


def plan(
    snap: dict[str, Any] | None = None,
    the_rules: MigrationRules | None = None,
    *,
    source: PlanPair | None = OLD,
    target: PlanPair = NEW,
    migration_id: str = MIGRATION,
    now: datetime = NOW,
) -> MigrationPlan:
    return plan_migration(
        snapshot() if snap is None else snap,
        rules() if the_rules is None else the_rules,
        source,
        target,
        migration_id=migration_id,
        now=now,
    )


def conflict_rules(policy: str) -> MigrationRules:
    return rules(**{'projects = { on_conflict = "archive" }': f"projects = {{ {policy} }}"})


# -- eligibility --------------------------------------------------------------------------------


def test_an_active_account_on_a_source_plan_is_eligible() -> None:
    result = plan()
    assert result.eligible and result.can_apply and result.reasons == ()


def test_an_account_status_the_rules_do_not_allow_is_not_eligible() -> None:
    result = plan(snapshot(status="suspended"))
    assert not result.eligible and not result.can_apply
    assert result.reasons == ("account status is 'suspended' (rules allow: active)",)
    allowing = rules(
        **{"[quotas]": '[eligibility]\naccount_status = ["active", "suspended"]\n\n[quotas]'}
    )
    assert plan(snapshot(status="suspended"), allowing).eligible


def test_attribute_predicates_decide_eligibility() -> None:
    eligibility = (
        "[eligibility]\nattributes = [\n"
        '  { name = "region", op = "eq", value = "eu" },\n'
        '  { name = "tier", op = "gte", value = 2 },\n'
        '  { name = "blocked", op = "missing" },\n'
        "]\n\n[quotas]"
    )
    the_rules = rules(**{"[quotas]": eligibility})
    assert plan(snapshot(), the_rules).eligible
    result = plan(snapshot(attributes={"region": "us", "tier": 1, "blocked": True}), the_rules)
    assert result.reasons == (
        "attribute 'region' fails eq 'eu'",
        "attribute 'tier' fails gte 2",
        "attribute 'blocked' fails missing None",
    )


@pytest.mark.parametrize(
    ("op", "value", "attributes", "holds"),
    [
        ("eq", "eu", {"region": "eu"}, True),
        ("eq", "eu", {}, False),
        ("ne", "eu", {"region": "us"}, True),
        ("ne", "eu", {}, True),  # an absent attribute is "not equal"
        ("in", ["eu", "uk"], {"region": "uk"}, True),
        ("in", ["eu", "uk"], {}, False),
        ("not_in", ["cn"], {}, True),
        ("not_in", ["cn"], {"region": "cn"}, False),
        ("exists", None, {"region": None}, True),
        ("missing", None, {"region": "eu"}, False),
        ("gte", 2, {"region": 2}, True),
        ("lte", 2, {"region": 3}, False),
        ("gte", 1, {"region": True}, False),  # a boolean is not a number here
        ("gte", 1, {"region": "5"}, False),
    ],
)
def test_attribute_predicate_semantics(op: str, value: Any, attributes: dict, holds: bool) -> None:
    predicate = AttributePredicate(name="region", op=op, value=value)
    assert predicate.holds(attributes) is holds


def test_an_account_whose_plan_is_not_a_source_is_not_eligible() -> None:
    result = plan(snapshot(plan=NEW), source=NEW)
    assert result.reasons == ("the account's plan new-seat@1 is not a source of these rules",)
    assert plan(source=None).reasons == ("the account has no plan to migrate from",)


# -- features -----------------------------------------------------------------------------------


def test_features_the_app_loses_are_risks() -> None:
    # b is kept by name but disabled in new@1: lost. a stays enabled, c stays throttled.
    assert plan().risks[0] == "loses_feature:b"
    dropped = plan(the_rules=rules(**{'a = "keep"': 'a = "drop"'}))
    assert [r for r in dropped.risks if r.startswith("loses_feature")] == [
        "loses_feature:a",
        "loses_feature:b",
    ]
    renamed = plan(the_rules=rules(**{'a = "keep"': 'a = { action = "rename", to = "d" }'}))
    assert "loses_feature:a" not in renamed.risks


# -- quota conflicts ----------------------------------------------------------------------------


def test_archive_moves_the_oldest_objects_beyond_the_limit() -> None:
    result = plan()  # 5 projects of 1 unit, new limit 3; obj-00 is the oldest
    [conflict] = result.conflicts
    assert (conflict.quota, conflict.used, conflict.limit, conflict.policy) == (
        "projects",
        5,
        3,
        "archive",
    )
    assert result.archive == conflict.objects_to_archive == ("obj-00", "obj-01")
    assert "over_quota:projects" in result.risks and "data_to_archive:projects:2" in result.risks
    assert result.can_apply


def test_archive_expects_superseded_originals_and_archive_copies_with_derived_ids() -> None:
    expected = plan().expected
    objects = {o["id"]: o for o in expected["objects"]}
    for original in ("obj-00", "obj-01"):
        assert objects[original]["state"] == "superseded"
        assert objects[original]["tier"] == "standard"
        copy = objects[derived_id(MIGRATION, "archive", original)]
        assert (copy["tier"], copy["state"]) == ("archive", "active")
        assert copy["content_hash"] == objects[original]["content_hash"]
        assert copy["created_at"] == objects[original]["created_at"]
    assert len(expected["objects"]) == 7
    assert quota_usage(expected)["projects"] == 3
    # Deterministic: the same migration names the same copies; another migration other ones.
    assert plan().expected == expected
    assert plan(migration_id="another").expected["objects"] != expected["objects"]


def test_archive_keeps_the_newest_objects_that_fit() -> None:
    # Newest first: 2 units fit, the next 2 do not (4 > 3), the oldest single unit still fits.
    objects = [
        obj(1, units=1, age_hours=30),
        obj(2, units=2, age_hours=20),
        obj(3, units=2, age_hours=10),
    ]
    result = plan(snapshot(objects=objects))
    assert result.archive == ("obj-02",)
    assert quota_usage(result.expected)["projects"] == 3


def test_carried_add_ons_raise_the_limit_a_conflict_is_measured_against() -> None:
    addon = {"addons": {"extra": {"quotas": {"projects": 2}, "features": {}}}}
    assert plan(snapshot(overrides=addon)).conflicts == ()
    dropping = rules(**{'extra = "carry"': 'extra = "drop"'})
    assert plan(snapshot(overrides=addon), dropping).conflicts[0].limit == 3


def test_read_only_marks_the_quota_and_moves_nothing() -> None:
    result = plan(the_rules=conflict_rules('on_conflict = "read_only"'))
    [conflict] = result.conflicts
    assert conflict.policy == "read_only" and result.archive == ()
    assert result.expected["subscription"]["overrides"]["read_only"] == ["projects"]
    assert result.expected["objects"] == snapshot()["objects"]
    ent = with_overrides(
        resolve(NEW.plan, NEW.plan_hash, NEW.edition),
        result.expected["subscription"]["overrides"],
        None,
        NOW,
    )
    assert ent.read_only == ("projects",)


def test_grace_keeps_the_old_entitlements_until_now_plus_the_days() -> None:
    result = plan(the_rules=conflict_rules('on_conflict = "grace", grace_days = 30'))
    [conflict] = result.conflicts
    assert conflict.policy == "grace" and result.archive == ()
    grace = result.expected["subscription"]["overrides"]["grace"]
    assert grace["until"] == iso(NOW + timedelta(days=30))
    assert grace["entitlements"]["quotas"] == {"projects": 10, "storage": 100}
    # Only what the old plan granted more of: b (enabled → disabled). Not a (the same), not c
    # (throttled 10/day → 20/day), and so never d (new) or a disabled feature.
    assert grace["entitlements"]["features"] == {"b": {"mode": "enabled"}}
    base = resolve(NEW.plan, NEW.plan_hash, NEW.edition)
    during = with_overrides(base, result.expected["subscription"]["overrides"], None, NOW)
    assert during.grace_until == NOW + timedelta(days=30)
    assert during.quotas["projects"] == 10
    assert during.features["b"].is_usable and during.features["d"].is_usable
    assert during.features["c"].limit == 20
    later = NOW + timedelta(days=30)
    after = with_overrides(base, result.expected["subscription"]["overrides"], None, later)
    assert after.grace_until is None and after.quotas["projects"] == 3
    assert not after.features["b"].is_usable


def test_grace_counts_a_carried_add_on_once() -> None:
    # Old storage 100 + add-on 50 = 150; new 100 + the carried add-on 50 = 150: not 200.
    addon = {"addons": {"extra": {"quotas": {"storage": 50}, "features": {}}}}
    grace = conflict_rules('on_conflict = "grace", grace_days = 30')
    result = plan(snapshot(overrides=addon), grace)
    overrides = result.expected["subscription"]["overrides"]
    base = resolve(NEW.plan, NEW.plan_hash, NEW.edition)
    during = with_overrides(base, overrides, None, NOW)
    assert (during.quotas["storage"], during.quotas["projects"]) == (150, 10)
    assert with_overrides(base, overrides, None, NOW + timedelta(days=30)).quotas["storage"] == 150


def test_block_refuses_the_migration() -> None:
    result = plan(the_rules=conflict_rules('on_conflict = "block"'))
    assert result.eligible and result.blocked and not result.can_apply
    assert result.reasons == ("quota projects: 5 used, the target allows 3 (on_conflict=block)",)
    assert plan(snapshot(objects=[obj(1)]), conflict_rules('on_conflict = "block"')).can_apply


def test_a_dropped_quota_with_data_is_a_risk() -> None:
    result = plan(
        the_rules=rules(**{'projects = { on_conflict = "archive" }': 'projects = "drop"'})
    )
    assert result.conflicts == () and "quota_dropped_with_data:projects" in result.risks


# -- activations --------------------------------------------------------------------------------


def test_trim_keeps_the_most_recently_seen_and_drops_lapsed_leases_first() -> None:
    activations = [
        activation(1, seen_hours=0.1, lease=at(0.05)),  # seen last, but its lease has lapsed
        activation(2, seen_hours=5),
        activation(3, seen_hours=1),
        activation(4, seen_hours=None),  # never seen: least recent
        activation(5, seen_hours=2, lease=iso(NOW + timedelta(minutes=30))),
    ]
    result = plan(snapshot(activations=activations))  # lic-1 has no override: new cap 2
    assert result.deactivate == ("act-01", "act-02", "act-04")
    assert sorted(a["id"] for a in result.expected["activations"]) == ["act-03", "act-05"]
    assert "activations_trimmed:3" in result.risks


def test_trim_honours_a_hand_set_cap_and_keep_all_keeps_everything() -> None:
    on_second = [activation(n, "lic-2", seen_hours=n + 1) for n in range(4)]
    assert plan(snapshot(activations=on_second)).deactivate == ()  # lic-2 keeps its cap of 5
    reset = rules(**{"[addons]": '[overrides]\nmax_activations = "reset"\n\n[addons]'})
    assert plan(snapshot(activations=on_second), reset).deactivate == ("act-02", "act-03")
    keep = rules(**{'activations = "trim_to_cap"': 'activations = "keep_all"'})
    assert plan(the_rules=keep).deactivate == ()


KEEP_ALL = {'activations = "trim_to_cap"': 'activations = "keep_all"'}


def _validates(result: MigrationPlan, license_id: str, fingerprint: str | None) -> Code:
    """What validation answers for the plan's expected state of a license, on the target."""
    lic = next(row for row in result.expected["licenses"] if row["id"] == license_id)
    machines = tuple(
        ActivationState(a["id"], a["fingerprint"], a["mode"], parse_iso(a["lease_expires_at"]))
        for a in result.expected["activations"]
        if a["license_id"] == license_id
    )
    state = LicenseState(
        license_id, "acc-1", lic["status"], None, lic["max_activations_override"], 1, machines
    )
    entitlements = resolve(NEW.plan, NEW.plan_hash, NEW.edition)
    return decide(state, entitlements, fingerprint=fingerprint, feature=None, now=NOW).code


def test_keep_all_over_a_lower_cap_pins_the_licenses_cap_to_the_seats_kept() -> None:
    # lic-1 keeps its three machines; the target's cap is 2 and lic-1 has no hand-set cap.
    result = plan(the_rules=rules(**KEEP_ALL))
    assert result.deactivate == ()
    caps = {lic["id"]: lic["max_activations_override"] for lic in result.expected["licenses"]}
    assert caps == {"lic-1": 3, "lic-2": 5}  # lic-2's own cap of 5 already covers its seats
    [pin] = result.changes["activations_grandfathered"]
    assert {k: v for k, v in pin.items() if k != "reason"} == {
        "license_id": "lic-1",
        "kept": 3,
        "target_cap": 2,
        "pinned_cap": 3,
    }
    assert "keep_all" in pin["reason"]
    assert "activations_grandfathered:1" in result.risks
    assert result.changes["licenses"] == [
        {
            "license_id": "lic-1",
            "before": {"max": None, "overrides": {}},
            "after": {"max": 3, "overrides": {}},
        }
    ]
    assert "1 license cap(s) pinned" in result.steps[3]["does"]
    # The expected state validates with the key and with each machine; the pin is full.
    assert _validates(result, "lic-1", None) is Code.VALID
    for n in range(3):
        assert _validates(result, "lic-1", f"machine-{n}") is Code.VALID
    assert result.over_cap_before == ()


def test_keep_all_leaves_a_hand_set_cap_that_already_covers_the_seats() -> None:
    on_second = [activation(n, "lic-2", seen_hours=n + 1) for n in range(4)]
    result = plan(snapshot(activations=on_second), rules(**KEEP_ALL))
    assert result.changes["activations_grandfathered"] == []
    assert result.changes["licenses"] == []
    assert not any(r.startswith("activations_grandfathered") for r in result.risks)
    assert _validates(result, "lic-2", "machine-3") is Code.VALID
    # The same cap cleared by [overrides] max_activations = "reset": pinned to the 4 kept.
    reset = rules(**KEEP_ALL, **{"[addons]": '[overrides]\nmax_activations = "reset"\n\n[addons]'})
    [pin] = plan(snapshot(activations=on_second), reset).changes["activations_grandfathered"]
    assert (pin["license_id"], pin["kept"], pin["target_cap"], pin["pinned_cap"]) == (
        "lic-2",
        4,
        2,
        4,
    )


def test_keep_all_counts_live_seats_only_and_trim_to_cap_pins_nothing() -> None:
    live, lapsed = iso(NOW + timedelta(minutes=30)), at(1)
    floating = [
        activation(1, lease=live),
        activation(2, lease=live),
        activation(3, lease=lapsed),  # a free seat: not one to grandfather
    ]
    float_rules = rules(
        **KEEP_ALL,
        **{'from = ["old-seat@1"]': 'from = ["old-float@1"]', '"new-seat@1"': '"new-float@1"'},
    )
    snap = snapshot(plan=OLD_FLOAT, activations=floating)
    result = plan(snap, float_rules, source=OLD_FLOAT, target=NEW_FLOAT)
    assert result.changes["activations_grandfathered"] == []
    trimmed = plan()
    assert trimmed.changes["activations_grandfathered"] == [] and len(trimmed.deactivate) == 1


def test_a_license_over_its_cap_at_the_snapshot_is_not_made_valid_by_keep_all() -> None:
    # An admin lowered lic-1's cap to 1 by hand with three machines on it: it answers
    # TOO_MANY_ACTIVATIONS before the migration, and the pin never goes above that cap.
    licenses = [license_row("lic-1", max_override=1), license_row("lic-2")]
    result = plan(snapshot(licenses=licenses), rules(**KEEP_ALL))
    assert result.over_cap_before == ("lic-1",)
    assert result.changes["activations_grandfathered"] == []
    assert _validates(result, "lic-1", None) is Code.TOO_MANY_ACTIVATIONS
    # Lowered to 2 by hand, and the rules reset hand-set caps: the target's cap of 2 is the
    # cap the license had, so nothing is pinned and it stays as over it as it was.
    licenses = [license_row("lic-1", max_override=2), license_row("lic-2")]
    reset = rules(**KEEP_ALL, **{"[addons]": '[overrides]\nmax_activations = "reset"\n\n[addons]'})
    result = plan(snapshot(licenses=licenses), reset)
    assert result.over_cap_before == ("lic-1",)
    assert result.changes["activations_grandfathered"] == []
    assert _validates(result, "lic-1", None) is Code.TOO_MANY_ACTIVATIONS


def test_floating_to_node_locked_makes_each_kept_machine_a_node_seat() -> None:
    live = iso(NOW + timedelta(minutes=30))
    activations = [
        activation(1, seen_hours=1, lease=live),
        activation(2, seen_hours=2, lease=live),
        activation(3, seen_hours=3, lease=live),  # over the new cap of 2: trimmed
        activation(4, "lic-2", seen_hours=4, lease=at(1)),  # lapsed: a free seat, left as is
    ]
    the_rules = rules(**{'from = ["old-seat@1"]': 'from = ["old-float@1"]'})
    result = plan(snapshot(plan=OLD_FLOAT, activations=activations), the_rules, source=OLD_FLOAT)
    assert result.deactivate == ("act-03",)
    assert result.convert == ("act-01", "act-02")
    assert result.machine_terms == {"mode": "node", "lease_seconds": None}
    kept = {a["id"]: (a["mode"], a["lease_expires_at"]) for a in result.expected["activations"]}
    assert kept == {
        "act-01": ("node", None),
        "act-02": ("node", None),
        "act-04": ("floating", at(1)),
    }
    changes = result.changes["activations_converted"]
    assert [(c["activation_id"], c["fingerprint"]) for c in changes] == [
        ("act-01", "machine-1"),
        ("act-02", "machine-2"),
    ]
    assert changes[0]["from"] == {"mode": "floating", "lease_expires_at": live}
    assert changes[0]["to"] == {"mode": "node", "lease_seconds": None}
    assert result.to_dict()["convert"] == ["act-01", "act-02"]
    assert "2 switched to node mode" in result.steps[3]["does"]


def test_node_locked_to_floating_gives_each_kept_machine_a_lease_from_the_cutover() -> None:
    result = plan(the_rules=rules(**{'to = "new-seat@1"': 'to = "new-float@1"'}), target=NEW_FLOAT)
    assert result.deactivate == ("act-00",)  # three machines, new cap 2
    assert result.convert == ("act-01", "act-02")
    lease = iso(NOW + timedelta(hours=1))
    assert {(a["mode"], a["lease_expires_at"]) for a in result.expected["activations"]} == {
        ("floating", lease)
    }
    changes = result.changes["activations_converted"]
    assert [c["to"] for c in changes] == [{"mode": "floating", "lease_seconds": 3600}] * 2


def test_the_same_activation_mode_converts_nothing() -> None:
    result = plan()
    assert result.convert == () and result.changes["activations_converted"] == []
    assert [a["mode"] for a in result.expected["activations"]] == ["node-locked"] * 2


# -- counters -----------------------------------------------------------------------------------


def counter_plan(action: str, **kw: Any) -> MigrationPlan:
    return plan(the_rules=rules(**{'exports = "carry"': f"exports = {action}"}), **kw)


def test_carry_keeps_the_count() -> None:
    result = counter_plan('"carry"')
    [move] = result.counter_moves
    assert (move.meter, move.period_start, move.action, move.factor) == (
        "exports",
        MONTH_START,
        "carry",
        1.0,
    )
    assert move.same_row and result.expected["counters"] == [counter("exports", 7)]


def test_reset_sets_the_count_to_zero() -> None:
    assert counter_plan('"reset"').expected["counters"] == [counter("exports", 0)]


def test_prorate_with_the_same_period_carries_everything() -> None:
    assert counter_plan('"prorate"').expected["counters"] == [counter("exports", 7)]


def test_prorate_takes_the_share_of_elapsed_time_inside_the_target_period() -> None:
    # The source meter resets each (1y) term: its period began 2025-06-01, 287.5 days before
    # NOW; the target's month began 14.5 days before NOW. 575 * 14.5 / 287.5 = 29.
    termly = {**helpers.EXPORTS, "reset": "term"}
    source = old_seat_with(termly)
    term_start, term_end = "2025-06-01T00:00:00Z", "2026-06-01T00:00:00Z"
    snap = snapshot(plan=source, counters=[counter("exports", 575, term_start, term_end)])
    result = plan(snap, rules(**{'exports = "carry"': 'exports = "prorate"'}), source=source)
    [move] = result.counter_moves
    assert move.source_period_start == term_start and move.period_start == MONTH_START
    assert move.factor == pytest.approx(14.5 / 287.5)
    assert result.expected["counters"] == [
        counter("exports", 575, term_start, term_end),  # the old period's row is left as it was
        counter("exports", 29),
    ]


def test_convert_multiplies_by_the_factor_into_another_meter() -> None:
    convert = rules(
        **{
            '"new-seat@1"': '"new-usage@1"',
            'activations = "trim_to_cap"': 'activations = "keep_all"',
            'exports = "carry"': ('exports = { action = "convert", to = "units", factor = 2.5 }'),
        }
    )
    result = plan(the_rules=convert, target=NEW_USAGE)
    [move] = result.counter_moves
    assert (move.meter, move.source_meter, move.factor) == ("units", "exports", 2.5)
    assert result.expected["counters"] == [counter("exports", 7), counter("units", 18)]
    # round() is Python's: halves go to the even neighbour.
    assert move.value(5) == 12 and move.value(3) == 8 and move.value(1) == 2


def test_counter_moves_do_not_depend_on_their_order() -> None:
    # a_exports (sorted first) converts into exports, which is itself reset: 0 + 3 * 2 = 6,
    # as the executor's deltas give it.
    extra = {**helpers.EXPORTS, "key": "a_exports"}
    source = old_seat_with(helpers.EXPORTS, extra)
    the_rules = rules(
        **{
            'exports = "carry"': 'exports = "reset"\na_exports = { action = "convert", to = "exports", factor = 2 }'
        }
    )
    snap = snapshot(plan=source, counters=[counter("a_exports", 3), counter("exports", 7)])
    result = plan(snap, the_rules, source=source)
    assert result.expected["counters"] == [counter("a_exports", 3), counter("exports", 6)]


# -- seats into a meter -------------------------------------------------------------------------


def seat_rules(basis: str) -> MigrationRules:
    return rules(
        **{
            '"new-seat@1"': '"new-usage@1"',
            'activations = "trim_to_cap"': (
                f'convert_to_meter = "units"\nunits_per_seat = 1000\nseat_basis = "{basis}"'
            ),
        }
    )


def test_seats_convert_into_the_meter_by_license_caps() -> None:
    # lic-1 has the source cap 3, lic-2 a hand-set 5; the suspended lic-3 does not count.
    licenses = [
        license_row("lic-1"),
        license_row("lic-2", max_override=5),
        license_row("lic-3", status="suspended", max_override=50),
    ]
    result = plan(snapshot(licenses=licenses), seat_rules("cap"), target=NEW_USAGE)
    overrides = result.expected["subscription"]["overrides"]
    assert overrides["meters"] == {"units": {"included": 8000}}
    ent = with_overrides(
        resolve(NEW_USAGE.plan, NEW_USAGE.plan_hash, NEW_USAGE.edition), overrides, None, NOW
    )
    assert ent.meters["units"]["included"] == 8000


def test_seats_convert_into_the_meter_by_active_machines() -> None:
    activations = [activation(n, "lic-1") for n in range(3)] + [activation(9, "lic-3")]
    licenses = [license_row("lic-1"), license_row("lic-3", status="suspended")]
    result = plan(
        snapshot(licenses=licenses, activations=activations), seat_rules("active"), target=NEW_USAGE
    )
    assert result.expected["subscription"]["overrides"]["meters"] == {"units": {"included": 3000}}


# -- add-ons ------------------------------------------------------------------------------------

ADDONS = {
    "addons": {
        "extra": {"quotas": {"storage": 50}, "features": {}},
        "other": {"quotas": {}, "features": {"d": "enabled"}},
    }
}


def test_an_add_on_without_a_rule_is_refused_by_default() -> None:
    result = plan(snapshot(overrides=ADDONS))
    assert result.blocked and result.reasons == (
        "add-on 'other' has no rule (addons_default = 'refuse')",
    )


def test_add_ons_carry_drop_or_rename() -> None:
    dropped = plan(snapshot(overrides=ADDONS), rules(top='addons_default = "drop"\n'))
    assert dropped.can_apply and "drops_addon:other" in dropped.risks
    assert dropped.expected["subscription"]["overrides"]["addons"] == {
        "extra": ADDONS["addons"]["extra"]
    }
    carried = plan(snapshot(overrides=ADDONS), rules(top='addons_default = "carry"\n'))
    assert carried.expected["subscription"]["overrides"]["addons"] == ADDONS["addons"]
    renamed = plan(
        snapshot(overrides=ADDONS),
        rules(**{'extra = "carry"': 'extra = { action = "rename", to = "bonus" }\nother = "drop"'}),
    )
    assert renamed.expected["subscription"]["overrides"]["addons"] == {
        "bonus": ADDONS["addons"]["extra"]
    }


# -- per-license overrides ----------------------------------------------------------------------

HAND_SET = {"features": {"a": "enabled", "b": "enabled"}, "quotas": {"projects": 2, "storage": 5}}


def license_plan(
    overrides_table: str, feature_rules: dict[str, str] | None = None
) -> MigrationPlan:
    the_rules = rules(
        **{"[addons]": f"[overrides]\n{overrides_table}\n\n[addons]", **(feature_rules or {})}
    )
    licenses = [license_row("lic-1", max_override=4, overrides=HAND_SET)]
    return plan(snapshot(licenses=licenses, activations=[]), the_rules)


def test_license_overrides_carry_by_default_mapped_through_the_rules() -> None:
    result = license_plan(
        "", {'a = "keep"': 'a = { action = "rename", to = "d" }', 'b = "keep"': 'b = "drop"'}
    )
    [lic] = result.expected["licenses"]
    assert lic["max_activations_override"] == 4
    assert lic["overrides"] == {
        "features": {"d": "enabled"},
        "quotas": {"projects": 2, "storage": 5},
    }
    [change] = result.changes["licenses"]
    assert change["license_id"] == "lic-1" and change["before"]["overrides"] == HAND_SET


def test_license_overrides_reset_and_drop() -> None:
    result = license_plan('max_activations = "reset"\nfeatures = "drop"\nquotas = "drop"')
    [lic] = result.expected["licenses"]
    assert lic["max_activations_override"] is None and lic["overrides"] == {}
    assert lic["key_lookup"] == "lookup-lic-1"


# -- schedule, purity, digest -------------------------------------------------------------------


def test_schedule_effective_times() -> None:
    assert (plan().effective, plan().effective_at) == ("immediately", None)
    at_rules = rules(
        **{"[addons]": '[schedule]\neffective = "at"\nat = 2026-10-01T00:00:00+02:00\n\n[addons]'}
    )
    assert (plan(the_rules=at_rules).effective_at) == "2026-09-30T22:00:00Z"
    period_end = rules(**{"[addons]": '[schedule]\neffective = "period_end"\n\n[addons]'})
    # The source plan's 1y term began 2025-06-01: it ends 2026-06-01.
    assert plan(the_rules=period_end).effective_at == "2026-06-01T00:00:00Z"


def test_the_snapshot_is_not_touched_and_the_plan_moves_the_account() -> None:
    snap = snapshot()
    before = content_hash(snap)
    result = plan(snap)
    assert content_hash(snap) == before
    assert "taken_at" not in result.expected
    assert result.expected["subscription"]["plan"] == NEW.ref
    assert result.expected["subscription"]["plan_hash"] == NEW.plan_hash
    assert result.expected["subscription"]["started_at"] == iso(STARTED)
    assert [s["step"] for s in result.steps] == [
        "lock",
        "snapshot",
        "prepare",
        "cutover",
        "verify",
        "receipt",
    ]


def test_outcome_digest_is_stable_and_follows_the_outcome() -> None:
    digest = plan().outcome_digest()
    assert plan().outcome_digest() == digest
    # Neither the migration's id nor usage counted meanwhile changes the outcome.
    assert plan(migration_id="other").outcome_digest() == digest
    assert plan(snapshot(counters=[counter("exports", 99)])).outcome_digest() == digest
    # One more project to archive, or a blocked migration, does.
    more = snapshot(objects=[obj(n) for n in range(6)])
    assert plan(more).outcome_digest() != digest
    assert plan(the_rules=conflict_rules('on_conflict = "block"')).outcome_digest() != digest


def test_the_planner_imports_no_database_code() -> None:
    code = (
        "import keyshift.migration.planner, sys; "
        "print(sorted(m for m in sys.modules if m.startswith(('sqlalchemy','asyncpg','aiosqlite'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the examples -------------------------------------------------------------------------------


def example_pairs() -> dict[str, PlanPair]:
    manifests = load_catalog(ROOT / "examples" / "catalog")
    editions = {m.ref: m.model for m in manifests if m.kind == "edition"}
    return {
        m.ref: PlanPair(m.model, m.content_hash(), editions[m.model.plan.edition])
        for m in manifests
        if isinstance(m.model, Plan)
    }


def example_plan(name: str, snap_overrides: dict[str, Any]) -> tuple[MigrationPlan, PlanPair]:
    pairs = example_pairs()
    the_rules, _ = load_rules(ROOT / "examples" / "migrations" / name)
    source, target = pairs[the_rules.rules.from_plans[0]], pairs[the_rules.rules.to]
    snap = snapshot(plan=source, counters=[], **snap_overrides)
    return plan(snap, the_rules, source=source, target=target), target


def test_pro_2023_example_gives_storage_30_days_without_taking_new_features() -> None:
    result, target = example_plan(
        "pro-2023-to-2025.toml",
        {"objects": [obj(1, quota="storage_gb", units=300)], "activations": []},
    )
    assert result.can_apply and result.effective_at == "2026-10-01T00:00:00Z"
    assert [c.policy for c in result.conflicts] == ["grace"]
    assert "loses_feature:legacy_csv_export" in result.risks
    overrides = result.expected["subscription"]["overrides"]
    base = resolve(target.plan, target.plan_hash, target.edition)
    during = with_overrides(base, overrides, None, NOW)
    assert during.quotas["storage_gb"] == 500 and during.features["legacy_csv_export"].is_usable
    assert during.features["audit_log"].is_usable  # new in 2025, not taken away by the grace
    assert during.features["api_access"].limit == 20000  # the higher 2025 throttle
    after = with_overrides(base, overrides, None, NOW + timedelta(days=31))
    assert after.quotas["storage_gb"] == 250 and "legacy_csv_export" not in after.features


def test_enterprise_downgrade_example_trims_archives_and_makes_storage_read_only() -> None:
    activations = [
        activation(n, seen_hours=n + 1, lease=iso(NOW + timedelta(hours=1))) for n in range(52)
    ]
    objects = [obj(n, units=1) for n in range(255)] + [obj(300, quota="storage_gb", units=1200)]
    result, _ = example_plan(
        "enterprise-to-team-downgrade.toml",
        {
            "attributes": {"downgrade_requested": True},
            "licenses": [license_row("lic-1", max_override=2000)],
            "activations": activations,
            "objects": objects,
        },
    )
    assert result.can_apply, result.reasons
    assert result.deactivate == ("act-50", "act-51")  # the two least recently seen
    assert result.archive == tuple(f"obj-{n:02d}" for n in range(5))
    assert result.expected["subscription"]["overrides"] == {"read_only": ["storage_gb"]}
    assert {"loses_feature:scim_provisioning", "loses_feature:data_residency"} <= set(result.risks)


def test_seat_to_usage_example_pays_seats_out_as_api_calls() -> None:
    result, _ = example_plan(
        "pro-seat-to-usage-2025.toml",
        {
            "attributes": {"billing": "usage", "region": "eu"},
            "licenses": [license_row("lic-1"), license_row("lic-2", max_override=8)],
        },
    )
    assert result.can_apply, result.reasons
    overrides = result.expected["subscription"]["overrides"]
    assert overrides["meters"] == {"api_calls": {"included": (5 + 8) * 120000}}
    assert all(lic["max_activations_override"] is None for lic in result.expected["licenses"])
    assert result.deactivate == ()


# -- property -----------------------------------------------------------------------------------


@st.composite
def snapshots(draw: st.DrawFn) -> dict[str, Any]:
    objects = [
        {
            **obj(
                n,
                quota=draw(st.sampled_from(["projects", "storage"])),
                units=draw(st.integers(0, 4)),
            ),
            "created_at": at(draw(st.integers(0, 50))),  # ties on created_at happen
        }
        for n in range(draw(st.integers(0, 10)))
    ]
    licenses = [
        license_row(
            f"lic-{n}",
            status=draw(st.sampled_from(["active", "suspended"])),
            max_override=draw(st.one_of(st.none(), st.integers(1, 4))),
        )
        for n in range(draw(st.integers(1, 3)))
    ]
    activations = [
        activation(
            n,
            draw(st.sampled_from([lic["id"] for lic in licenses])),
            seen_hours=draw(st.one_of(st.none(), st.integers(0, 20))),
            lease=draw(
                st.one_of(st.none(), st.sampled_from([at(1), iso(NOW + timedelta(hours=1))]))
            ),
        )
        for n in range(draw(st.integers(0, 8)))
    ]
    counters = [counter("exports", draw(st.integers(0, 10**6)))] if draw(st.booleans()) else []
    return snapshot(licenses=licenses, activations=activations, counters=counters, objects=objects)


@st.composite
def rules_variants(draw: st.DrawFn) -> MigrationRules:
    policy = draw(
        st.sampled_from(
            [
                'on_conflict = "archive"',
                'on_conflict = "read_only"',
                'on_conflict = "grace", grace_days = 7',
                'on_conflict = "block"',
            ]
        )
    )
    storage = draw(st.sampled_from(['"keep"', '{ on_conflict = "archive" }', '"drop"']))
    return rules(
        **{
            'projects = { on_conflict = "archive" }': f"projects = {{ {policy} }}",
            'storage = "keep"': f"storage = {storage}",
            'activations = "trim_to_cap"': f'activations = "{draw(st.sampled_from(["keep_all", "trim_to_cap"]))}"',
            'exports = "carry"': f'exports = "{draw(st.sampled_from(["carry", "reset", "prorate"]))}"',
            "[addons]": (
                f'[overrides]\nmax_activations = "{draw(st.sampled_from(["carry", "reset"]))}"\n\n[addons]'
            ),
        }
    )


@settings(max_examples=300, deadline=None)
@given(snap=snapshots(), the_rules=rules_variants())
def test_the_expected_state_loses_nothing(snap: dict[str, Any], the_rules: MigrationRules) -> None:
    result = plan(snap, the_rules)
    expected = result.expected
    # License keys and the account's preferences survive every migration.
    assert [(lic["id"], lic["key_lookup"]) for lic in expected["licenses"]] == sorted(
        (lic["id"], lic["key_lookup"]) for lic in snap["licenses"]
    )
    assert expected["account"]["preferences"] == snap["account"]["preferences"]
    # An archived quota ends at or under its limit in the standard tier.
    usage = quota_usage(expected)
    for conflict in result.conflicts:
        if conflict.policy == "archive":
            assert usage.get(conflict.source_quota, 0) <= conflict.limit
    # No object vanishes: each original is still there, an archived one superseded beside its
    # archive copy, every other one unchanged.
    after = {o["id"]: o for o in expected["objects"]}
    assert len(after) == len(snap["objects"]) + len(result.archive)
    for original in snap["objects"]:
        if original["id"] in result.archive:
            assert after[original["id"]] == {**original, "state": "superseded"}
            copy = after[derived_id(MIGRATION, "archive", original["id"])]
            assert copy == {**original, "id": copy["id"], "tier": "archive", "state": "active"}
        else:
            assert after[original["id"]] == original
    # Activations leave only as the plan says.
    kept = {a["id"] for a in expected["activations"]}
    assert kept | set(result.deactivate) == {a["id"] for a in snap["activations"]}
    assert not kept & set(result.deactivate)
