"""A notice commits with the change it announces: `keyshift migrate apply` SIGKILLed inside a
step's transaction leaves no notice of that step (nothing is sent for it), and resuming
writes it once — the receiver gets every notice exactly once."""

from __future__ import annotations

import asyncio
import signal
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from keyshift.config import Settings
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Migration
from keyshift.db.types import utcnow
from keyshift.migration.executor import FAULT_ENV, Executor
from keyshift.notices import outbox
from keyshift.notices.delivery import Deliverer, Policy
from keyshift.notices.kinds import NoticeKind, NoticeState
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers as migration
from tests.notices import helpers
from tests.notices.receiver import Answer, always, receiving
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


async def test_a_deliverer_killed_mid_send_holds_the_notice_until_its_lease_ends(
    db: Database, secrets: Secrets, settings: Settings
) -> None:
    """SIGKILL while the receiver is still answering: the notice stays claimed (no second
    deliverer sends it meanwhile), and after the lease it is sent again with the same
    webhook id — at least once, and a receiver can tell the repeat."""
    async with db.transaction() as session:
        await outbox.write(
            session,
            [outbox.notice(NoticeKind.STARTED, "acct-1", now=utcnow(), about="m-1", payload={})],
        )

    def slow_first(_id: str, n: int) -> Answer:
        return Answer(204, wait=3.0) if n == 1 else Answer(204)

    with receiving(slow_first) as receiver:
        await helpers.endpoint(db, secrets, receiver.url)
        env = {**cli_env(settings), "KEYSHIFT_WEBHOOK_TIMEOUT": "5"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "keyshift.cli", "notices", "deliver", "--limit", "1",
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(300):  # 30 s at most for the process to start and send
            if receiver.to("/hook"):
                break
            await asyncio.sleep(0.1)
        process.kill()
        await process.wait()
        assert len(receiver.to("/hook")) == 1

        [claimed] = await helpers.notices(db)
        assert (claimed.state, claimed.attempts) == (NoticeState.PENDING, 0)
        assert claimed.lease_until is not None
        policy = Policy(timeout=5)
        assert (await Deliverer(db, secrets.keyring, policy).deliver_due()).claimed == 0
        after = claimed.lease_until + timedelta(seconds=1)
        resumed = Deliverer(db, secrets.keyring, policy, clock=lambda: after)
        assert (await resumed.deliver_due()).delivered == 1
        ids = [r.webhook_id for r in receiver.to("/hook")]
    assert ids == [claimed.id, claimed.id]
    [done] = await helpers.notices(db)
    assert (done.state, done.attempts) == (NoticeState.DELIVERED, 1)
