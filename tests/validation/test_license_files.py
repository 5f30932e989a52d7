"""Offline license files: export on both databases, verify with the client SDK, tamper with
every byte, wrong keys, expiry, the offline allowance, and the two endpoints."""

from __future__ import annotations

import base64
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update

from keyshift import client as sdk
from keyshift.catalog import service as catalog
from keyshift.catalog.manifests import Plan
from keyshift.client import license_files as fmt
from keyshift.config import Settings
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent, License
from keyshift.db.types import utcnow
from keyshift.errors import ActivationNotFound, InvalidInput, LicenseNotActive
from keyshift.licensing import activations, keys, service
from keyshift.security.secrets_store import Secrets
from keyshift.validation.license_files import export_license_file
from tests import factories
from tests.support import cli_env, mint_token, run_keyshift

OFFLINE_PLAN = "offline@1"


async def _license(db: Database, secrets: Secrets, plan_ref: str = factories.SEAT_NODE):
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db, plan_ref)
    row, key = await factories.issue_license(db, secrets, account.id)
    return row, key


async def _export(db: Database, secrets: Secrets, license_id: str, **kw):
    async with db.transaction() as session:
        return await export_license_file(
            session, SYSTEM, secrets.keyring, secrets.signing, license_id, **kw
        )


def _public(secrets: Secrets) -> dict[str, bytes]:
    return secrets.signing.public_keys()


def _blob(text: str) -> bytes:
    lines = text.strip().splitlines()
    assert lines[0] == fmt.BEGIN and lines[-1] == fmt.END
    assert all(len(line) <= 64 for line in lines[1:-1])
    return base64.b64decode("".join(lines[1:-1]))


def _rearmor(blob: bytes) -> str:
    text = base64.b64encode(blob).decode()
    return "\n".join([fmt.BEGIN, *[text[i : i + 64] for i in range(0, len(text), 64)], fmt.END])


async def test_plain_file_round_trip(db: Database, secrets: Secrets) -> None:
    row, _ = await _license(db, secrets)
    exported = await _export(db, secrets, row.id, ttl="30d")
    payload = sdk.verify_license_file(exported.text, _public(secrets))
    assert payload["format"] == 1
    assert payload["license"]["id"] == row.id
    assert payload["license"]["account_id"] == row.account_id
    assert payload["entitlements"]["plan"] == factories.SEAT_NODE
    assert payload["grace"]["seconds"] == 7 * 86400
    expires = datetime.fromisoformat(payload["file_expires_at"])
    assert timedelta(days=29) < expires - utcnow() <= timedelta(days=30)
    assert b'"enc":"none"' in _blob(exported.text)


async def test_encrypted_file_round_trip_needs_the_key(db: Database, secrets: Secrets) -> None:
    row, key = await _license(db, secrets)
    exported = await _export(db, secrets, row.id, encrypt=True)
    blob = _blob(exported.text)
    assert b"aes-256-gcm+hkdf-sha256" in blob and b"seat-node" not in blob
    with pytest.raises(sdk.KeyRequired):
        sdk.verify_license_file(exported.text, _public(secrets))
    # The key as a user might type it opens it too.
    payload = sdk.verify_license_file(exported.text, _public(secrets), license_key=key.lower())
    assert payload["license"]["id"] == row.id


async def test_wrong_key_does_not_open_an_encrypted_file(db: Database, secrets: Secrets) -> None:
    row, _ = await _license(db, secrets)
    exported = await _export(db, secrets, row.id, encrypt=True)
    with pytest.raises(sdk.DecryptionFailed):
        sdk.verify_license_file(exported.text, _public(secrets), license_key=keys.generate())
    with pytest.raises(sdk.DecryptionFailed):
        sdk.verify_license_file(exported.text, _public(secrets), license_key="garbage")


@pytest.mark.parametrize("encrypt", [False, True])
async def test_flipping_any_byte_of_the_blob_fails(
    db: Database, secrets: Secrets, encrypt: bool
) -> None:
    row, key = await _license(db, secrets)
    exported = await _export(db, secrets, row.id, encrypt=encrypt)
    blob = _blob(exported.text)
    assert sdk.verify_license_file(_rearmor(blob), _public(secrets), license_key=key)
    for position in range(len(blob)):
        for flip in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[position] ^= flip
            with pytest.raises(sdk.LicenseFileError):
                sdk.verify_license_file(
                    _rearmor(bytes(tampered)), _public(secrets), license_key=key
                )


async def test_armor_tampering_fails_but_rewrapping_does_not(
    db: Database, secrets: Secrets
) -> None:
    row, _ = await _license(db, secrets)
    text = (await _export(db, secrets, row.id)).text
    rewrapped = text.replace("\n", "\r\n  ")
    assert sdk.verify_license_file(rewrapped, _public(secrets))
    lines = text.splitlines()
    edited = "\n".join(
        [*lines[:2], ("B" if lines[2][0] != "B" else "C") + lines[2][1:], *lines[3:]]
    )
    assert edited != text
    for broken in (text.replace("BEGIN", "BEGlN"), text[:-5], edited, ""):
        with pytest.raises(sdk.LicenseFileError):
            sdk.verify_license_file(broken, _public(secrets))


async def test_another_servers_key_does_not_verify(db: Database, secrets: Secrets) -> None:
    from keyshift.security.signing import SigningKeys

    row, _ = await _license(db, secrets)
    text = (await _export(db, secrets, row.id)).text
    with pytest.raises(sdk.SignatureInvalid):
        sdk.verify_license_file(text, SigningKeys.generate().public_keys())
    with pytest.raises(sdk.SignatureInvalid):
        sdk.verify_license_file(text, {})


async def test_an_expired_file_says_so_and_carries_its_payload(
    db: Database, secrets: Secrets
) -> None:
    row, _ = await _license(db, secrets)
    exported = await _export(db, secrets, row.id, ttl="1h")
    later = utcnow() + timedelta(hours=1, seconds=1)
    with pytest.raises(sdk.LicenseFileExpired) as caught:
        sdk.verify_license_file(exported.text, _public(secrets), now=later)
    assert caught.value.payload["license"]["id"] == row.id
    assert sdk.verify_license_file(
        exported.text, _public(secrets), now=later - timedelta(seconds=2)
    )


async def test_the_offline_allowance_and_grace_cap_the_file(db: Database, secrets: Secrets) -> None:
    await factories.publish_sample_catalog(db)
    plan = Plan.model_validate(
        {
            "plan": {"key": "offline", "version": "1", "name": "o", "edition": "sample@1"},
            "licensing": {"model": "seat", "max_activations": 1},
            "term": {"length": "1y", "grace_period": "2d", "offline_allowance": "7d"},
        }
    )
    async with db.transaction() as session:
        await catalog.publish(session, SYSTEM, [catalog.Manifest("plan", plan)])
    account = await factories.create_account(db, OFFLINE_PLAN)
    row, _ = await factories.issue_license(db, secrets, account.id)
    now = utcnow()
    exported = await _export(db, secrets, row.id, ttl="30d", now=now)
    assert exported.file_expires_at == now + timedelta(days=7)
    async with db.transaction() as session:
        await session.execute(
            update(License).where(License.id == row.id).values(expires_at=now + timedelta(days=1))
        )
    exported = await _export(db, secrets, row.id, ttl="30d", now=now)
    assert exported.file_expires_at == now + timedelta(days=3)  # expiry + 2 days of grace


async def test_only_usable_licenses_export(db: Database, secrets: Secrets) -> None:
    row, _ = await _license(db, secrets)
    async with db.transaction() as session:
        await service.suspend_license(session, SYSTEM, row.id)
    with pytest.raises(LicenseNotActive):
        await _export(db, secrets, row.id)


@pytest.mark.parametrize("ttl", ["0m", "30s", "11y", "forever", "30"])
async def test_bad_ttls_are_refused(db: Database, secrets: Secrets, ttl: str) -> None:
    row, _ = await _license(db, secrets)
    with pytest.raises(InvalidInput) as caught:
        await _export(db, secrets, row.id, ttl=ttl)
    assert caught.value.field == "ttl"


async def test_a_bound_file_names_its_machine(db: Database, secrets: Secrets) -> None:
    row, key = await _license(db, secrets)
    with pytest.raises(ActivationNotFound):
        await _export(db, secrets, row.id, fingerprint="m1")
    async with db.transaction() as session:
        await activations.activate(session, SYSTEM, secrets.keyring, key, "m1")
        await activations.activate(session, SYSTEM, secrets.keyring, key, "m2")
    payload = sdk.verify_license_file(
        (await _export(db, secrets, row.id, fingerprint="m1")).text, _public(secrets)
    )
    assert payload["fingerprint"] == "m1"
    assert [a["fingerprint"] for a in payload["activations"]] == ["m1"]


async def test_export_is_audited(db: Database, secrets: Secrets) -> None:
    row, _ = await _license(db, secrets)
    await _export(db, secrets, row.id, encrypt=True)
    async with db.transaction() as session:
        events = (
            (
                await session.execute(
                    select(AuditEvent).where(AuditEvent.action == "license.file_export")
                )
            )
            .scalars()
            .all()
        )
    assert [(e.actor, e.target_id, e.details["encrypted"]) for e in events] == [
        ("system", row.id, True)
    ]


# -- endpoints -------------------------------------------------------------------------------


async def test_admin_export_endpoint(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    row, key = await _license(db, secrets)
    writer = {"Authorization": f"Bearer {await mint_token(db, 'licenses:write')}"}
    reader = {"Authorization": f"Bearer {await mint_token(db, 'licenses:read')}"}
    url = f"/v1/licenses/{row.id}/file"
    assert (await client.post(url, json={})).status_code == 401
    assert (await client.post(url, json={}, headers=reader)).status_code == 403
    response = await client.post(url, json={"encrypt": True, "ttl": "2d"}, headers=writer)
    assert response.status_code == 200, response.text
    published = sdk.public_keys_from_jwks((await client.get("/v1/keys/signing")).json())
    payload = sdk.verify_license_file(response.json()["license_file"], published, license_key=key)
    assert payload["license"]["id"] == row.id
    assert response.json()["encrypted"] is True
    bad = await client.post(url, json={"ttl": "soon"}, headers=writer)
    assert (bad.status_code, bad.json()["error"]["field"]) == (422, "ttl")
    missing = await client.post("/v1/licenses/nope/file", json={}, headers=writer)
    assert missing.status_code == 404


async def test_client_checkout_with_the_key(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    row, key = await _license(db, secrets)
    refused = await client.post("/v1/licenses/checkout", json={"key": key, "fingerprint": "m1"})
    assert refused.status_code == 409
    assert refused.json()["error"]["details"]["validation_code"] == "NO_ACTIVATION"
    async with db.transaction() as session:
        await activations.activate(session, SYSTEM, secrets.keyring, key, "m1")
    response = await client.post(
        "/v1/licenses/checkout", json={"key": key, "fingerprint": "m1", "ttl": "1d"}
    )
    assert response.status_code == 200, response.text
    text = response.json()["license_file"]
    with pytest.raises(sdk.KeyRequired):  # checkout encrypts by default
        sdk.verify_license_file(text, _public(secrets))
    payload = sdk.verify_license_file(text, _public(secrets), license_key=key)
    assert payload["fingerprint"] == "m1"
    unknown = await client.post("/v1/licenses/checkout", json={"key": keys.generate()})
    assert unknown.status_code == 404
    async with db.transaction() as session:
        actors = (
            (
                await session.execute(
                    select(AuditEvent.actor).where(AuditEvent.action == "license.file_export")
                )
            )
            .scalars()
            .all()
        )
    assert actors == [f"license:{row.id}"]


def test_file_expiry_never_runs_past_now_plus_ttl() -> None:
    from keyshift.validation.license_files import file_expiry

    now = datetime(2026, 1, 1, tzinfo=UTC)
    asked = now + timedelta(days=30)
    assert file_expiry(now, asked, offline_seconds=0, grace_until=None) == asked
    assert file_expiry(now, asked, offline_seconds=86400, grace_until=None) == now + timedelta(
        days=1
    )
    assert file_expiry(now, asked, offline_seconds=0, grace_until=now + timedelta(hours=1)) == (
        now + timedelta(hours=1)
    )


# -- the CLI, as a real process --------------------------------------------------------------


_cli = run_keyshift


async def test_cli_validate_export_verify_and_rotate(
    db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    row, key = await _license(db, secrets)
    env = cli_env(settings)
    valid = _cli(env, "validate", key, "--nonce", "cli-1")
    assert valid.returncode == 0, valid.stderr
    assert json.loads(valid.stdout)["code"] == "VALID"
    assert "Keyshift-Signature: keyid=" in valid.stderr
    not_activated = _cli(env, "validate", key, "--fingerprint", "m1")
    assert not_activated.returncode == 1 and '"NO_ACTIVATION"' in not_activated.stdout
    mistyped = _cli(env, "validate", key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert mistyped.returncode == 2 and "[key]" in mistyped.stderr

    published = tmp_path / "signing.json"
    signing_out = _cli(env, "keys", "signing")
    assert signing_out.returncode == 0, signing_out.stderr
    published.write_text(signing_out.stdout)
    out = tmp_path / "license.lic"
    exported = _cli(env, "license-file", "export", row.id, "--out", str(out), "--encrypt")
    assert exported.returncode == 0, exported.stderr
    assert out.read_text().startswith(fmt.BEGIN)
    args = ["license-file", "verify", str(out), "--public-key-file", str(published)]
    assert _cli(env, *args).returncode == 1  # encrypted: needs the key
    opened = _cli(env, *args, "--key", key)
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["license"]["id"] == row.id
    # Change one character of the armored body (line 2, column 10) to a different one. (Not
    # `.replace("A", "B")`: base64 of ASCII JSON often holds no "A", and the edit is a no-op.)
    lines = out.read_text().splitlines()
    char = lines[2][10]
    lines[2] = lines[2][:10] + ("B" if char != "B" else "C") + lines[2][11:]
    out.write_text("\n".join(lines) + "\n")
    tampered = _cli(env, *args, "--key", key)
    assert tampered.returncode == 1 and "invalid" in tampered.stderr

    # Rotation on a copy of the secrets (the session's secrets are shared by other tests).
    copy = tmp_path / "secrets"
    shutil.copytree(settings.secrets_dir, copy)
    rotated_env = {**env, "KEYSHIFT_SECRETS_DIR": str(copy)}
    rotated = _cli(rotated_env, "keys", "rotate-signing")
    assert rotated.returncode == 0, rotated.stderr
    kids = {
        k["kid"]: k["active"]
        for k in json.loads(_cli(rotated_env, "keys", "signing").stdout)["keys"]
    }
    assert kids == {"s1": False, "s2": True}
    async with db.transaction() as session:
        actions = (
            (await session.execute(select(AuditEvent.action).order_by(AuditEvent.seq)))
            .scalars()
            .all()
        )
    assert "license.file_export" in actions and actions[-1] == "signing.rotate"
