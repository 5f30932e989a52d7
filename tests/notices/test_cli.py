"""`keyshift notices …`: a template file with an unknown variable is refused naming the file
and the line; the endpoint, the history, the dead-letter list and replay from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import update

from keyshift.config import Settings
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Notice
from keyshift.migration.executor import Executor
from keyshift.notices.kinds import NoticeState
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers as migration
from tests.notices import helpers
from tests.support import cli_env, invoke_keyshift


async def test_a_template_file_with_an_unknown_variable_names_file_and_line(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    template = tmp_path / "completed.toml"
    template.write_text(
        'subject = "Done"\nbody = """\nHello $account_name,\nyou owe $balance.\n"""\n'
    )
    env = cli_env(settings)
    refused = invoke_keyshift(
        env, "notices", "templates", "set", "completed", "--file", str(template)
    )
    assert refused.returncode == 1
    assert f"{template}:4: body: unknown variable $balance" in refused.stderr
    template.write_text('subject = "Done"\nbody = "Hello $account_name"\n')
    stored = invoke_keyshift(
        env, "notices", "templates", "set", "completed", "--file", str(template)
    )
    assert stored.returncode == 0, stored.stderr
    assert json.loads(stored.stdout)["custom"] is True
    wrong = invoke_keyshift(env, "notices", "templates", "set", "invoice", "--file", str(template))
    assert wrong.returncode == 2 and "unknown kind 'invoice'" in wrong.stderr
    template.write_text('subject = "Done"\nbody = "x"\nfooter = "y"\n')
    extra = invoke_keyshift(env, "notices", "templates", "set", "started", "--file", str(template))
    assert extra.returncode == 2 and "footer" in extra.stderr


async def test_endpoint_history_dead_letters_and_replay_from_the_cli(
    db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    env = cli_env(settings)
    made = invoke_keyshift(env, "notices", "endpoint", "set", "--url", "http://127.0.0.1:9/h")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["secret"].startswith("whsec_")
    shown = invoke_keyshift(env, "notices", "endpoint", "show")
    assert "secret" not in json.loads(shown.stdout)
    bad = invoke_keyshift(env, "notices", "endpoint", "set", "--url", "gopher://x")
    assert bad.returncode != 0 and "http:// or https://" in bad.stderr

    await migration.publish(db)
    account_id, _ = await migration.rich_account(db, secrets)
    await Executor(db, secrets.signing).apply(SYSTEM, migration.rules(), account_id)
    listed = invoke_keyshift(env, "notices", "list", "--account", account_id)
    kinds = [n["kind"] for n in json.loads(listed.stdout)]
    assert kinds == ["completed", "started"]
    [first, _] = await helpers.notices(db, account_id)
    async with db.transaction() as session:
        await session.execute(
            update(Notice).where(Notice.id == first.id).values(state=NoticeState.DEAD)
        )
    dead = json.loads(invoke_keyshift(env, "notices", "dead").stdout)
    assert [n["id"] for n in dead] == [first.id]
    replayed = invoke_keyshift(env, "notices", "replay", first.id)
    assert json.loads(replayed.stdout)["state"] == "pending"
    again = invoke_keyshift(env, "notices", "replay", first.id)
    assert again.returncode != 0 and "only a dead or delivered notice" in again.stderr
