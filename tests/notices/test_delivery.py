"""Notices written by a migration's steps reach a real receiver on loopback as signed
Standard Webhooks: each exactly once even when the receiver fails the first two deliveries;
a receiver that times out, answers 500 or redirects gets retries, then the notice is on the
dead-letter list, audited, and a replay sends it again. On both databases."""

from __future__ import annotations

import asyncio
import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import REGISTRY
from sqlalchemy import select

from keyshift.audit import service as audit
from keyshift.canonical import canonical_json
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent, Migration
from keyshift.db.types import utcnow
from keyshift.migration.executor import Executor
from keyshift.migration.rollback import rollback
from keyshift.notices import outbox, service
from keyshift.notices.delivery import Policy
from keyshift.notices.errors import NotReplayable
from keyshift.notices.kinds import NoticeKind, NoticeState
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers as migration
from tests.notices import helpers
from tests.notices.receiver import Answer, always, fail_first, receiving


def _deliveries(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value("keyshift_webhook_deliveries_total", {"outcome": outcome}) or 0.0
    )


async def _migrated(db: Database, secrets: Secrets) -> tuple[str, Migration]:
    await migration.publish(db)
    account_id, _ = await migration.rich_account(db, secrets)
    row = await Executor(db, secrets.signing).apply(SYSTEM, migration.rules(), account_id)
    return account_id, row


async def test_each_notice_arrives_once_signed_though_the_first_two_deliveries_fail(
    db: Database, secrets: Secrets
) -> None:
    account_id, row = await _migrated(db, secrets)
    await rollback(Executor(db, secrets.signing), SYSTEM, row.id, reason="customer asked")
    written = await helpers.notices(db, account_id)
    assert [n.kind for n in written] == [
        NoticeKind.STARTED,
        NoticeKind.COMPLETED,
        NoticeKind.ROLLED_BACK,
    ]
    delivered_before, failed_before = _deliveries("delivered"), _deliveries("failed")

    with receiving(fail_first(2)) as receiver:
        secret = await helpers.endpoint(db, secrets, receiver.url)
        await helpers.settle(helpers.deliverer(db, secrets), db)
        bodies = receiver.verified(secret)  # raises unless every signature verifies
        accepted = receiver.accepted()

    assert sorted(r.webhook_id for r in accepted) == sorted(n.id for n in written)
    assert len(receiver.to("/hook")) == 3 * len(written)  # two failures and one success each
    assert [b["type"] for b in sorted(bodies, key=lambda b: b["data"]["kind"])] == [
        "migration.completed",
        "migration.rolled_back",
        "migration.started",
    ]
    by_kind = {b["data"]["kind"]: b["data"] for b in bodies}
    completed = by_kind["completed"]
    # The signed receipt rides along, exactly as the migration holds it, and verifies.
    migrated = (await Executor(db, secrets.signing).get(row.id)).receipt
    assert completed["receipt"] == migrated
    public = Ed25519PublicKey.from_public_bytes(
        secrets.signing.public_keys()[completed["receipt"]["keyid"]]
    )
    public.verify(  # raises InvalidSignature if the receipt was not signed as sent
        base64.b64decode(completed["receipt"]["signature"]),
        canonical_json(completed["receipt"]["body"]),
    )
    assert completed["account_name"] == "Migrating Co"
    assert "old-seat@1" in completed["message"] and "new-seat@1" in completed["message"]
    assert by_kind["rolled_back"]["reason"] == "customer asked"
    settled = await helpers.notices(db, account_id)
    assert {(n.state, n.attempts, n.last_status) for n in settled} == {
        (NoticeState.DELIVERED, 3, 204)
    }
    assert _deliveries("delivered") - delivered_before == len(written)
    assert _deliveries("failed") - failed_before == 2 * len(written)


async def test_a_transaction_that_rolls_back_leaves_nothing_to_send(
    db: Database, secrets: Secrets
) -> None:
    await migration.publish(db)
    account_id, _ = await migration.rich_account(db, secrets)
    now = utcnow()
    with pytest.raises(RuntimeError):
        async with db.transaction() as session:
            await outbox.write(
                session,
                [outbox.notice(NoticeKind.STARTED, account_id, now=now, about="m-1", payload={})],
            )
            raise RuntimeError("the change failed after its notice was written")
    with receiving(always()) as receiver:
        await helpers.endpoint(db, secrets, receiver.url)
        report = await helpers.deliverer(db, secrets).deliver_due()
    assert report.claimed == 0 and receiver.received == []
    assert await helpers.notices(db) == []


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (Answer(wait=2.0), "timed out after 0.3s"),
        (Answer(500), "answered 500"),
        (Answer(302, location="/elsewhere"), "redirects are not followed"),
    ],
    ids=["timeout", "500", "redirect"],
)
async def test_a_failing_endpoint_gets_retries_then_the_dead_letter_list_then_a_replay(
    db: Database, secrets: Secrets, answer: Answer, reason: str
) -> None:
    account_id, _ = await _migrated(db, secrets)
    policy = Policy(timeout=0.3, max_attempts=3, backoff=0.02, backoff_max=0.05)
    dead_before = _deliveries("dead")
    with receiving(lambda _id, _n: answer) as receiver:
        await helpers.endpoint(db, secrets, receiver.url)
        await helpers.settle(helpers.deliverer(db, secrets, policy), db)
        attempts = len(receiver.to("/hook"))
        redirected = len(receiver.to("/elsewhere"))
    written = await helpers.notices(db, account_id)
    assert {(n.state, n.attempts) for n in written} == {(NoticeState.DEAD, 3)}
    assert attempts == 3 * len(written) and redirected == 0  # never followed
    assert all(reason in (n.last_error or "") for n in written)
    assert _deliveries("dead") - dead_before == len(written)
    async with db.transaction() as session:
        dead = await service.dead_letters(session)
        events = await audit.list_events(session, account_id=account_id, limit=1000)
    assert {n.id for n in dead} == {n.id for n in written}
    assert sorted(e.target_id for e in events if e.action == "notice.dead") == sorted(
        n.id for n in written
    )

    # The endpoint is fixed; a replay sends the dead notice again, with the same id.
    replayed = await service.replay(db, SYSTEM, written[0].id)
    assert replayed.state == NoticeState.PENDING
    with receiving(always()) as fixed:
        await helpers.endpoint(db, secrets, fixed.url)
        await helpers.settle(helpers.deliverer(db, secrets, policy), db)
    assert [r.webhook_id for r in fixed.accepted()] == [written[0].id]
    await service.replay(db, SYSTEM, written[1].id)
    with pytest.raises(NotReplayable):  # pending again: nothing to replay
        await service.replay(db, SYSTEM, written[1].id)
    async with db.transaction() as session:
        actions = [
            e.action
            for e in (await session.execute(select(AuditEvent).order_by(AuditEvent.seq))).scalars()
        ]
    assert "notice.replay" in actions and "notice.replay.refused" in actions


async def test_two_deliverers_at_once_send_each_notice_once(db: Database, secrets: Secrets) -> None:
    await migration.publish(db)
    now = utcnow()
    async with db.transaction() as session:
        await outbox.write(
            session,
            [
                outbox.notice(NoticeKind.STARTED, f"acct-{i}", now=now, about=f"m-{i}", payload={})
                for i in range(40)
            ],
        )
    with receiving(always()) as receiver:
        await helpers.endpoint(db, secrets, receiver.url)
        one, two = helpers.deliverer(db, secrets), helpers.deliverer(db, secrets)
        await asyncio.gather(*(d.deliver_due(limit=10) for d in (one, two, one, two, one, two)))
        await helpers.settle(one, db)
        ids = [r.webhook_id for r in receiver.accepted()]
    assert len(ids) == 40 and len(set(ids)) == 40


async def test_without_an_endpoint_nothing_is_claimed(db: Database, secrets: Secrets) -> None:
    await _migrated(db, secrets)
    report = await helpers.deliverer(db, secrets).deliver_due()
    assert report.no_endpoint and report.claimed == 0
    assert {n.state for n in await helpers.notices(db)} == {NoticeState.PENDING}
