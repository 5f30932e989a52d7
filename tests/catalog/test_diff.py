"""The catalog diff: a pure function over editions and resolved plan entitlements."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from keyshift.catalog import loader
from keyshift.catalog.diff import (
    FeatureChange,
    QuotaChange,
    TermChange,
    diff_editions,
    diff_features,
    diff_plans,
    diff_quotas,
)
from keyshift.catalog.entitlements import Entitlements, FeatureGrant, resolve
from keyshift.catalog.manifests import Edition, Plan
from tests.catalog.helpers import EXAMPLES


def _examples() -> tuple[dict[str, Edition], dict[str, Plan]]:
    manifests = loader.load(EXAMPLES)
    editions = {m.ref: m.model for m in manifests if isinstance(m.model, Edition)}
    plans = {m.ref: m.model for m in manifests if isinstance(m.model, Plan)}
    return editions, plans


EDITIONS, PLANS = _examples()


def entitlements(plan_ref: str) -> Entitlements:
    plan = PLANS[plan_ref]
    return resolve(plan, "hash-" + plan_ref, EDITIONS[plan.plan.edition])


def test_pro_2023_to_2025_names_each_gain_loss_and_change() -> None:
    result = diff_editions(EDITIONS["pro@2023"], EDITIONS["pro@2025"])
    assert (result.kind, result.old_ref, result.new_ref) == ("edition", "pro@2023", "pro@2025")
    assert [f.name for f in result.features_where("gained")] == [
        "audit_log",
        "automations",
        "custom_branding",
    ]
    assert [f.name for f in result.features_where("lost")] == ["legacy_csv_export"]
    changed = {f.name: f for f in result.features_where("changed")}
    assert changed["bulk_import"] == FeatureChange(
        "bulk_import", "changed", FeatureGrant("enabled"), FeatureGrant("throttled", 50, "day")
    )
    assert changed["api_access"].old == FeatureGrant("throttled", 5000, "day")
    assert changed["api_access"].new == FeatureGrant("throttled", 20000, "day")
    assert result.quotas_where("gained") == (
        QuotaChange("automation_runs_per_month", "gained", None, 5000),
    )
    assert result.quotas_where("lost") == (QuotaChange("shared_links", "lost", 1000, None),)
    storage = next(q for q in result.quotas if q.name == "storage_gb")
    assert (storage.old, storage.new, storage.is_lowered) == (500, 250, True)
    assert "seats" not in {q.name for q in result.quotas}  # unchanged quotas are not listed
    assert result.licensing == () and result.meters == ()


def test_the_json_form_groups_by_change_and_says_which_way_a_quota_moved() -> None:
    body = diff_editions(EDITIONS["pro@2023"], EDITIONS["pro@2025"]).to_dict()
    assert body["from"] == "pro@2023" and body["to"] == "pro@2025"
    assert {
        "name": "storage_gb",
        "change": "changed",
        "old": 500,
        "new": 250,
        "direction": "lowered",
    } in body["quotas"]["changed"]
    assert body["features"]["lost"] == [
        {"name": "legacy_csv_export", "change": "lost", "old": {"mode": "enabled"}, "new": None}
    ]


def test_seat_plan_upgrade_reports_licensing_changes() -> None:
    result = diff_plans(entitlements("pro-seat@2023"), entitlements("pro-seat@2025"))
    assert result.kind == "plan"
    changes = {c.field: c for c in result.licensing}
    assert changes["activation_mode"] == TermChange("activation_mode", "node-locked", "floating")
    assert changes["max_activations"] == TermChange("max_activations", 3, 5)
    assert changes["lease_seconds"] == TermChange("lease_seconds", None, 3600)
    assert changes["grace_seconds"] == TermChange("grace_seconds", 14 * 86400, 7 * 86400)
    assert changes["edition_ref"] == TermChange("edition_ref", "pro@2023", "pro@2025")
    assert "term" not in changes and "model" not in changes
    assert [f.name for f in result.features_where("lost")] == ["legacy_csv_export"]


def test_seat_to_usage_reports_the_model_and_the_meters_gained() -> None:
    result = diff_plans(entitlements("pro-seat@2025"), entitlements("pro-usage@2025"))
    changes = {c.field: (c.old, c.new) for c in result.licensing}
    assert changes["model"] == ("seat", "usage")
    assert changes["term"] == ("1y", "1mo")
    assert [(m.name, m.change) for m in result.meters] == [
        ("active_devices", "gained"),
        ("api_calls", "gained"),
        ("compute_minutes", "gained"),
    ]
    assert result.features == () and result.quotas == ()  # same edition


def test_enterprise_to_team_is_a_downgrade_in_every_quota() -> None:
    result = diff_plans(entitlements("enterprise-seat@2025"), entitlements("team-seat@2025"))
    assert result.quotas and all(q.change == "changed" and q.is_lowered for q in result.quotas)
    assert {f.name for f in result.features_where("lost")} == {
        "data_residency",
        "dedicated_support",
        "scim_provisioning",
    }
    assert result.features_where("gained") == ()


def test_a_version_against_itself_is_empty() -> None:
    assert diff_plans(entitlements("team-seat@2025"), entitlements("team-seat@2025")).is_empty


def test_absent_and_disabled_features_are_equivalent() -> None:
    assert diff_features({"sso": FeatureGrant("disabled")}, {}) == ()
    assert diff_features({}, {"sso": FeatureGrant("disabled")}) == ()


grants = st.one_of(
    st.just(FeatureGrant("enabled")),
    st.just(FeatureGrant("disabled")),
    st.builds(
        FeatureGrant,
        st.just("throttled"),
        st.integers(1, 5),
        st.sampled_from(["day", "month"]),
    ),
)
names = st.sampled_from(["a", "b", "c", "d", "e"])


@given(st.dictionaries(names, grants), st.dictionaries(names, grants))
def test_reversing_a_feature_diff_swaps_gained_and_lost(
    old: dict[str, FeatureGrant], new: dict[str, FeatureGrant]
) -> None:
    forward, backward = diff_features(old, new), diff_features(new, old)
    flip = {"gained": "lost", "lost": "gained", "changed": "changed"}
    assert {(c.name, flip[c.change], c.new, c.old) for c in forward} == {
        (c.name, c.change, c.old, c.new) for c in backward
    }
    for change in forward:
        was_usable = bool(change.old and change.old.is_usable)
        now_usable = bool(change.new and change.new.is_usable)
        assert (change.change == "gained") == (now_usable and not was_usable)
        assert (change.change == "lost") == (was_usable and not now_usable)


@given(
    st.dictionaries(names, st.integers(0, 10**15)), st.dictionaries(names, st.integers(0, 10**15))
)
def test_quota_diff_lists_exactly_the_names_that_differ(
    old: dict[str, int], new: dict[str, int]
) -> None:
    result = diff_quotas(old, new)
    assert {q.name for q in result} == {
        n for n in old.keys() | new.keys() if old.get(n) != new.get(n)
    }
    assert [q.name for q in result] == sorted(q.name for q in result)
