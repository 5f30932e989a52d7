"""One account's migration end to end: apply, verify, receipt, rollback by hash — on both
databases."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select

from keyshift.canonical import canonical_json
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import DataObject, MigrationStep
from keyshift.migration import repository
from keyshift.migration.errors import (
    MigrationBlocked,
    MigrationFinalized,
    NothingToRollBack,
)
from keyshift.migration.executor import Executor
from keyshift.migration.rollback import finalize, rollback
from keyshift.migration.state import state_hash
from keyshift.security.secrets_store import Secrets
from keyshift.validation import decide as policy
from keyshift.validation import service as validation
from tests.migration import helpers


@pytest.fixture
def executor(db: Database, secrets: Secrets) -> Executor:
    return Executor(db, secrets.signing)


async def test_apply_moves_the_account_and_keeps_keys_activations_and_data(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, _keys = await helpers.rich_account(db, secrets)
    before = await helpers.state_of(db, account_id)

    row = await executor.apply(SYSTEM, helpers.rules(), account_id)

    assert row.state == "completed", row.error
    after = await helpers.state_of(db, account_id)
    assert after["subscription"]["plan"] == helpers.NEW
    # The license keys did not change; the license with a cap override of 5 kept it.
    assert [lic["key_lookup"] for lic in after["licenses"]] == [
        lic["key_lookup"] for lic in before["licenses"]
    ]
    # Three machines on a license whose new cap is 2: the least recently seen one goes.
    machines = sorted(a["fingerprint"] for a in after["activations"])
    assert machines == ["machine-1", "machine-2"]
    # 5 projects, new quota 3: the 2 oldest are archived (copies in the archive tier).
    live = [o for o in after["objects"] if o["state"] == "active"]
    assert sum(1 for o in live if o["tier"] == "standard") == 3
    assert sorted(o["name"] for o in live if o["tier"] == "archive") == ["project-0", "project-1"]
    # The counter carried; the preferences and attributes survived.
    assert [c["used"] for c in after["counters"]] == [7]
    assert after["account"]["preferences"] == {"theme": "dark", "locale": "de"}
    # Every step has exactly one ledger row.
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
    assert steps == ["lock", "snapshot", "prepare", "cutover", "verify", "receipt"]


async def test_the_key_validates_under_the_new_plan_without_reactivation(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    await executor.apply(SYSTEM, helpers.rules(), account_id)

    result = await validation.validate(
        db.transaction,
        secrets.keyring,
        secrets.signing,
        key=keys[0][1],
        fingerprint="machine-2",
        feature="d",
    )
    assert result.code is policy.Code.VALID
    assert result.payload["entitlements"]["plan"] == helpers.NEW
    # The second license's hand-set feature "b" was carried, over the new edition's "disabled".
    other = await validation.validate(
        db.transaction, secrets.keyring, secrets.signing, key=keys[1][1], feature="b"
    )
    assert other.code is policy.Code.VALID
    assert other.payload["entitlements"]["addons"] == ["extra"]
    assert other.payload["entitlements"]["quotas"]["storage"] == 150


async def test_receipt_is_signed_over_the_snapshot_hash(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    row = await executor.apply(SYSTEM, helpers.rules(), account_id)

    receipt = row.receipt
    assert receipt["body"]["snapshot_hash"] == row.snapshot_hash
    assert receipt["body"]["from"] == helpers.OLD and receipt["body"]["to"] == helpers.NEW
    public = Ed25519PublicKey.from_public_bytes(secrets.signing.public_keys()[receipt["keyid"]])
    public.verify(base64.b64decode(receipt["signature"]), canonical_json(receipt["body"]))


async def test_rollback_restores_the_snapshot_hash_exactly(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    before = await helpers.state_of(db, account_id)
    row = await executor.apply(SYSTEM, helpers.rules(), account_id)
    assert state_hash(before) == row.snapshot_hash

    rolled = await rollback(executor, SYSTEM, row.id)

    assert rolled.state == "rolled_back"
    restored = await helpers.state_of(db, account_id)
    assert state_hash(restored) == row.snapshot_hash
    async with db.transaction() as session:
        ledger = (await repository.steps_done(session, row.id))["rollback"]
    assert ledger.details["exact"] is True
    assert ledger.details["restored_hash"] == row.snapshot_hash
    # Idempotent: a second rollback changes nothing and records nothing more.
    again = await rollback(executor, SYSTEM, row.id)
    assert again.state == "rolled_back"
    assert state_hash(await helpers.state_of(db, account_id)) == row.snapshot_hash


async def test_rollback_of_an_account_that_never_migrated_is_refused(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    from keyshift.migration.rollback import latest_for_account

    async with db.transaction() as session:
        with pytest.raises(NothingToRollBack):
            await latest_for_account(session, account_id)


async def test_finalize_releases_old_copies_and_ends_reversibility(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    row = await executor.apply(SYSTEM, helpers.rules(), account_id)
    async with db.transaction() as session:
        superseded = (
            (await session.execute(select(DataObject).where(DataObject.state == "superseded")))
            .scalars()
            .all()
        )
    assert len(superseded) == 2

    await finalize(executor, SYSTEM, row.id)

    async with db.transaction() as session:
        left = (await session.execute(select(DataObject.state))).scalars().all()
    assert "superseded" not in left and len(left) == 5
    with pytest.raises(MigrationFinalized):
        await rollback(executor, SYSTEM, row.id)


async def test_block_policy_refuses_and_writes_nothing(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    before = await helpers.state_of(db, account_id)
    blocking = helpers.rules(
        **{'projects = { on_conflict = "archive" }': 'projects = { on_conflict = "block" }'}
    )

    with pytest.raises(MigrationBlocked) as caught:
        await executor.apply(SYSTEM, blocking, account_id)

    assert "projects" in caught.value.message
    assert state_hash(await helpers.state_of(db, account_id)) == state_hash(before)


async def test_cached_entitlements_are_invalidated_at_cutover(
    db: Database, secrets: Secrets
) -> None:
    from keyshift.validation.cache import LicenseStateCache

    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    cache = LicenseStateCache(ttl_seconds=3600)  # long: only an invalidation can refresh it

    async def plan_seen() -> str:
        result = await validation.validate(
            db.transaction, secrets.keyring, secrets.signing, key=keys[0][1], cache=cache
        )
        return result.payload["entitlements"]["plan"]

    assert await plan_seen() == helpers.OLD
    assert await plan_seen() == helpers.OLD and cache.hits == 1

    row = await Executor(db, secrets.signing, cache=cache).apply(
        SYSTEM, helpers.rules(), account_id
    )

    assert await plan_seen() == helpers.NEW
    await rollback(Executor(db, secrets.signing, cache=cache), SYSTEM, row.id)
    assert await plan_seen() == helpers.OLD
