"""`keyshift rules validate` and `keyshift migrate …` as real processes: what they print, their
exit codes, and that planning writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select

from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.db.tables import Base
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers
from tests.support import cli_env, run_keyshift


async def dump(db: Database) -> dict[str, list[tuple]]:
    """Every row of every table: the whole database, to compare before and after."""
    out = {}
    async with db.transaction() as session:
        for table in Base.metadata.sorted_tables:
            rows = (await session.execute(select(table))).all()
            out[table.name] = sorted(tuple(map(repr, r)) for r in rows)
    return out


async def test_plan_prints_steps_conflicts_and_risks_and_writes_nothing(
    db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    rules = tmp_path / "rules.toml"
    rules.write_text(helpers.RULES)
    before = await dump(db)

    text = run_keyshift(
        cli_env(settings), "migrate", "plan", "--rules", str(rules), "--account", account_id
    )
    as_json = run_keyshift(
        cli_env(settings),
        "migrate",
        "plan",
        "--rules",
        str(rules),
        "--account",
        account_id,
        "--json",
    )

    assert text.returncode == 0, text.stderr
    assert "old-seat@1 → new-seat@1" in text.stdout
    assert "4. cutover" in text.stdout
    assert "projects: 5 used > 3 allowed → archive" in text.stdout
    assert "risks: loses_feature:b" in text.stdout
    # Readable text, not Python dict reprs.
    assert "  feature gained: d enabled\n" in text.stdout
    assert "  feature changed: b enabled → disabled\n" in text.stdout
    assert "  feature changed: c throttled 10/day → throttled 20/day\n" in text.stdout
    assert "  quota changed: projects 10 → 3\n" in text.stdout
    assert "{'" not in text.stdout and "': " not in text.stdout
    plan = json.loads(as_json.stdout)
    assert plan["can_apply"] is True and len(plan["archive"]) == 2
    assert await dump(db) == before

    # A plan that switches the activation mode lists each machine switched, and the seat
    # pins keep_all sets, one line each.
    other_id, _ = await helpers.rich_account(db, secrets)
    modes = tmp_path / "modes.toml"
    modes.write_text(helpers.mode_rules_text(helpers.OLD, helpers.NEW_FLOAT, "keep_all"))
    args = ("migrate", "plan", "--rules", str(modes), "--account", other_id)
    before = await dump(db)
    switching = run_keyshift(cli_env(settings), *args)
    switching_plan = json.loads(run_keyshift(cli_env(settings), *args, "--json").stdout)

    assert switching.returncode == 0, switching.stderr
    changes = switching_plan["changes"]
    assert len(changes["activations_converted"]) == 3
    for change in changes["activations_converted"]:
        assert (
            f"  activation switched: {change['activation_id']} ({change['fingerprint']}) on"
            f" license {change['license_id']}: node, no lease → floating, a lease of 3600 s"
            " from the cutover\n"
        ) in switching.stdout
    [pin] = changes["activations_grandfathered"]
    assert (
        f"  license {pin['license_id']} seats pinned: 3 kept > the target's cap of 2 → cap 3\n"
    ) in switching.stdout
    assert "{'" not in switching.stdout
    assert await dump(db) == before


async def test_rules_validate_names_file_line_and_field(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    await helpers.publish(db)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        helpers.RULES.replace('c = "keep"\n', "").replace('to = "new-seat@1"', 'to = "nope@9"')
    )

    result = run_keyshift(cli_env(settings), "rules", "validate", str(bad))

    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"{bad}:7: rules.to: no published plan nope@9") for line in lines)
    assert "Traceback" not in result.stderr
    good = tmp_path / "good.toml"
    good.write_text(helpers.RULES)
    ok = run_keyshift(cli_env(settings), "rules", "validate", str(good))
    assert ok.returncode == 0 and ok.stdout.startswith("ok  rules old-to-new@1")


async def test_apply_then_rollback_by_account_and_bad_requests(
    db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    env = cli_env(settings)
    rules = tmp_path / "rules.toml"
    rules.write_text(helpers.RULES)

    never = run_keyshift(env, "migrate", "rollback", "--account", account_id)
    assert never.returncode == 5 and "no migration to roll back" in never.stderr

    applied = run_keyshift(env, "migrate", "apply", "--rules", str(rules), "--account", account_id)
    assert applied.returncode == 0, applied.stderr
    migration = json.loads(applied.stdout)
    assert migration["state"] == "completed" and migration["receipt"]["body"]["to"] == helpers.NEW

    rolled = run_keyshift(env, "migrate", "rollback", "--account", account_id)
    assert rolled.returncode == 0, rolled.stderr
    proof = json.loads(rolled.stdout)["rollback"]
    assert proof["exact"] is True and proof["restored_hash"] == migration["snapshot_hash"]

    unknown = run_keyshift(env, "migrate", "apply", "--rules", str(rules), "--account", "nobody")
    assert unknown.returncode == 3 and "no account nobody" in unknown.stderr


def test_rules_validate_names_the_file_on_every_line_of_a_syntax_error(
    settings: Settings, tmp_path: Path
) -> None:
    bad = tmp_path / "syntax.toml"
    bad.write_text(helpers.RULES.replace('from = ["old-seat@1"]', 'from = ["old-seat@1"'))
    result = run_keyshift(cli_env(settings), "rules", "validate", "--offline", str(bad))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{bad}:6: TOML syntax: Unclosed array",
        f"1 problem(s) in {bad}",
    ]
