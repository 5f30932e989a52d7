"""Keys and the license lifecycle through the service, on both databases (accounts and
subscriptions: tests/accounts/test_service.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text, update

from keyshift.audit import service as audit
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.db.tables import Activation, AuditEvent, License
from keyshift.errors import (
    AccountNotFound,
    ConfigurationError,
    Conflict,
    InvalidInput,
    LicenseNotActive,
    MalformedKey,
)
from keyshift.licensing import activations, keys, service
from keyshift.security.keyring import Sealed
from keyshift.security.secrets_store import Secrets
from tests import factories

ACTOR = Actor(id="tester", request_id="req-svc")


async def _actions(db: Database) -> list[str]:
    async with db.transaction() as session:
        return [e.action for e in await audit.list_events(session, limit=1000)]


async def _row(db: Database, license_id: str) -> License:
    async with db.transaction() as session:
        return await service.get_license(session, license_id)


async def _set_expiry(db: Database, license_id: str, when: datetime | None) -> None:
    async with db.transaction() as session:
        await session.execute(
            update(License).where(License.id == license_id).values(expires_at=when)
        )


# -- keys at rest -----------------------------------------------------------------------------


async def test_key_is_stored_encrypted_and_found_by_its_lookup_hash(
    db: Database, secrets: Secrets
) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)
    row, key = await factories.issue_license(db, secrets, account.id)
    async with db.transaction() as session:
        raw = (await session.execute(text("SELECT * FROM licenses"))).mappings().one()
        found = await service.find_by_key(session, secrets.keyring, key.lower().replace("-", " "))
    compact = key.replace("-", "")
    for value in raw.values():
        as_text = value.hex() if isinstance(value, bytes) else str(value)
        raw_bytes = bytes(value) if isinstance(value, bytes | memoryview) else as_text.encode()
        assert key not in as_text and compact not in as_text
        assert key.encode() not in raw_bytes and compact.encode() not in raw_bytes
    assert raw["key_hint"] == "…" + key[-5:]
    assert found is not None and found.id == row.id
    assert service.reveal_key(secrets.keyring, found) == key


async def test_ciphertext_moved_to_another_row_fails_to_open(
    db: Database, secrets: Secrets
) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)
    first, _ = await factories.issue_license(db, secrets, account.id)
    second, _ = await factories.issue_license(db, secrets, account.id)
    async with db.transaction() as session:
        await session.execute(
            update(License)
            .where(License.id == second.id)
            .values(key_ciphertext=first.key_ciphertext, key_kid=first.key_kid)
        )
        moved = await service.get_license(session, second.id)
        await session.refresh(moved)
    with pytest.raises(ConfigurationError, match="failed authentication"):
        secrets.keyring.open(Sealed(moved.key_kid, moved.key_ciphertext), context=moved.id.encode())


async def test_malformed_or_unknown_keys_find_nothing(db: Database, secrets: Secrets) -> None:
    async with db.transaction() as session:
        with pytest.raises(MalformedKey) as malformed:
            await service.find_by_key(session, secrets.keyring, "ABCDE-12345")
        unknown = await service.find_by_key(session, secrets.keyring, keys.generate())
    assert malformed.value.field == "key"
    assert unknown is None


async def test_reveal_is_audited(db: Database, secrets: Secrets) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)
    row, key = await factories.issue_license(db, secrets, account.id)
    async with db.transaction() as session:
        assert await service.reveal(session, ACTOR, secrets.keyring, row.id) == key
    assert (await _actions(db))[-1] == "license.reveal"


# -- issue ------------------------------------------------------------------------------------


async def test_issue_uses_the_plan_term_and_refuses_an_unsubscribed_account(
    db: Database, secrets: Secrets
) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)
    row, _ = await factories.issue_license(db, secrets, account.id)
    assert row.expires_at is not None
    assert timedelta(days=364) < row.expires_at - datetime.now(UTC) <= timedelta(days=366)
    perpetual_account = await factories.create_account(db, factories.USAGE)
    perpetual, _ = await factories.issue_license(db, secrets, perpetual_account.id)
    assert perpetual.expires_at is None
    bare = await factories.create_account(db, plan_ref=None)
    with pytest.raises(Conflict, match="subscribe"):
        await factories.issue_license(db, secrets, bare.id)
    with pytest.raises(AccountNotFound):
        await factories.issue_license(db, secrets, "no-such-account")


async def test_issue_refuses_a_past_expiry_and_a_silly_cap(db: Database, secrets: Secrets) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)
    with pytest.raises(InvalidInput) as past:
        await factories.issue_license(
            db, secrets, account.id, expires_at=datetime.now(UTC) - timedelta(days=1)
        )
    with pytest.raises(InvalidInput) as cap:
        await factories.issue_license(db, secrets, account.id, max_activations_override=0)
    assert (past.value.field, cap.value.field) == ("expires_at", "max_activations")
    async with db.transaction() as session:
        assert await service.list_licenses(session, account.id) == []


# -- lifecycle --------------------------------------------------------------------------------


async def test_suspend_reinstate_revoke_bump_version_and_audit(
    db: Database, secrets: Secrets
) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)
    row, key = await factories.issue_license(db, secrets, account.id)
    async with db.transaction() as session:
        await activations.activate(session, ACTOR, secrets.keyring, key, "machine-1")
    async with db.transaction() as session:
        suspended = await service.suspend_license(session, ACTOR, row.id, reason="unpaid")
    assert (suspended.status, suspended.version) == ("suspended", 2)
    async with db.transaction() as session:
        reinstated = await service.reinstate_license(session, ACTOR, row.id)
    assert (reinstated.status, reinstated.version) == ("active", 3)
    async with db.transaction() as session:
        revoked = await service.revoke_license(session, ACTOR, row.id, reason="fraud")
    assert (revoked.status, revoked.version) == ("revoked", 4)
    async with db.transaction() as session:
        left = (await session.execute(select(Activation))).scalars().all()
        events = await audit.list_events(session, limit=1000)
    assert left == []  # revoking released the seat
    lifecycle = [e for e in events if e.target_type == "license" and e.target_id == row.id]
    assert [e.action for e in lifecycle] == [
        "license.issue",
        "license.suspend",
        "license.reinstate",
        "license.revoke",
    ]
    assert lifecycle[1].details["reason"] == "unpaid"
    assert lifecycle[3].details["released_activations"]
    assert all(e.actor == "tester" for e in lifecycle[1:])


async def test_invalid_transitions_are_refused_with_a_reason(
    db: Database, secrets: Secrets
) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)
    row, _ = await factories.issue_license(db, secrets, account.id)
    with pytest.raises(Conflict, match="not suspended"):
        async with db.transaction() as session:
            await service.reinstate_license(session, ACTOR, row.id)
    async with db.transaction() as session:
        await service.revoke_license(session, ACTOR, row.id)
    for change in (service.reinstate_license, service.suspend_license, service.renew_license):
        with pytest.raises(LicenseNotActive, match="revoked"):
            async with db.transaction() as session:
                await change(session, ACTOR, row.id)
    with pytest.raises(Conflict, match="already revoked"):
        async with db.transaction() as session:
            await service.revoke_license(session, ACTOR, row.id)
    assert (await _row(db, row.id)).version == 2


def test_renewed_expiry_adds_the_term_to_the_later_of_now_and_expiry() -> None:
    now = datetime(2025, 3, 10, tzinfo=UTC)
    early = datetime(2025, 6, 1, tzinfo=UTC)
    lapsed = datetime(2025, 1, 1, tzinfo=UTC)
    assert service.renewed_expiry(early, "1y", now) == datetime(2026, 6, 1, tzinfo=UTC)
    assert service.renewed_expiry(lapsed, "1y", now) == datetime(2026, 3, 10, tzinfo=UTC)
    assert service.renewed_expiry(early, "30d", now) == early + timedelta(days=30)
    jan31 = datetime(2025, 1, 31, tzinfo=UTC)
    jan15 = datetime(2025, 1, 15, tzinfo=UTC)
    assert service.renewed_expiry(jan31, "1mo", jan15) == datetime(2025, 2, 28, tzinfo=UTC)
    with pytest.raises(InvalidInput):
        service.renewed_expiry(early, "perpetual", now)


async def test_renew_extends_early_and_restarts_a_lapsed_license(
    db: Database, secrets: Secrets
) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db, factories.SEAT_FLOATING)  # term 30d
    row, _ = await factories.issue_license(db, secrets, account.id)
    assert row.expires_at is not None
    async with db.transaction() as session:
        renewed = await service.renew_license(session, ACTOR, row.id)
    assert renewed.expires_at == row.expires_at + timedelta(days=30)
    await _set_expiry(db, row.id, datetime.now(UTC) - timedelta(days=100))
    async with db.transaction() as session:
        lapsed = await service.get_license(session, row.id)
        await session.refresh(lapsed)
        assert await service.license_standing(session, lapsed) == "expired"
        restarted = await service.renew_license(session, ACTOR, row.id)
    assert restarted.expires_at is not None
    assert abs(restarted.expires_at - (datetime.now(UTC) + timedelta(days=30))) < timedelta(
        minutes=1
    )
    target = datetime(2040, 1, 1, tzinfo=UTC)
    async with db.transaction() as session:
        explicit = await service.renew_license(session, ACTOR, row.id, until=target)
    assert explicit.expires_at == target and explicit.version == 4
    with pytest.raises(InvalidInput) as past:
        async with db.transaction() as session:
            await service.renew_license(
                session, ACTOR, row.id, until=datetime(2000, 1, 1, tzinfo=UTC)
            )
    assert past.value.field == "expires_at"
    assert (await _actions(db)).count("license.renew") == 3


async def test_grace_period_keeps_a_license_usable_after_expiry(
    db: Database, secrets: Secrets
) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)  # seat-node: grace 7d
    row, key = await factories.issue_license(db, secrets, account.id)
    now = datetime.now(UTC)
    await _set_expiry(db, row.id, now - timedelta(days=3))
    async with db.transaction() as session:
        in_grace = await service.get_license(session, row.id)
        await session.refresh(in_grace)
        assert await service.license_standing(session, in_grace) == "grace"
        await activations.activate(session, ACTOR, secrets.keyring, key, "m-grace")
    await _set_expiry(db, row.id, now - timedelta(days=8))
    with pytest.raises(LicenseNotActive, match="expired"):
        async with db.transaction() as session:
            await activations.activate(session, ACTOR, secrets.keyring, key, "m-late")
    row.expires_at = now - timedelta(days=8)
    assert service.standing(row, 7 * 86400, now) == "expired"
    assert service.standing(row, 9 * 86400, now) == "grace"


async def test_the_audit_chain_stays_valid_across_the_lifecycle(
    db: Database, secrets: Secrets
) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)
    row, _ = await factories.issue_license(db, secrets, account.id)
    async with db.transaction() as session:
        await service.suspend_license(session, ACTOR, row.id)
        await service.revoke_license(session, ACTOR, row.id)
    async with db.transaction() as session:
        report = await audit.verify(session)
        count = len((await session.execute(select(AuditEvent))).scalars().all())
    assert report.ok, report.problems
    assert report.checked == count
