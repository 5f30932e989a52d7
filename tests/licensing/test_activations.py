"""Activations: seat caps, node-locked idempotence, floating leases, and the cap under
concurrent clients on PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from keyshift.accounts import service as accounts
from keyshift.audit import service as audit
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.db.tables import Activation
from keyshift.errors import (
    ActivationLimitReached,
    ActivationNotFound,
    InvalidInput,
    LicenseNotActive,
    LicenseNotFound,
)
from keyshift.licensing import activations, keys, service
from keyshift.security.secrets_store import Secrets
from tests import factories

ACTOR = Actor(id="tester")


async def _activate(db: Database, secrets: Secrets, key: str, fingerprint: str):  # type: ignore[no-untyped-def]
    async with db.transaction() as session:
        return await activations.activate(session, ACTOR, secrets.keyring, key, fingerprint)


async def _seats(db: Database, license_id: str) -> int:
    async with db.transaction() as session:
        query = (
            select(func.count()).select_from(Activation).where(Activation.license_id == license_id)
        )
        return int((await session.execute(query)).scalar_one())


async def _licensed(db: Database, secrets: Secrets, plan: str, **kw: object) -> tuple[str, str]:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db, plan)
    row, key = await factories.issue_license(db, secrets, account.id, **kw)
    return row.id, key


async def test_node_locked_cap_is_enforced(db: Database, secrets: Secrets) -> None:
    license_id, key = await _licensed(db, secrets, factories.SEAT_NODE)  # cap 3
    for n in range(3):
        outcome = await _activate(db, secrets, key, f"machine-{n}")
        assert outcome.created and outcome.activation.mode == "node"
        assert outcome.activation.lease_expires_at is None
    with pytest.raises(ActivationLimitReached) as full:
        await _activate(db, secrets, key, "machine-3")
    assert full.value.details["max_activations"] == 3
    assert await _seats(db, license_id) == 3


async def test_reactivating_the_same_fingerprint_takes_no_extra_seat(
    db: Database, secrets: Secrets
) -> None:
    license_id, key = await _licensed(db, secrets, factories.SEAT_NODE)
    first = await _activate(db, secrets, key, "machine-a")
    again = await _activate(db, secrets, key, "machine-a")
    assert first.created and not again.created
    assert again.activation.id == first.activation.id
    assert await _seats(db, license_id) == 1
    async with db.transaction() as session:
        created = [e for e in await audit.list_events(session) if e.action == "activation.create"]
    assert len(created) == 1


async def test_license_override_replaces_the_plan_cap(db: Database, secrets: Secrets) -> None:
    _, key = await _licensed(db, secrets, factories.SEAT_NODE, max_activations_override=1)
    await _activate(db, secrets, key, "one")
    with pytest.raises(ActivationLimitReached):
        await _activate(db, secrets, key, "two")


async def test_usage_plans_without_a_cap_are_uncapped(db: Database, secrets: Secrets) -> None:
    license_id, key = await _licensed(db, secrets, factories.USAGE)
    for n in range(12):
        await _activate(db, secrets, key, f"m{n}")
    assert await _seats(db, license_id) == 12


async def test_deactivate_frees_the_seat(db: Database, secrets: Secrets) -> None:
    license_id, key = await _licensed(db, secrets, factories.SEAT_NODE, max_activations_override=1)
    first = await _activate(db, secrets, key, "old-laptop")
    async with db.transaction() as session:
        await activations.deactivate(session, ACTOR, secrets.keyring, key, "old-laptop")
    second = await _activate(db, secrets, key, "new-laptop")
    async with db.transaction() as session:
        await activations.deactivate_by_id(session, ACTOR, second.activation.id)
        with pytest.raises(ActivationNotFound):
            await activations.deactivate_by_id(session, ACTOR, first.activation.id)
        with pytest.raises(ActivationNotFound):
            await activations.deactivate(session, ACTOR, secrets.keyring, key, "never-seen")
        actions = [e.action for e in await audit.list_events(session, limit=1000)]
    assert await _seats(db, license_id) == 0
    assert actions.count("activation.delete") == 2


async def test_floating_lease_expiry_frees_the_seat(db: Database, secrets: Secrets) -> None:
    license_id, key = await _licensed(db, secrets, factories.SEAT_FLOATING)  # 2 leases of 1h
    a = await _activate(db, secrets, key, "desk-a")
    await _activate(db, secrets, key, "desk-b")
    lease = a.activation.lease_expires_at
    assert a.activation.mode == "floating" and lease is not None
    assert timedelta(minutes=59) < lease - datetime.now(UTC) <= timedelta(hours=1)
    with pytest.raises(ActivationLimitReached):
        await _activate(db, secrets, key, "desk-c")
    async with db.transaction() as session:
        await session.execute(
            update(Activation)
            .where(Activation.id == a.activation.id)
            .values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    c = await _activate(db, secrets, key, "desk-c")
    assert c.created
    async with db.transaction() as session:
        rows = await activations.list_activations(session, license_id)
        actions = [e.action for e in await audit.list_events(session, limit=1000)]
    assert sorted(r.fingerprint for r in rows) == ["desk-b", "desk-c"]  # desk-a reclaimed
    assert "activation.reclaim" in actions


async def test_heartbeat_extends_a_lease(db: Database, secrets: Secrets) -> None:
    _, key = await _licensed(db, secrets, factories.SEAT_FLOATING)
    first = await _activate(db, secrets, key, "desk")
    soon = datetime.now(UTC) + timedelta(minutes=5)
    async with db.transaction() as session:
        await session.execute(
            update(Activation)
            .where(Activation.id == first.activation.id)
            .values(lease_expires_at=soon)
        )
    async with db.transaction() as session:
        beat = await activations.heartbeat(session, ACTOR, secrets.keyring, key, "desk")
    assert beat.id == first.activation.id
    assert beat.lease_expires_at is not None
    assert beat.lease_expires_at > soon + timedelta(minutes=50)
    with pytest.raises(ActivationNotFound):
        async with db.transaction() as session:
            await activations.heartbeat(session, ACTOR, secrets.keyring, key, "stranger")


async def test_heartbeat_on_a_lapsed_lease_needs_a_free_seat(
    db: Database, secrets: Secrets
) -> None:
    _, key = await _licensed(db, secrets, factories.SEAT_FLOATING)
    a = await _activate(db, secrets, key, "desk-a")
    await _activate(db, secrets, key, "desk-b")
    past = datetime.now(UTC) - timedelta(minutes=1)
    async with db.transaction() as session:
        await session.execute(
            update(Activation).where(Activation.id == a.activation.id).values(lease_expires_at=past)
        )
    await _activate(db, secrets, key, "desk-c")  # takes desk-a's lapsed seat
    with pytest.raises(ActivationNotFound):
        async with db.transaction() as session:
            await activations.heartbeat(session, ACTOR, secrets.keyring, key, "desk-a")


async def _change_plan(db: Database, license_id: str, plan: str) -> None:
    """Move the license's account to ``plan`` (its machines stay as they were activated)."""
    async with db.transaction() as session:
        row = await service.get_license(session, license_id)
        await accounts.subscribe(session, ACTOR, row.account_id, plan)


async def _lease_ends(db: Database, activation_id: str, at: datetime) -> None:
    async with db.transaction() as session:
        await session.execute(
            update(Activation).where(Activation.id == activation_id).values(lease_expires_at=at)
        )


@pytest.mark.parametrize("lapsed", [False, True], ids=["live_lease", "lapsed_lease"])
async def test_reactivating_on_a_node_locked_plan_gives_a_node_seat_not_a_leaseless_float(
    db: Database, secrets: Secrets, lapsed: bool
) -> None:
    license_id, key = await _licensed(db, secrets, factories.SEAT_FLOATING)
    first = await _activate(db, secrets, key, "desk")
    if lapsed:
        await _lease_ends(db, first.activation.id, datetime.now(UTC) - timedelta(minutes=1))
    await _change_plan(db, license_id, factories.SEAT_NODE)

    again = await _activate(db, secrets, key, "desk")

    assert again.activation.id == first.activation.id
    assert (again.activation.mode, again.activation.lease_expires_at) == ("node", None)


async def test_reactivating_on_a_floating_plan_gives_a_lease(
    db: Database, secrets: Secrets
) -> None:
    license_id, key = await _licensed(db, secrets, factories.SEAT_NODE)
    first = await _activate(db, secrets, key, "desk")
    await _change_plan(db, license_id, factories.SEAT_FLOATING)

    again = await _activate(db, secrets, key, "desk")

    assert again.activation.id == first.activation.id and again.activation.mode == "floating"
    lease = again.activation.lease_expires_at
    assert lease is not None
    assert timedelta(minutes=59) < lease - datetime.now(UTC) <= timedelta(hours=1)


async def test_a_heartbeat_after_a_plan_change_takes_the_plans_mode(
    db: Database, secrets: Secrets
) -> None:
    license_id, key = await _licensed(db, secrets, factories.SEAT_FLOATING)
    first = await _activate(db, secrets, key, "desk")
    await _lease_ends(db, first.activation.id, datetime.now(UTC) + timedelta(minutes=5))
    await _change_plan(db, license_id, factories.SEAT_NODE)
    async with db.transaction() as session:
        beat = await activations.heartbeat(session, ACTOR, secrets.keyring, key, "desk")
    # Not a floating lease left to run out on a plan whose heartbeats no longer extend it.
    assert (beat.id, beat.mode, beat.lease_expires_at) == (first.activation.id, "node", None)

    await _change_plan(db, license_id, factories.SEAT_FLOATING)
    async with db.transaction() as session:
        beat = await activations.heartbeat(session, ACTOR, secrets.keyring, key, "desk")
    assert beat.mode == "floating" and beat.lease_expires_at is not None
    assert beat.lease_expires_at > datetime.now(UTC) + timedelta(minutes=59)


async def test_suspended_or_expired_licenses_cannot_activate(
    db: Database, secrets: Secrets
) -> None:
    license_id, key = await _licensed(db, secrets, factories.SEAT_NODE)
    async with db.transaction() as session:
        await service.suspend_license(session, ACTOR, license_id)
    with pytest.raises(LicenseNotActive, match="suspended"):
        await _activate(db, secrets, key, "m")
    with pytest.raises(LicenseNotFound):
        await _activate(db, secrets, keys.generate(), "m")
    assert await _seats(db, license_id) == 0


@pytest.mark.parametrize(
    "fingerprint", ["", "x" * 256, "x" * 10_000, "tab\there", "new\nline", "nul\x00"]
)
async def test_absurd_fingerprints_are_refused(
    db: Database, secrets: Secrets, fingerprint: str
) -> None:
    license_id, key = await _licensed(db, secrets, factories.SEAT_NODE)
    with pytest.raises(InvalidInput) as refused:
        await _activate(db, secrets, key, fingerprint)
    assert refused.value.field == "fingerprint"
    assert await _seats(db, license_id) == 0


async def test_a_255_character_fingerprint_is_fine(db: Database, secrets: Secrets) -> None:
    _, key = await _licensed(db, secrets, factories.SEAT_NODE)
    assert (await _activate(db, secrets, key, "f" * 255)).created


async def test_parallel_activations_never_exceed_the_cap(db: Database, secrets: Secrets) -> None:
    """20 clients on their own connections race for 5 seats: exactly 5 win."""
    if db.dialect != "postgresql":
        pytest.skip("row-lock concurrency is a PostgreSQL property (SQLite serialises writers)")
    license_id, key = await _licensed(db, secrets, factories.SEAT_NODE, max_activations_override=5)
    start = asyncio.Event()

    async def client(n: int) -> str:
        async with db.transaction() as session:
            await start.wait()
            try:
                await activations.activate(session, ACTOR, secrets.keyring, key, f"m-{n}")
            except ActivationLimitReached:
                return "full"
        return "ok"

    tasks = [asyncio.create_task(client(n)) for n in range(20)]
    await asyncio.sleep(0.2)  # let every client open its transaction first
    start.set()
    outcomes = await asyncio.gather(*tasks)
    assert outcomes.count("ok") == 5
    assert outcomes.count("full") == 15
    assert await _seats(db, license_id) == 5
    async with db.transaction() as session:
        report = await audit.verify(session)
    assert report.ok, report.problems


async def test_parallel_activations_on_sqlite_also_hold_the_cap(
    db: Database, secrets: Secrets
) -> None:
    license_id, key = await _licensed(db, secrets, factories.SEAT_NODE, max_activations_override=2)

    async def client(n: int) -> str:
        try:
            await _activate(db, secrets, key, f"m-{n}")
        except ActivationLimitReached:
            return "full"
        return "ok"

    outcomes = await asyncio.gather(*(client(n) for n in range(6)))
    assert outcomes.count("ok") == 2
    assert await _seats(db, license_id) == 2
