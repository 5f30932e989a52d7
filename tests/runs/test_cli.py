"""`keyshift runs …` and `keyshift worker` on both databases: the SQLite way (`start
--wait`), file:line errors for id files, four eyes, and workers as real processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers
from tests.runs.helpers import cohort, run_row, states
from tests.support import cli_env, invoke_keyshift, mint_token, run_keyshift


def _rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(helpers.RULES)
    return path


def _run_id(stdout: str) -> str:
    return stdout.split()[1]


async def test_a_run_from_the_cli_end_to_end(
    db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    ids = await cohort(db, secrets, 3)
    env = cli_env(settings)
    id_file = tmp_path / "ids.txt"
    id_file.write_text("# the first two\n" + "\n".join(ids[:2]) + "\n")
    rules = str(_rules_file(tmp_path))

    made = invoke_keyshift(env, "runs", "create", "--rules", rules, "--ids", str(id_file))
    assert made.returncode == 0, made.stderr
    run_id = _run_id(made.stdout)
    reported = invoke_keyshift(env, "runs", "report", run_id, "--json")
    assert reported.returncode == 0, reported.stderr
    assert json.loads(reported.stdout)["outcomes"] == {"migrate": 2}
    pretty = invoke_keyshift(env, "runs", "report", run_id)
    assert "migrate" in pretty.stdout and "accounts at risk" in pretty.stdout
    assert invoke_keyshift(env, "runs", "approve", run_id).returncode == 0
    started = invoke_keyshift(env, "runs", "start", run_id, "--wait")
    assert started.returncode == 0, started.stderr
    assert f"run {run_id} is completed (2 accounts processed here)" in started.stdout

    status = json.loads(invoke_keyshift(env, "runs", "status", run_id, "--json").stdout)
    assert status["progress"]["by_state"] == {"migrated": 2}
    assert status["progress"]["done"] == 2
    verified = invoke_keyshift(env, "runs", "verify", run_id, "--sample", "5")
    assert verified.returncode == 0, verified.stderr
    assert "2 account(s) checked, 0 with differences" in verified.stdout
    lines = invoke_keyshift(env, "runs", "accounts", run_id).stdout.splitlines()
    assert sorted(json.loads(line)["account_id"] for line in lines) == sorted(ids[:2])

    back = invoke_keyshift(env, "runs", "rollback", run_id, "--wait")
    assert back.returncode == 0, back.stderr
    assert (await run_row(db, run_id)).state == "rolled_back"
    assert (await helpers.state_of(db, ids[0]))["subscription"]["plan"] == helpers.OLD


async def test_cli_errors_name_the_file_and_line_and_change_nothing(
    db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    ids = await cohort(db, secrets, 1)
    env = cli_env(settings)
    rules = str(_rules_file(tmp_path))
    dup = tmp_path / "dup.txt"
    dup.write_text(f"{ids[0]}\n\n{ids[0]}\n")
    out = invoke_keyshift(env, "runs", "create", "--rules", rules, "--ids", str(dup))
    assert out.returncode == 2
    assert f"{dup}:3: duplicate of line 1" in out.stderr
    unknown = tmp_path / "unknown.txt"
    unknown.write_text(f"{ids[0]}\nghost\n")
    out = invoke_keyshift(env, "runs", "create", "--rules", rules, "--ids", str(unknown))
    assert out.returncode == 2
    assert f"{unknown}:2: unknown account id ghost" in out.stderr
    out = invoke_keyshift(env, "runs", "create", "--rules", rules, "--canary", "-1")
    assert out.returncode == 2 and "canary" in out.stderr
    out = invoke_keyshift(env, "runs", "pause", "nope")
    assert out.returncode == 3 and "no run nope" in out.stderr
    assert "Traceback" not in out.stderr
    # Nothing was created by any of them.
    listed = invoke_keyshift(env, "runs", "list")
    assert listed.returncode == 0 and listed.stdout == ""


async def test_four_eyes_refuses_the_creator(
    db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    await cohort(db, secrets, 1)
    env = {**cli_env(settings), "KEYSHIFT_RUNS_FOUR_EYES": "true"}
    made = invoke_keyshift(env, "runs", "create", "--rules", str(_rules_file(tmp_path)))
    run_id = _run_id(made.stdout)
    assert invoke_keyshift(env, "runs", "report", run_id, "--json").returncode == 0
    out = invoke_keyshift(env, "runs", "approve", run_id)
    assert out.returncode == 4
    assert "four eyes" in out.stderr
    assert (await run_row(db, run_id)).state == "reported"


async def test_worker_processes_share_a_run_and_stop_on_sigterm(
    db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    ids = await cohort(db, secrets, 6)
    env = cli_env(settings)
    made = invoke_keyshift(
        env, "runs", "create", "--rules", str(_rules_file(tmp_path)), "--batch-size", "1"
    )
    run_id = _run_id(made.stdout)
    invoke_keyshift(env, "runs", "report", run_id, "--json")
    invoke_keyshift(env, "runs", "approve", run_id)
    token = await mint_token(db, "migrations:run")
    reader = await mint_token(db, "migrations:read")
    refused = run_keyshift(env, "worker", "--until-idle", "--token", reader, timeout=60)
    assert refused.returncode == 4 and "migrations:run" in refused.stderr
    assert invoke_keyshift(env, "runs", "start", run_id).returncode == 0
    _two_workers_until_idle({**env, "KEYSHIFT_WORKER_TOKEN": token})
    assert await states(db, run_id) == {i: "migrated" for i in ids}
    assert (await run_row(db, run_id)).state == "completed"

    # SIGTERM: a worker waiting for work exits cleanly.
    err = _sigterm_an_idle_worker(env)
    assert "0 account(s) processed" in err


def _two_workers_until_idle(env: dict[str, str]) -> None:
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "keyshift.cli", "worker", "--until-idle", "--poll", "0.1"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for w in workers:
            _, err = w.communicate(timeout=120)
            assert w.returncode == 0, err
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()


def _sigterm_an_idle_worker(env: dict[str, str]) -> str:
    idle = subprocess.Popen(
        [sys.executable, "-m", "keyshift.cli", "worker", "--poll", "0.1"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert idle.stderr is not None
        assert "waiting for runs" in idle.stderr.readline()  # its signal handlers are set
        time.sleep(0.3)
        idle.send_signal(signal.SIGTERM)
        _, err = idle.communicate(timeout=30)
    finally:
        if idle.poll() is None:
            idle.kill()
    assert idle.returncode == 0, err
    return err
