"""Migration rules: the loader names every problem as ``file:line: field: reason``, the
cross-check with the catalog refuses rules that do not fit the plans they name, and the
examples in ``examples/migrations/`` validate clean against ``examples/catalog``. Pure: no
database."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyshift.canonical import content_hash
from keyshift.catalog.loader import load as load_catalog
from keyshift.catalog.manifests import Edition, Plan
from keyshift.migration.errors import RulesInvalid
from keyshift.migration.loader import catalog_problems, load_rules, load_rules_text
from keyshift.migration.rules import MigrationRules, PlanPair, check_against_catalog
from tests.migration import helpers

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CATALOG = ROOT / "examples" / "catalog"
EXAMPLE_RULES = ROOT / "examples" / "migrations"
EXAMPLE_FILES = [
    "enterprise-to-team-downgrade.toml",
    "pro-2023-to-2025.toml",
    "pro-seat-to-usage-2025.toml",
]

HEADER = """\
[rules]
key = "r"
version = "1"
name = "R"
from = ["old-seat@1"]
to = "new-seat@1"
"""


def problems_of(text: str, name: str = "rules.toml") -> list[str]:
    with pytest.raises(RulesInvalid) as caught:
        load_rules_text(name, text)
    return [str(p) for p in caught.value.problems]


def helper_pairs(*extra: Plan) -> dict[str, PlanPair]:
    """The helpers' small catalog (plus ``extra`` plans over its editions) as PlanPairs."""
    editions = {
        f"{e['edition']['key']}@{e['edition']['version']}": Edition.model_validate(e)
        for e in helpers.EDITIONS
    }
    return {
        f"{p.plan.key}@{p.plan.version}": PlanPair(
            p, content_hash(p.model_dump(mode="json")), editions[p.plan.edition]
        )
        for p in (*helpers.PLANS, *extra)
    }


def example_pairs() -> dict[str, PlanPair]:
    manifests = load_catalog(EXAMPLE_CATALOG)
    editions = {m.ref: m.model for m in manifests if m.kind == "edition"}
    return {
        m.ref: PlanPair(m.model, m.content_hash(), editions[m.model.plan.edition])
        for m in manifests
        if isinstance(m.model, Plan)
    }


def check(rules: MigrationRules, pairs: dict[str, PlanPair]) -> list[tuple[str, str]]:
    sources = {ref: pairs.get(ref) for ref in rules.rules.from_plans}
    problems = check_against_catalog(rules, sources, pairs.get(rules.rules.to))
    return [(p.field, p.reason) for p in problems]


def fields(problems: list[tuple[str, str]]) -> list[str]:
    return [field for field, _ in problems]


def plan(key: str, edition: str, licensing: dict, meters: list[dict]) -> Plan:
    return Plan.model_validate(
        {
            "plan": {"key": key, "version": "1", "name": key, "edition": edition},
            "licensing": licensing,
            "meters": meters,
        }
    )


# -- the loader: file:line: field: reason -------------------------------------------------------


def test_toml_syntax_error_names_the_file_and_line() -> None:
    assert problems_of(HEADER + "\n[features]\na = \n") == [
        "rules.toml:9: TOML syntax: Invalid value"
    ]


def test_an_unclosed_array_is_reported_on_its_own_line_not_the_next() -> None:
    # tomllib gives up at `to = …` (line 6) or past a blank and a comment; the "]" is missing
    # on line 5.
    text = HEADER.replace('from = ["old-seat@1"]', 'from = ["old-seat@1"')
    assert problems_of(text) == ["rules.toml:5: TOML syntax: Unclosed array"]
    spaced = HEADER.replace('from = ["old-seat@1"]\n', 'from = ["old-seat@1",\n  "b@1"\n\n# c\n')
    assert problems_of(spaced) == ["rules.toml:6: TOML syntax: Unclosed array"]


def test_every_file_level_problem_says_which_file() -> None:
    for text in ("a = \n", "[other]\n", b"\xff\xfe"):
        with pytest.raises(RulesInvalid) as caught:
            load_rules_text("mine.toml", text)
        assert caught.value.source == "mine.toml"


def test_unknown_field_is_an_error_with_its_path_and_line() -> None:
    text = HEADER + '\n[seats]\nactivation = "keep_all"\n'
    assert problems_of(text) == [
        "rules.toml:9: seats.activation: unknown field (not part of the schema;"
        " see docs/migration-rules.md)"
    ]


def test_a_top_level_key_written_after_a_table_lands_in_that_table() -> None:
    # TOML, not keyshift: ``addons_default`` after [overrides] is overrides.addons_default.
    text = HEADER + '\n[overrides]\nfeatures = "carry"\naddons_default = "drop"\n'
    assert problems_of(text) == [
        "rules.toml:10: overrides.addons_default: unknown field (not part of the schema;"
        " see docs/migration-rules.md)"
    ]


def test_a_file_without_a_rules_table_is_refused() -> None:
    assert problems_of('[features]\na = "keep"\n') == [
        "rules.toml: rules: a rules file starts with a [rules] table"
    ]


def test_bad_plan_references_name_their_field() -> None:
    text = HEADER.replace('to = "new-seat@1"', 'to = "new-seat"').replace(
        '["old-seat@1"]', '["old-seat@1", "Old Seat@1"]'
    )
    assert problems_of(text) == [
        "rules.toml:5: rules.from: 'Old Seat@1' is not a reference of the form key@version",
        "rules.toml:6: rules.to: 'new-seat' is not a reference of the form key@version",
    ]


def test_a_source_plan_listed_twice_is_refused() -> None:
    text = HEADER.replace('["old-seat@1"]', '["old-seat@1", "old-seat@1"]')
    assert problems_of(text) == ["rules.toml:5: rules.from: a source plan is listed twice"]


def test_grace_without_grace_days_is_refused() -> None:
    text = HEADER + '\n[quotas]\nprojects = { on_conflict = "grace" }\n'
    assert problems_of(text) == [
        "rules.toml:9: quotas.projects: 'grace_days' is required with on_conflict 'grace'"
        " and only with it"
    ]


def test_grace_days_without_grace_is_refused() -> None:
    text = HEADER + '\n[quotas]\nprojects = { on_conflict = "archive", grace_days = 3 }\n'
    assert problems_of(text)[0].startswith("rules.toml:9: quotas.projects: 'grace_days'")


def test_convert_without_a_factor_is_refused() -> None:
    text = HEADER + '\n[counters]\nexports = { action = "convert", to = "units" }\n'
    assert problems_of(text) == ["rules.toml:9: counters.exports: action 'convert' needs a factor"]


def test_to_or_factor_without_convert_is_refused() -> None:
    text = HEADER + '\n[counters]\nexports = { action = "carry", factor = 2 }\n'
    assert problems_of(text) == [
        "rules.toml:9: counters.exports: 'to' and 'factor' only go with action 'convert'"
    ]


def test_rename_without_to_is_refused() -> None:
    text = HEADER + '\n[features]\na = "rename"\nb = { action = "keep", to = "c" }\n'
    assert problems_of(text) == [
        "rules.toml:9: features.a: 'to' is required with action 'rename' and only with it",
        "rules.toml:10: features.b: 'to' is required with action 'rename' and only with it",
    ]


def test_target_among_sources_is_a_cycle() -> None:
    text = HEADER.replace('["old-seat@1"]', '["old-seat@1", "new-seat@1"]')
    assert problems_of(text) == [
        "rules.toml:6: rules.to: cycle: the target plan new-seat@1 is also a source plan"
    ]


def test_schedule_at_needs_a_time_zone() -> None:
    text = HEADER + '\n[schedule]\neffective = "at"\nat = 2026-12-01T00:00:00\n'
    assert problems_of(text) == [
        "rules.toml:10: schedule.at: 'at' needs a time zone offset (e.g. 2026-12-01T00:00:00Z)"
    ]


def test_schedule_at_and_effective_go_together() -> None:
    text = HEADER + '\n[schedule]\neffective = "period_end"\nat = 2026-12-01T00:00:00Z\n'
    assert problems_of(text) == [
        "rules.toml:8: schedule: 'at' is required with effective = 'at' and only with it"
    ]


def test_seat_conversion_needs_both_fields() -> None:
    text = HEADER + '\n[seats]\nconvert_to_meter = "units"\n'
    assert problems_of(text) == [
        "rules.toml:8: seats: 'convert_to_meter' and 'units_per_seat' go together"
    ]


def test_attribute_predicates_check_their_value() -> None:
    text = (
        HEADER
        + "\n[eligibility]\nattributes = [\n"
        + '  { name = "region", op = "in", value = "eu" },\n'
        + '  { name = "tier", op = "exists", value = 1 },\n'
        + '  { name = "seats", op = "gte", value = "ten" },\n'
        + "]\n"
    )
    assert problems_of(text) == [
        "rules.toml:9: eligibility.attributes.0: op 'in' needs a list",
        "rules.toml:9: eligibility.attributes.1: op 'exists' takes no value",
        "rules.toml:9: eligibility.attributes.2: op 'gte' compares numbers",
    ]


def test_every_problem_is_reported_at_once() -> None:
    text = (
        HEADER
        + '\n[features]\na = "kep"\n\n[quotas]\nprojects = { on_conflict = "burn" }\n'
        + '\n[seats]\nactivations = "all"\n'
    )
    problems = problems_of(text)
    assert [p.split(": ")[1] for p in problems] == [
        "features.a",
        "quotas.projects.on_conflict",
        "seats.activations",
    ]
    assert problems[0].startswith("rules.toml:9: ")


def test_load_rules_reads_a_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(HEADER + "\nbogus = 1\n")
    with pytest.raises(RulesInvalid) as caught:
        load_rules(path)
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:8: rules.bogus: unknown field (not part of the schema;"
        " see docs/migration-rules.md)"
    ]
    with pytest.raises(RulesInvalid) as missing:
        load_rules(tmp_path / "nowhere.toml")
    assert str(missing.value.problems[0]).endswith("nowhere.toml: no such file")


def test_short_forms_are_the_same_content_as_the_long_ones() -> None:
    short = HEADER + '\n[features]\na = "keep"\n\n[counters]\nexports = "carry"\n'
    long = (
        HEADER
        + '\n[features]\na = { action = "keep" }\n\n[counters]\nexports = { action = "carry" }\n'
    )
    [short_rules, long_rules] = [load_rules_text("r.toml", t)[0] for t in (short, long)]
    assert short_rules.content_hash() == long_rules.content_hash()
    assert short_rules.quotas == {} and short_rules.seats.activations == "keep_all"
    assert (
        short_rules.addons_default == "refuse" and short_rules.schedule.effective == "immediately"
    )
    assert short_rules.eligibility.account_status == ["active"]
    assert short_rules.ref == "r@1"


# -- the cross-check with the catalog -----------------------------------------------------------


def test_the_helper_rules_fit_the_helper_catalog() -> None:
    assert check(helpers.rules(), helper_pairs()) == []


def test_unknown_source_and_target_plans_are_refused() -> None:
    rules = helpers.rules(**{'"old-seat@1"': '"gone@1"', '"new-seat@1"': '"missing@2"'})
    assert check(rules, helper_pairs()) == [
        ("rules.from.0", "no published plan gone@1"),
        ("rules.to", "no published plan missing@2"),
    ]


def test_an_unmapped_source_feature_and_quota_are_refused() -> None:
    rules = helpers.rules(**{'c = "keep"\n': "", 'storage = "keep"\n': ""})
    assert check(rules, helper_pairs()) == [
        ("features.c", "the source edition's feature 'c' is unmapped"),
        ("quotas.storage", "the source edition's quota 'storage' is unmapped"),
    ]


def test_a_mapping_of_a_name_no_source_has_is_refused() -> None:
    rules = helpers.rules(**{'c = "keep"\n': 'c = "keep"\nd = "keep"\n'})
    assert check(rules, helper_pairs()) == [
        ("features.d", "no source edition has a feature 'd'"),
    ]


def test_keep_of_a_feature_the_target_lacks_is_refused() -> None:
    text = (EXAMPLE_RULES / "pro-2023-to-2025.toml").read_text()
    rules = helpers.rules(text, **{'legacy_csv_export = "drop"': 'legacy_csv_export = "keep"'})
    assert check(rules, example_pairs()) == [
        ("features.legacy_csv_export", "the target edition has no feature 'legacy_csv_export'"),
    ]


def test_keep_of_a_quota_the_target_lacks_is_refused() -> None:
    text = (EXAMPLE_RULES / "pro-2023-to-2025.toml").read_text()
    rules = helpers.rules(text, **{'shared_links = "drop"': 'shared_links = "keep"'})
    assert check(rules, example_pairs()) == [
        ("quotas.shared_links", "the target edition has no quota 'shared_links'"),
    ]


def test_rename_onto_a_name_the_target_lacks_is_refused() -> None:
    rules = helpers.rules(**{'a = "keep"': 'a = { action = "rename", to = "zz" }'})
    assert check(rules, helper_pairs()) == [
        ("features.a", "the target edition has no feature 'zz'")
    ]


def test_two_features_renamed_onto_one_target_are_contradictory() -> None:
    rules = helpers.rules(
        **{
            'a = "keep"': 'a = { action = "rename", to = "d" }',
            'b = "keep"': 'b = { action = "rename", to = "d" }',
        }
    )
    assert check(rules, helper_pairs()) == [
        ("features.b", "contradictory: 'a' is already mapped onto 'd'"),
    ]


def test_a_keep_and_a_rename_onto_the_same_name_are_contradictory() -> None:
    rules = helpers.rules(**{'projects = { on_conflict = "archive" }': 'projects = "drop"'})
    assert check(rules, helper_pairs()) == []
    rules = helpers.rules(
        **{
            'projects = { on_conflict = "archive" }': 'projects = { action = "rename", to = "storage" }'
        }
    )
    assert check(rules, helper_pairs()) == [
        ("quotas.projects.to", "'storage' is itself mapped (keep); rename chains are ambiguous"),
        ("quotas.storage", "contradictory: 'projects' is already mapped onto 'storage'"),
    ]


def test_a_rename_chain_is_refused() -> None:
    # a → b while b is itself renamed to d: is a meant to end up as b or as d?
    rules = helpers.rules(
        **{
            'a = "keep"': 'a = { action = "rename", to = "b" }',
            'b = "keep"': 'b = { action = "rename", to = "d" }',
        }
    )
    assert check(rules, helper_pairs()) == [
        ("features.a.to", "'b' is itself mapped (rename); rename chains are ambiguous"),
    ]


def test_a_rename_onto_a_dropped_source_name_is_allowed() -> None:
    rules = helpers.rules(
        **{'a = "keep"': 'a = { action = "rename", to = "b" }', 'b = "keep"': 'b = "drop"'}
    )
    assert check(rules, helper_pairs()) == []


def test_add_on_rename_chains_are_refused() -> None:
    rules = helpers.rules(
        **{'extra = "carry"': 'extra = { action = "rename", to = "more" }\nmore = "carry"'}
    )
    assert check(rules, helper_pairs()) == [
        ("addons.extra.to", "'more' is itself mapped; rename chains are ambiguous"),
    ]


def unique_pairs() -> dict[str, PlanPair]:
    devices = {"key": "devices", "unit": "device", "aggregation": "unique", "included": 5}
    exports = {"key": "exports", "unit": "export", "included": 50}
    return helper_pairs(
        plan("src", "old@1", {"model": "seat", "max_activations": 3}, [devices, exports]),
        plan("dst", "new@1", {"model": "usage"}, [devices, {**exports, "key": "units"}]),
    )


UNIQUE_RULES = (
    HEADER.replace('"old-seat@1"', '"src@1"').replace('"new-seat@1"', '"dst@1"')
    + """
[features]
a = "keep"
b = "keep"
c = "keep"

[quotas]
projects = "keep"
storage = "keep"
"""
)


def test_counters_convert_of_a_unique_meter_is_refused() -> None:
    text = (
        UNIQUE_RULES + '\n[counters]\ndevices = { action = "convert", to = "units", factor = 1 }\n'
    )
    assert check(load_rules_text("r.toml", text)[0], unique_pairs()) == [
        ("counters.devices", "meter 'devices' counts unique members: only 'carry' can keep it"),
    ]


def test_counters_reset_or_prorate_of_a_unique_meter_is_refused() -> None:
    for action in ("reset", "prorate"):
        text = UNIQUE_RULES + f'\n[counters]\ndevices = "{action}"\nexports = "reset"\n'
        assert check(load_rules_text("r.toml", text)[0], unique_pairs()) == [
            ("counters.devices", "meter 'devices' counts unique members: only 'carry' can keep it"),
        ]


def test_nothing_converts_into_a_unique_meter() -> None:
    text = UNIQUE_RULES + (
        '\n[counters]\ndevices = "carry"\n'
        'exports = { action = "convert", to = "devices", factor = 1 }\n'
    )
    assert check(load_rules_text("r.toml", text)[0], unique_pairs()) == [
        (
            "counters.exports",
            "meter 'devices' counts unique members: nothing can be converted into it",
        ),
        ("counters.exports", "contradictory: 'devices' already goes into meter 'devices'"),
    ]


def test_counter_rules_must_name_meters_the_plans_have() -> None:
    text = UNIQUE_RULES + (
        '\n[counters]\nghost = "carry"\ndevices = "carry"\n'
        'exports = { action = "convert", to = "nowhere", factor = 2 }\n'
    )
    assert check(load_rules_text("r.toml", text)[0], unique_pairs()) == [
        ("counters.exports", "the target plan has no meter 'nowhere'"),
        ("counters.ghost", "no source plan has a meter 'ghost'"),
    ]


def test_a_meter_in_both_plans_must_be_mapped() -> None:
    rules = helpers.rules(**{'exports = "carry"\n': ""})
    assert check(rules, helper_pairs()) == [
        ("counters.exports", "meter 'exports' is in both plans: say carry, reset, …"),
    ]


def test_seat_conversion_into_a_missing_meter_is_refused() -> None:
    rules = helpers.rules(
        **{
            '"new-seat@1"': '"new-usage@1"',
            'activations = "trim_to_cap"': 'convert_to_meter = "seats"\nunits_per_seat = 10',
        }
    )
    assert check(rules, helper_pairs()) == [
        ("seats.convert_to_meter", "the target plan has no meter 'seats'"),
    ]


def test_seat_conversion_needs_a_seat_based_source() -> None:
    # From new-usage@1 (edition new@1, meters exports and units) to dst@1.
    text = UNIQUE_RULES.replace('"src@1"', '"new-usage@1"').replace(
        'c = "keep"', 'c = "keep"\nd = "keep"'
    )
    text += '\n[seats]\nconvert_to_meter = "units"\nunits_per_seat = 10\n'
    text += '\n[counters]\nexports = "reset"\nunits = "carry"\n'
    assert check(load_rules_text("r.toml", text)[0], unique_pairs()) == [
        ("seats.convert_to_meter", "no source plan is seat-based: there are no seats"),
    ]


def test_trim_to_cap_without_a_target_cap_is_refused() -> None:
    rules = helpers.rules(**{'"new-seat@1"': '"new-usage@1"'})
    assert check(rules, helper_pairs()) == [
        ("seats.activations", "the target plan has no activation cap to trim to"),
    ]


def test_cross_check_problems_are_placed_on_their_lines() -> None:
    text = helpers.RULES.replace('b = "keep"', 'b = { action = "rename", to = "zz" }')
    rules, text = load_rules_text("rules.toml", text)
    problems = check_against_catalog(
        rules, {"old-seat@1": helper_pairs()["old-seat@1"]}, helper_pairs()["new-seat@1"]
    )
    lines = text.splitlines()
    [placed] = catalog_problems("rules.toml", text, problems)
    assert (
        str(placed)
        == f"rules.toml:{placed.line}: features.b: the target edition has no feature 'zz'"
    )
    assert placed.line is not None and lines[placed.line - 1].startswith("b = ")


# -- the examples -------------------------------------------------------------------------------


def test_the_examples_directory_holds_the_documented_files() -> None:
    assert sorted(p.name for p in EXAMPLE_RULES.glob("*.toml")) == EXAMPLE_FILES


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_each_example_validates_clean_against_the_example_catalog(name: str) -> None:
    rules, _ = load_rules(EXAMPLE_RULES / name)
    assert check(rules, example_pairs()) == []
