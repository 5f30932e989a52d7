"""Usage under concurrency, through separate transactions on separate connections: a block
quota is never overshot, and retried events are counted exactly once.

On PostgreSQL the writers really run at once (row locks decide); on SQLite ``BEGIN
IMMEDIATE`` serialises them, and the same invariants must hold.
"""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.db.tables import UsageEvent
from keyshift.metering.errors import QuotaExceeded
from keyshift.security.secrets_store import Secrets
from tests.metering.helpers import metered_license, record, used
from tests.support import cli_env, run_keyshift


async def _events(db: Database, meter: str) -> tuple[int, int]:
    async with db.transaction() as session:
        row = (
            await session.execute(
                select(func.count(), func.coalesce(func.sum(UsageEvent.quantity), 0)).where(
                    UsageEvent.meter == meter
                )
            )
        ).one()
    return int(row[0]), int(row[1])


async def test_block_quota_is_never_overshot_by_parallel_writers(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)  # jobs: block, 25 included

    async def one(i: int) -> bool:
        try:
            await record(db, account, "jobs", 1, f"job-{i}")
        except QuotaExceeded:
            return False
        return True

    accepted = await asyncio.gather(*(one(i) for i in range(40)))
    assert sum(accepted) == 25
    assert await used(db, account, "jobs") == 25
    assert await _events(db, "jobs") == (25, 25)


async def test_parallel_writers_with_retries_count_each_event_once(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)  # calls: allow, sum
    quantities = {f"call-{i}": random.randint(1, 9) for i in range(30)}
    # every event is sent three times (a client retrying after a timeout), all interleaved
    sends = [key for key in quantities for _ in range(3)]
    random.shuffle(sends)
    results = await asyncio.gather(*(record(db, account, "calls", quantities[k], k) for k in sends))
    firsts = [r for r in results if not r.replayed]
    assert len(firsts) == len(quantities)
    count, total = await _events(db, "calls")
    assert count == len(quantities)
    assert total == sum(quantities.values())
    assert await used(db, account, "calls") == total
    # every replay carried the first answer of its key
    first_by_id = {r.body["id"]: r.body for r in firsts}
    assert all(first_by_id[r.body["id"]] == r.body for r in results)


async def test_parallel_unique_members_are_counted_once_and_block_holds(
    db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)  # devices: unique, block, 3 included
    members = ["a", "b", "a", "c", "b", "d", "e", "a", "c", "f"]

    async def one(i: int, member: str) -> str | None:
        try:
            await record(db, account, "devices", 1, f"dev-{i}", member=member)
        except QuotaExceeded:
            return None
        return member

    accepted = await asyncio.gather(*(one(i, m) for i, m in enumerate(members)))
    assert len({m for m in accepted if m is not None}) == 3
    assert await used(db, account, "devices") == 3


async def test_concurrent_batches_sharing_keys_in_opposite_orders_count_once(
    db: Database, secrets: Secrets
) -> None:
    from keyshift.context import SYSTEM
    from keyshift.metering import service as metering
    from keyshift.metering import subjects

    account, _, _ = await metered_license(db, secrets)
    events = [metering.UsageIn("calls", 1, f"shared-{i}") for i in range(20)]

    async def batch(items: list[metering.UsageIn]) -> list[metering.Recorded]:
        async def work(session: object) -> list[metering.Recorded]:
            subject = await subjects.subject_for_account(session, account)  # type: ignore[arg-type]
            return await metering.record_batch(session, SYSTEM, subject, items)  # type: ignore[arg-type]

        return await metering.in_transaction(db, work)

    runs = [events if n % 2 else list(reversed(events)) for n in range(6)]
    results = await asyncio.gather(*(batch(items) for items in runs))
    assert sum(not r.replayed for run in results for r in run) == 20
    assert await used(db, account, "calls") == 20
    assert await _events(db, "calls") == (20, 20)


async def test_many_processes_never_overshoot_a_block_quota(
    db: Database, secrets: Secrets, settings: Settings
) -> None:
    """Real processes (`keyshift usage record`), 36 sends of 30 distinct events (6 retried)
    against 25 included: exactly 25 accepted, the counter equals the accepted events."""
    if db.dialect != "postgresql":
        pytest.skip("parallel processes contend on PostgreSQL row locks; SQLite serialises")
    account, _, _ = await metered_license(db, secrets)
    env = cli_env(settings)
    keys = [f"proc-{i}" for i in range(30)] + [f"proc-{i}" for i in range(6)]
    random.shuffle(keys)

    def send(key: str) -> tuple[str, int, str]:
        done = run_keyshift(
            env, "usage", "record", "--account", account, "--meter", "jobs",
            "--quantity", "1", "--idempotency-key", key,
        )  # fmt: skip
        return key, done.returncode, done.stderr

    with ThreadPoolExecutor(max_workers=12) as pool:
        outcomes = await asyncio.get_running_loop().run_in_executor(
            None, lambda: list(pool.map(send, keys))
        )
    unexpected = [(key, code, err[-800:]) for key, code, err in outcomes if code not in (0, 5)]
    assert not unexpected, unexpected
    refused = [err for _, code, err in outcomes if code == 5]
    assert all("allows 25 job per period" in err for err in refused)
    assert await used(db, account, "jobs") == 25
    assert await _events(db, "jobs") == (25, 25)
