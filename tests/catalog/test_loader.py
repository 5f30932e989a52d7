"""The loader: every class of bad manifest is reported with file, field path, reason (and line
when it can be known), all problems at once; the example catalog loads clean."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyshift.catalog import loader
from keyshift.catalog.loader import MAX_FILE_BYTES, Problem
from keyshift.catalog.manifests import Edition, Plan
from keyshift.errors import ManifestError
from tests.catalog.helpers import EXAMPLE_EDITIONS, EXAMPLE_PLANS, EXAMPLES, example_text

EDITION = """\
[edition]
key = "pro"
version = "2025"
name = "Pro"

[features]
sso = "enabled"
api_access = { mode = "throttled", limit = 100, period = "day" }

[quotas]
seats = 5
storage_gb = { limit = 100, unit = "GB" }
"""

PLAN = """\
[plan]
key = "pro-seat"
version = "2025"
name = "Pro, per seat"
edition = "pro@2025"

[licensing]
model = "seat"
max_activations = 3

[term]
length = "1y"
grace_period = "7d"
"""


def problems_of(files: dict[str, str | bytes]) -> list[Problem]:
    with pytest.raises(ManifestError) as caught:
        loader.load_texts(files)
    return list(caught.value.problems)


def only_problem(name: str, text: str | bytes) -> Problem:
    problems = problems_of({name: text})
    assert len(problems) == 1, problems
    return problems[0]


def test_the_example_catalog_loads_clean() -> None:
    manifests = loader.load(EXAMPLES)
    editions = {m.ref for m in manifests if m.kind == "edition"}
    plans = {m.ref for m in manifests if m.kind == "plan"}
    assert editions == EXAMPLE_EDITIONS
    assert plans == EXAMPLE_PLANS
    assert loader.missing_editions(manifests) == []
    # Sorted by path, and each remembers its file.
    assert [m.source for m in manifests] == sorted(m.source for m in manifests)
    assert all(m.source.startswith(str(EXAMPLES)) for m in manifests)


def test_the_example_catalog_has_both_licensing_models() -> None:
    plans = {m.ref: m.model for m in loader.load(EXAMPLES / "plans") if isinstance(m.model, Plan)}
    assert plans["pro-seat@2025"].licensing.model == "seat"
    assert plans["pro-seat@2025"].licensing.activation == "floating"  # type: ignore[union-attr]
    assert plans["pro-seat@2023"].licensing.activation == "node-locked"  # type: ignore[union-attr]
    assert plans["pro-usage@2025"].licensing.model == "usage"
    assert {m.key for m in plans["pro-usage@2025"].meters} >= {"api_calls"}


def test_team_quotas_are_below_enterprise() -> None:
    editions = {m.ref: m.model for m in loader.load(EXAMPLES) if isinstance(m.model, Edition)}
    team, enterprise = (editions[r].quota_limits() for r in ("team@2025", "enterprise@2025"))
    assert team.keys() == enterprise.keys()
    assert all(team[k] < enterprise[k] for k in team)


def test_a_valid_edition_and_plan_parse() -> None:
    manifests = loader.load_texts({"e.toml": EDITION, "p.toml": PLAN})
    assert [(m.kind, m.ref, m.source) for m in manifests] == [
        ("edition", "pro@2025", "e.toml"),
        ("plan", "pro-seat@2025", "p.toml"),
    ]


def test_toml_syntax_error_names_the_file_and_line() -> None:
    broken = EDITION.replace('name = "Pro"', 'name = "Pro')
    problem = only_problem("editions/pro.toml", broken)
    assert problem.file == "editions/pro.toml"
    assert problem.line == 4
    assert problem.reason.startswith("TOML syntax:")
    assert str(problem).startswith("editions/pro.toml:4: TOML syntax:")


def test_an_unclosed_array_is_reported_where_the_bracket_is_missing() -> None:
    text = "a = 1\nb = [1, 2,\n  3\n# a comment\n\nc = 4\n"
    problem = only_problem("editions/pro.toml", text)
    assert (problem.line, problem.reason) == (3, "TOML syntax: Unclosed array")


def test_unknown_key_is_an_error_with_its_path_and_line() -> None:
    problem = only_problem(
        "e.toml", EDITION.replace('name = "Pro"', 'name = "Pro"\ncolour = "blue"')
    )
    assert (problem.field, problem.line) == ("edition.colour", 5)
    assert "unknown field" in problem.reason


def test_wrong_type_names_the_field() -> None:
    problem = only_problem("p.toml", PLAN.replace("max_activations = 3", 'max_activations = "3x"'))
    assert problem.field == "licensing.max_activations"
    assert problem.line == 9
    assert "integer" in problem.reason


def test_out_of_range_value_reads_like_the_documented_example() -> None:
    problem = only_problem(
        "plans/pro.toml", PLAN.replace("max_activations = 3", "max_activations = 0")
    )
    assert str(problem) == (
        "plans/pro.toml:9: licensing.max_activations: Input should be greater than or equal to 1"
    )


def test_bad_duration_is_explained() -> None:
    problem = only_problem("p.toml", PLAN.replace('"7d"', '"2 weeks"'))
    assert problem.field == "term.grace_period"
    assert "not a duration" in problem.reason
    assert problem.line == 13


def test_calendar_unit_is_refused_where_a_fixed_span_is_needed() -> None:
    problem = only_problem("p.toml", PLAN.replace('"7d"', '"1mo"'))
    assert (problem.field, problem.reason) == (
        "term.grace_period",
        "use a fixed unit (s, m, h, d, w) here",
    )


def test_bad_throttle_reports_each_field_of_the_inline_table() -> None:
    text = EDITION.replace('limit = 100, period = "day"', 'limit = 0, period = "fortnight"')
    problems = problems_of({"e.toml": text})
    assert {(p.field, p.line) for p in problems} == {
        ("features.api_access.limit", 8),
        ("features.api_access.period", 8),
    }


def test_misspelt_feature_mode_gives_one_problem_not_one_per_union_member() -> None:
    problem = only_problem("e.toml", EDITION.replace('sso = "enabled"', 'sso = "enbled"'))
    assert problem.field == "features.sso"
    assert "'enabled' or 'disabled'" in problem.reason


def test_unknown_licensing_model_names_the_discriminator() -> None:
    problem = only_problem("p.toml", PLAN.replace('model = "seat"', 'model = "subscription"'))
    assert problem.field == "licensing.model"
    assert "'seat', 'usage'" in problem.reason


def test_floating_without_lease_is_a_licensing_problem() -> None:
    text = PLAN.replace("max_activations = 3", 'max_activations = 3\nactivation = "floating"')
    problem = only_problem("p.toml", text)
    assert problem.field == "licensing"
    assert "lease_ttl" in problem.reason


def test_usage_plan_needs_meters_and_missing_meter_fields_are_named() -> None:
    usage = PLAN.replace('model = "seat"\nmax_activations = 3', 'model = "usage"')
    assert "at least one [[meters]]" in only_problem("p.toml", usage).reason
    with_meter = usage + '\n[[meters]]\nkey = "api_calls"\nunit = "call"\n'
    problem = only_problem("p.toml", with_meter)
    assert (problem.field, problem.reason) == ("meters.0.included", "required field is missing")
    assert problem.line == 14


def test_huge_numbers_are_refused_not_overflowed() -> None:
    problem = only_problem(
        "e.toml", EDITION.replace("seats = 5", "seats = 99999999999999999999999")
    )
    assert problem.field == "quotas.seats"


def test_booleans_are_not_quotas() -> None:
    assert (
        only_problem("e.toml", EDITION.replace("seats = 5", "seats = true")).field == "quotas.seats"
    )


def test_invalid_key_names_are_explained() -> None:
    problem = only_problem("e.toml", EDITION.replace('key = "pro"', 'key = "Pro Edition"'))
    assert problem.field == "edition.key"
    assert "a-z" in problem.reason


def test_a_file_that_is_neither_edition_nor_plan_is_refused() -> None:
    problem = only_problem("misc/notes.toml", 'title = "hello"\n')
    assert problem.file == "misc/notes.toml"
    assert "neither an edition nor a plan" in problem.reason


def test_a_file_with_both_tables_is_refused() -> None:
    problem = only_problem("both.toml", EDITION + "\n" + PLAN)
    assert problem.field == "plan"
    assert "not both" in problem.reason


def test_an_oversized_file_is_refused_unparsed() -> None:
    huge = EDITION + "# " + "x" * MAX_FILE_BYTES + "\n"
    problem = only_problem("big.toml", huge)
    assert "at most 262144" in problem.reason


def test_non_utf8_is_refused_with_its_line() -> None:
    problem = only_problem("latin1.toml", EDITION.replace("Pro", "Pr\xe9").encode("latin-1"))
    assert "not UTF-8" in problem.reason
    assert problem.line == 4


def test_deeply_nested_toml_is_a_problem_not_a_crash() -> None:
    problem = only_problem("deep.toml", "a = " + "[" * 5000 + "]" * 5000 + "\n")
    assert "TOML syntax" in problem.reason


def test_the_same_version_in_two_files_names_both() -> None:
    problems = problems_of({"editions/a.toml": EDITION, "editions/b.toml": EDITION})
    assert len(problems) == 1
    assert problems[0].file == "editions/b.toml"
    assert problems[0].field == "edition.version"
    assert "editions/a.toml" in problems[0].reason
    assert problems[0].line == 3


def test_an_edition_and_a_plan_may_share_a_ref() -> None:
    same_ref = PLAN.replace('key = "pro-seat"', 'key = "pro"')
    assert len(loader.load_texts({"e.toml": EDITION, "p.toml": same_ref})) == 2


def test_every_problem_in_every_file_is_reported_at_once() -> None:
    problems = problems_of(
        {
            "a.toml": EDITION.replace('sso = "enabled"', 'sso = "on"').replace(
                "seats = 5", "seats = -1"
            ),
            "b.toml": "not toml at all = = =",
            "c.toml": PLAN.replace('"1y"', '"forever"'),
            "d.toml": PLAN,
        }
    )
    assert sorted((p.file, p.field) for p in problems) == [
        ("a.toml", "features.sso"),
        ("a.toml", "quotas.seats"),
        ("b.toml", ""),
        ("c.toml", "term.length"),
    ]
    assert all(p.to_dict().keys() == {"file", "field", "reason", "line"} for p in problems)


def test_a_plan_whose_edition_is_elsewhere_loads_but_is_listed_as_missing() -> None:
    manifests = loader.load_texts({"p.toml": PLAN})
    assert [(m.ref, edition) for m, edition in loader.missing_editions(manifests)] == [
        ("pro-seat@2025", "pro@2025")
    ]


def test_a_directory_is_loaded_recursively_and_problems_carry_the_path(tmp_path: Path) -> None:
    (tmp_path / "editions").mkdir()
    (tmp_path / "plans" / "legacy").mkdir(parents=True)
    (tmp_path / "editions" / "pro.toml").write_text(EDITION)
    (tmp_path / "plans" / "legacy" / "pro.toml").write_text(PLAN.replace("= 3", "= 0"))
    (tmp_path / "README.md").write_text("not a manifest")
    with pytest.raises(ManifestError) as caught:
        loader.load(tmp_path)
    (problem,) = caught.value.problems
    assert problem.file == str(tmp_path / "plans" / "legacy" / "pro.toml")
    assert problem.field == "licensing.max_activations"


def test_an_empty_or_missing_directory_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no \*\.toml"):
        loader.load(tmp_path)
    with pytest.raises(ManifestError, match="no such file"):
        loader.load(tmp_path / "nope")


def test_hash_ignores_formatting_comments_and_explicit_defaults() -> None:
    original = loader.load_text("a.toml", example_text("plans/pro-seat-2023.toml"))
    reformatted = loader.load_text(
        "b.toml",
        "# reordered\n"
        '[term]\noffline_allowance = "7d"\ngrace_period = "14d"\nlength = "1y"\n'
        '[licensing]\nmax_activations = 3\nmodel = "seat"\n'
        '[plan]\nedition = "pro@2023"\nname = "Pro, per seat (2023)"\nversion = "2023"\n'
        'key = "pro-seat"\ndescription = ""\n',
    )
    assert reformatted.content_hash() == original.content_hash()
    changed = loader.load_text(
        "c.toml", example_text("plans/pro-seat-2023.toml").replace('"14d"', '"15d"')
    )
    assert changed.content_hash() != original.content_hash()
