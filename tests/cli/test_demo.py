"""`keyshift demo`, the README's main job, as a real process on both databases (and its
refusal outside the repository in-process, see ``invoke_keyshift``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.security.secrets_store import Secrets
from tests.support import cli_env, invoke_keyshift, run_keyshift

REPO = Path(__file__).resolve().parents[2]


def _demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_keyshift(env, "demo", cwd=REPO, timeout=180)


async def test_demo_runs_end_to_end_and_again(
    db: Database, settings: Settings, secrets: Secrets
) -> None:
    first = _demo(cli_env(settings))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "UNEXPECTED" not in first.stdout
    assert "published" in first.stdout and "chain intact" in first.stdout
    assert first.stdout.rstrip().splitlines()[-2] == "== done"
    # A second run republishes nothing and still passes.
    second = _demo(cli_env(settings))
    assert second.returncode == 0, second.stderr[-3000:]
    assert " published " not in second.stdout and "unchanged" in second.stdout


def test_demo_outside_the_repository_says_what_to_do(tmp_path: Path, settings: Settings) -> None:
    result = invoke_keyshift(cli_env(settings), "demo", cwd=tmp_path)
    assert result.returncode == 2
    assert "examples/catalog is not a directory" in result.stderr
    assert "Traceback" not in result.stderr
