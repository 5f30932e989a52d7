"""A notice commits with the change it announces: `keyshift migrate apply` SIGKILLed inside a
step's transaction leaves no notice of that step (nothing is sent for it), and resuming
writes it once — the receiver gets every notice exactly once."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from sqlalchemy import select

from keyshift.config import Settings
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Migration
from keyshift.migration.executor import FAULT_ENV, Executor
from keyshift.notices.kinds import NoticeKind
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers as migration
from tests.notices import helpers
from tests.notices.receiver import always, receiving
from tests.support import cli_env, run_keyshift

#: Where the process dies, and the notices committed by then.
POINTS = {
    "inside:lock": [],
    "inside:cutover": [NoticeKind.STARTED],
    "inside:receipt": [NoticeKind.STARTED],
    "after:receipt": [NoticeKind.STARTED, NoticeKind.COMPLETED],
}


@pytest.mark.parametrize("point", list(POINTS))
async def test_a_killed_step_announces_nothing_and_its_resumption_announces_once(
    point: str, db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    await migration.publish(db)
    account_id, _ = await migration.rich_account(db, secrets)
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(migration.RULES)
    args = ("migrate", "apply", "--rules", str(rules_file), "--account", account_id)

    killed = run_keyshift({**cli_env(settings), FAULT_ENV: point}, *args)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [n.kind for n in await helpers.notices(db, account_id)] == POINTS[point]
    with receiving(always()) as receiver:
        await helpers.endpoint(db, secrets, receiver.url)
        await helpers.settle(helpers.deliverer(db, secrets), db)
        assert len(receiver.accepted()) == len(POINTS[point])

        async with db.transaction() as session:
            started = list((await session.execute(select(Migration.id))).scalars())
        if started:
            await Executor(db, secrets.signing).run(SYSTEM, started[0])
        else:
            again = run_keyshift(cli_env(settings), *args)
            assert again.returncode == 0, again.stderr
        await helpers.settle(helpers.deliverer(db, secrets), db)
        ids = [r.webhook_id for r in receiver.accepted()]

    written = await helpers.notices(db, account_id)
    assert [n.kind for n in written] == [NoticeKind.STARTED, NoticeKind.COMPLETED]
    assert sorted(ids) == sorted(n.id for n in written)  # each once
