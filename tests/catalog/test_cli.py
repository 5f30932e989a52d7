"""`keyshift catalog …` on the test's database: exit codes and output. Most calls run
in-process (the same Typer app, see ``invoke_keyshift``); refusing bad manifests runs as a
real process."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from keyshift.config import Settings
from tests.catalog.helpers import EXAMPLES, REPO
from tests.support import cli_env, invoke_keyshift, run_keyshift


def keyshift(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """In-process."""
    return invoke_keyshift(cli_env(settings), "catalog", *args, cwd=REPO)


def real_keyshift(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """A real process."""
    return run_keyshift(cli_env(settings), "catalog", *args, cwd=REPO)


def test_validate_accepts_the_example_catalog_without_a_database(tmp_path: Path) -> None:
    # validate reads no database: point it at one that does not exist.
    settings = Settings(
        database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none", secrets_dir=tmp_path
    )
    result = keyshift(settings, "validate", "examples/catalog")
    assert result.returncode == 0, result.stderr
    assert "13 manifest(s) valid: 6 edition(s), 7 plan(s)" in result.stdout
    assert "ok  plan    pro-usage@2025" in result.stdout


def test_validate_prints_every_problem_with_file_line_and_field_and_exits_2(
    tmp_path: Path,
) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "catalog")
    plan = tmp_path / "catalog" / "plans" / "pro-seat-2025.toml"
    plan.write_text(plan.read_text().replace("max_activations = 5", "max_activations = 0"))
    edition = tmp_path / "catalog" / "editions" / "pro-2023.toml"
    edition.write_text(edition.read_text().replace('sso = "disabled"', 'sso = "maybe"'))
    (tmp_path / "catalog" / "junk.toml").write_bytes(b"[edition\n\xff")
    settings = Settings(database_url="sqlite+aiosqlite:///unused.db", secrets_dir=tmp_path)

    result = real_keyshift(settings, "validate", str(tmp_path / "catalog"))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert (
        f"{plan}:12: licensing.max_activations: Input should be greater than or equal to 1" in lines
    )
    assert any(line.startswith(f"{edition}:19: features.sso: ") for line in lines)
    assert any(
        line.startswith(f"{tmp_path / 'catalog' / 'junk.toml'}:2: not UTF-8") for line in lines
    )
    assert lines[-1] == "3 problem(s) in 3 file(s)"
    assert "Traceback" not in result.stderr


def test_validate_notes_plans_whose_edition_is_not_in_the_directory(tmp_path: Path) -> None:
    settings = Settings(database_url="sqlite+aiosqlite:///unused.db", secrets_dir=tmp_path)
    result = keyshift(settings, "validate", "examples/catalog/plans")
    assert result.returncode == 0
    assert "plan.edition: pro@2025 is not in examples/catalog/plans" in result.stdout


def test_publish_then_republish_then_conflict(settings: Settings, tmp_path: Path) -> None:
    first = keyshift(settings, "publish", "examples/catalog")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("published  ") == 13
    assert "13 published, 0 unchanged" in first.stdout

    second = keyshift(settings, "publish", "examples/catalog")
    assert second.returncode == 0
    assert "0 published, 13 unchanged" in second.stdout
    assert "unchanged  plan    pro-seat@2023" in second.stdout

    shutil.copytree(EXAMPLES, tmp_path / "catalog")
    plan = tmp_path / "catalog" / "plans" / "pro-seat-2023.toml"
    plan.write_text(plan.read_text().replace('grace_period = "14d"', 'grace_period = "21d"'))
    conflict = keyshift(settings, "publish", str(tmp_path / "catalog"))
    assert conflict.returncode == 5
    assert "pro-seat@2023 is already published with different content" in conflict.stderr
    assert "Traceback" not in conflict.stderr

    listed = keyshift(settings, "list", "--json")
    assert listed.returncode == 0
    assert len(json.loads(listed.stdout)) == 13


def test_publish_refuses_invalid_manifests_and_unknown_editions(
    settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "bad.toml").write_text('[plan]\nkey = "x"\n')
    invalid = real_keyshift(settings, "publish", str(tmp_path))
    assert invalid.returncode == 2
    assert f"{tmp_path / 'bad.toml'}:1: plan.version: required field is missing" in invalid.stderr

    orphan = real_keyshift(settings, "publish", "examples/catalog/plans")
    assert orphan.returncode == 3
    assert "not published" in orphan.stderr
    empty = real_keyshift(settings, "list")
    assert empty.returncode == 0 and empty.stdout == ""


def test_diff_prints_a_table_and_json(settings: Settings) -> None:
    assert keyshift(settings, "publish", "examples/catalog").returncode == 0

    table = keyshift(settings, "diff", "pro@2023", "pro@2025")
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("edition pro@2023 → pro@2025")
    rows = [line.split() for line in table.stdout.splitlines()]
    assert ["lowered", "storage_gb", "500", "→", "250"] in rows
    assert ["lost", "legacy_csv_export", "enabled", "→", "-"] in rows
    assert ["gained", "audit_log", "disabled", "→", "enabled"] in rows

    plans = keyshift(settings, "diff", "pro-seat@2023", "pro-seat@2025")
    assert ["changed", "activation_mode", "node-locked", "→", "floating"] in [
        line.split() for line in plans.stdout.splitlines()
    ]
    assert ["changed", "grace_seconds", "2w", "→", "1w"] in [
        line.split() for line in plans.stdout.splitlines()
    ]

    as_json = keyshift(settings, "diff", "enterprise-seat@2025", "team-seat@2025", "--json")
    body = json.loads(as_json.stdout)
    assert body["kind"] == "plan"
    assert all(q["direction"] == "lowered" for q in body["quotas"]["changed"])

    unknown = keyshift(settings, "diff", "pro@2023", "pro@2099")
    assert unknown.returncode == 3
    assert "no published plan or edition pro@2099" in unknown.stderr
