"""Keyring rotation: every stored key moves to the new data key and still decrypts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from keyshift.audit import service as audit
from keyshift.catalog import service as catalog
from keyshift.config import Settings
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import License
from keyshift.licensing import service as licensing
from keyshift.security.keyring import Keyring
from keyshift.security.rotation import reencrypt_licenses
from keyshift.security.secrets_store import Secrets, load_secrets
from tests.factories import create_account, publish_sample_catalog
from tests.support import cli_env, invoke_keyshift


async def test_rotation_reencrypts_every_license_and_keys_still_open(db: Database) -> None:
    old = Keyring.generate()
    await publish_sample_catalog(db)
    account = await create_account(db)
    issued = []
    async with db.transaction() as session:
        for _ in range(7):
            issued.append(
                await licensing.issue_license(session, SYSTEM, old, account_id=account.id)
            )
    new = old.rotated()
    assert new.active != old.active

    report = await reencrypt_licenses(db, new, SYSTEM, batch_size=3)

    assert report.reencrypted == 7
    assert report.remaining == 0
    async with db.transaction() as session:
        rows = {r.id: r for r in (await session.execute(select(License))).scalars()}
        for item in issued:
            row = rows[item.license.id]
            assert row.key_kid == new.active
            assert licensing.reveal_key(new, row) == item.key
            # Lookup does not depend on the data key: the same presented key still finds it.
            assert (await licensing.find_by_key(session, new, item.key)).id == row.id
    # The old keyring cannot open the re-encrypted rows: they really moved.
    with pytest.raises(Exception):  # noqa: B017 - ConfigurationError for an unknown kid
        licensing.reveal_key(old, rows[issued[0].license.id])
    # A second run has nothing to do.
    again = await reencrypt_licenses(db, new, SYSTEM)
    assert again.reencrypted == 0


async def test_catalog_is_untouched_by_rotation(db: Database) -> None:
    await publish_sample_catalog(db)
    async with db.transaction() as session:
        before = [e.content_hash for e in await catalog.repository.list_entries(session)]
    await reencrypt_licenses(db, Keyring.generate(), SYSTEM)
    async with db.transaction() as session:
        after = [e.content_hash for e in await catalog.repository.list_entries(session)]
    assert before == after


_cli = invoke_keyshift  # in-process; tests/validation/test_license_files.py runs `keys` for real


async def test_rotate_then_reencrypt_from_the_command_line(
    db: Database, settings: Settings, secrets: Secrets, tmp_path: Path
) -> None:
    """`keys rotate-keyring` adds an active data key; `keys reencrypt` moves stored keys."""
    secrets_dir = tmp_path / "secrets"
    shutil.copytree(settings.secrets_dir, secrets_dir)
    env = {**cli_env(settings), "KEYSHIFT_SECRETS_DIR": str(secrets_dir)}
    before = load_secrets(secrets_dir).keyring
    await publish_sample_catalog(db)
    account = await create_account(db)
    async with db.transaction() as session:
        issued = await licensing.issue_license(session, SYSTEM, before, account_id=account.id)

    rotated = _cli(env, "keys", "rotate-keyring")
    assert rotated.returncode == 0, rotated.stderr
    after = load_secrets(secrets_dir).keyring
    assert after.active != before.active and before.active in after.keys
    assert after.lookup_key == before.lookup_key

    moved = _cli(env, "keys", "reencrypt", "--batch-size", "10")
    assert moved.returncode == 0, moved.stderr
    assert "re-encrypted 1 license key(s); 0 left" in moved.stdout
    async with db.transaction() as session:
        row = await session.get(License, issued.license.id)
        assert row is not None and row.key_kid == after.active
        assert licensing.reveal_key(after, row) == issued.key
        actions = [e.action for e in await audit.list_events(session)]
    assert "keyring.rotate" in actions and "keyring.reencrypt" in actions
