"""No downtime (PostgreSQL): while an account migrates, validators see the complete old or the
complete new entitlements — never a mix, never an error — and every usage event accepted
meanwhile is counted. The checks themselves (``no_downtime.py``, shared with
``benchmarks/zero_downtime.py``) are tested here too: each must be able to fail."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import pytest
from sqlalchemy import update

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
from tests.migration.no_downtime import (
    AnswerLog,
    Findings,
    entitlements_digest,
    read_counter_moves,
    read_counters,
    usage_balance,
)


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
    before = await read_counters(db, [account_id])

    stop = asyncio.Event()
    seen = AnswerLog[str]()
    codes: set[str] = set()
    errors: list[BaseException] = []
    accepted: Counter[tuple[str, str]] = Counter()
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
                codes.add(result.code.value)
                seen.record(key, result.payload["entitlements"])
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
                recorded = await metering.in_transaction(db, once)
                accepted[(account_id, "exports")] += recorded.body["counted"]
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
    # Every answer is one of the two complete entitlement sets, and both were seen; every
    # accepted event counted: 7 before, carried over (the ledger's moves), plus all accepted.
    verdict = seen.verdict({key: entitlements_digest(old)}, {key: entitlements_digest(new)})
    assert before == {(account_id, "exports"): 7}
    moves = await read_counter_moves(db, [account_id])
    after = await read_counters(db, [account_id])
    findings = Findings(
        errors={f"code {code}": 1 for code in codes - {"VALID"}},
        answers=verdict,
        usage=usage_balance(before, accepted, moves, after),
    )
    assert findings.problems() == []
    assert verdict.answers > 20 and accepted[(account_id, "exports")] > 10
    assert verdict.old > 0 and verdict.new > 0 and verdict.subjects_seen_both == 1


async def _record_exports(
    db: Database, account_id: str, quantities: list[int], name: str = "checked"
) -> Counter:
    """Record one ``exports`` event per quantity, as the usage API does; the units each answer
    acknowledged as counted, per (account, meter)."""
    acknowledged: Counter[tuple[str, str]] = Counter()
    for number, quantity in enumerate(quantities):
        event = metering.UsageIn("exports", quantity, f"{name}-{number}")

        async def once(session, event=event):
            subject = await subjects.subject_for_account(session, account_id)
            return await metering.record(session, SYSTEM, subject, event)

        recorded = await metering.in_transaction(db, once)
        acknowledged[(account_id, "exports")] += recorded.body["counted"]
    return acknowledged


async def _nudge_counter(db: Database, account_id: str, by: int) -> None:
    """Move one counter row of the account by ``by`` units behind the service's back."""
    async with db.transaction() as session:
        await session.execute(
            update(UsageCounter)
            .where(UsageCounter.account_id == account_id, UsageCounter.meter == "exports")
            .values(used=UsageCounter.used + by)
        )


async def test_usage_balance_finds_a_lost_and_a_double_counted_increment(
    db: Database, secrets: Secrets
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets, exports=7)
    before = await read_counters(db, [account_id])
    acknowledged = await _record_exports(db, account_id, [1, 2, 3, 1])
    moves = await read_counter_moves(db, [account_id])
    assert moves == {}
    assert usage_balance(
        before, acknowledged, moves, await read_counters(db, [account_id])
    ).balanced

    await _nudge_counter(db, account_id, -1)  # one increment lost
    lost = usage_balance(before, acknowledged, moves, await read_counters(db, [account_id]))
    assert (lost.lost, lost.extra, lost.off) == (1, 0, {(account_id, "exports"): -1})
    # … and the verdict the benchmark exits 1 on says so.
    findings = Findings(errors={}, answers=AnswerLog[str]().verdict({}, {}), usage=lost)
    assert findings.problems() == [
        "usage counters off: 1 units lost, 0 extra, on 1 (account, meter)"
    ]

    await _nudge_counter(db, account_id, +2)  # one counted twice
    extra = usage_balance(before, acknowledged, moves, await read_counters(db, [account_id]))
    assert (extra.lost, extra.extra, extra.off) == (0, 1, {(account_id, "exports"): 1})


async def test_usage_balance_takes_the_counter_moves_of_the_ledger(
    db: Database, secrets: Secrets
) -> None:
    """A migration that triples the count: without its ledger's moves the balance is off by
    exactly what the cutover added; with them it holds, events before and after counted."""
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets, exports=7)
    before = await read_counters(db, [account_id])
    acknowledged = await _record_exports(db, account_id, [2, 3])
    rules = helpers.rules(**{'exports = "carry"': 'exports = { action = "convert", factor = 3 }'})
    row = await Executor(db, secrets.signing).apply(SYSTEM, rules, account_id)
    assert row.state == "completed", row.error
    acknowledged.update(await _record_exports(db, account_id, [4], "after"))

    moves = await read_counter_moves(db, [account_id])
    after = await read_counters(db, [account_id])
    assert moves == {(account_id, "exports"): 2 * (7 + 2 + 3)}
    assert usage_balance(before, acknowledged, moves, after).balanced
    unmoved = usage_balance(before, acknowledged, {}, after)
    assert unmoved.extra == 24 and unmoved.lost == 0


def test_answer_verdict_counts_mixed_and_stale_answers() -> None:
    old = {"plan": "old@1", "features": {"a": "enabled", "b": "enabled"}}
    new = {"plan": "new@1", "features": {"a": "enabled", "d": "enabled"}}
    mix = {"plan": "new@1", "features": {"a": "enabled", "b": "enabled"}}
    log = AnswerLog[str]()
    for answer in (old, old, mix, new, old, new):
        log.record("license-1", answer)
    log.record("license-2", old)  # not migrated: its old and new are the same
    digests = {"license-1": (entitlements_digest(old), entitlements_digest(new))}
    digests["license-2"] = (entitlements_digest(old), entitlements_digest(old))
    verdict = log.verdict(
        {s: pair[0] for s, pair in digests.items()}, {s: pair[1] for s, pair in digests.items()}
    )
    assert (verdict.answers, verdict.old, verdict.new, verdict.mixed) == (7, 3, 3, 1)
    assert verdict.back_to_old == 1 and verdict.subjects_seen_both == 1
    assert verdict.mixed_examples == (("license-1", entitlements_digest(mix)),)
    findings = Findings(errors={}, answers=verdict, usage=usage_balance({}, {}, {}, {}))
    assert findings.problems() == ["1 answers with mixed entitlements"]
