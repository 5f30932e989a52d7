"""No downtime (PostgreSQL): while an account migrates, validators see the complete old or the
complete new entitlements — never a mix, never an error — and every usage event accepted
meanwhile is counted."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from sqlalchemy import select

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import UsageCounter
from keyshift.metering import service as metering
from keyshift.metering import subjects
from keyshift.migration.executor import Executor
from keyshift.security.secrets_store import Secrets
from keyshift.validation import decide as policy
from keyshift.validation import service as validation
from tests.migration import helpers


async def _entitlements(db: Database, secrets: Secrets, key: str) -> dict:
    result = await validation.validate(
        db.transaction, secrets.keyring, secrets.signing, key=key, fingerprint="machine-2"
    )
    assert result.code is policy.Code.VALID
    return result.payload["entitlements"]


async def test_validators_and_usage_writers_run_through_a_migration(
    db: Database, secrets: Secrets
) -> None:
    if db.dialect != "postgresql":
        pytest.skip("concurrent sessions on one account are a PostgreSQL property")
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets, exports=7)
    key = keys[0][1]
    old = await _entitlements(db, secrets, key)

    stop = asyncio.Event()
    seen: list[dict] = []
    errors: list[BaseException] = []
    accepted: list[int] = []
    counter = itertools.count()

    async def validator() -> None:
        while not stop.is_set():
            try:
                result = await validation.validate(
                    db.transaction,
                    secrets.keyring,
                    secrets.signing,
                    key=key,
                    fingerprint="machine-2",
                    feature="a",
                )
                seen.append({"code": result.code.value, "ent": result.payload["entitlements"]})
            except Exception as exc:  # every failure is a finding, not a crash of the test
                errors.append(exc)
            await asyncio.sleep(0)

    async def writer() -> None:
        while not stop.is_set():
            number = next(counter)
            event = metering.UsageIn("exports", 1 + number % 3, f"event-{number}")

            async def once(session, event=event):
                subject = await subjects.subject_for_account(session, account_id)
                return await metering.record(session, SYSTEM, subject, event)

            try:
                await metering.in_transaction(db, once)
                accepted.append(event.quantity)
            except Exception as exc:
                errors.append(exc)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(validator()) for _ in range(4)]
    tasks += [asyncio.create_task(writer()) for _ in range(3)]
    await asyncio.sleep(0.3)
    row = await Executor(db, secrets.signing).apply(SYSTEM, helpers.rules(), account_id)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*tasks)

    assert row.state == "completed", row.error
    new = await _entitlements(db, secrets, key)
    assert old["plan"] == helpers.OLD and new["plan"] == helpers.NEW
    assert errors == []
    assert len(seen) > 20 and len(accepted) > 10
    assert {s["code"] for s in seen} == {"VALID"}
    # Every answer is one of the two complete entitlement sets, and both were seen.
    assert all(s["ent"] == old or s["ent"] == new for s in seen)
    assert any(s["ent"] == old for s in seen) and any(s["ent"] == new for s in seen)
    # Every accepted event counted: 7 before, carried over, plus all accepted.
    async with db.transaction() as session:
        used = (
            (
                await session.execute(
                    select(UsageCounter.used).where(
                        UsageCounter.account_id == account_id, UsageCounter.meter == "exports"
                    )
                )
            )
            .scalars()
            .all()
        )
    assert sum(used) == 7 + sum(accepted)
