"""Crash safety: `keyshift migrate apply` is SIGKILLed at every step boundary and inside every
step's transaction in turn; resuming then gives exactly the state of an uninterrupted run
(the plan's expected state, by hash) with one ledger row per step."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from sqlalchemy import select

from keyshift.config import Settings
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Migration, MigrationStep
from keyshift.db.types import utcnow
from keyshift.migration import repository
from keyshift.migration.executor import FAULT_ENV, Executor
from keyshift.migration.planner import STEPS
from keyshift.migration.state import differences, state_hash
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers
from tests.support import cli_env, run_keyshift

POINTS = [f"{when}:{step}" for step in STEPS for when in ("before", "inside", "after")]


async def _migrations(db: Database, account_id: str) -> list[Migration]:
    async with db.transaction() as session:
        rows = await session.execute(select(Migration).where(Migration.account_id == account_id))
        return list(rows.scalars())


@pytest.mark.parametrize("point", POINTS)
async def test_a_killed_migration_resumes_to_the_uninterrupted_state(
    point: str, db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(helpers.RULES)
    env = {**cli_env(settings), FAULT_ENV: point}
    args = ("migrate", "apply", "--rules", str(rules_file), "--account", account_id)

    killed = run_keyshift(env, *args)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    started = await _migrations(db, account_id)
    if not started:
        # Killed before the lock step committed: nothing happened; applying again starts it.
        assert point in ("before:lock", "inside:lock")
        again = run_keyshift(cli_env(settings), *args)
        assert again.returncode == 0, again.stderr
        started = await _migrations(db, account_id)
    else:
        await Executor(db, secrets.signing).run(SYSTEM, started[0].id)

    [row] = await _migrations(db, account_id)
    assert row.state == "completed", row.error
    async with db.transaction() as session:
        steps = (
            (
                await session.execute(
                    select(MigrationStep.step)
                    .where(MigrationStep.migration_id == row.id)
                    .order_by(MigrationStep.seq)
                )
            )
            .scalars()
            .all()
        )
        actual = await repository.read_state(session, account_id, utcnow())
    assert list(steps) == list(STEPS)
    assert actual is not None and row.plan is not None
    expected = row.plan["expected"]
    assert differences(expected, actual) == []
    assert state_hash(actual) == state_hash(expected)
