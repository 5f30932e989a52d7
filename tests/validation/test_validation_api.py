"""`POST /v1/licenses/validate` and `GET /v1/keys/signing` through the real app: every code of
the closed set, the signature, the nonce, bad input, and one run against a live server."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, update

from keyshift import client as sdk
from keyshift.context import SYSTEM
from keyshift.db import changes
from keyshift.db.engine import Database
from keyshift.db.tables import Activation, License, Subscription
from keyshift.db.types import utcnow
from keyshift.licensing import activations, keys, service
from keyshift.security.secrets_store import Secrets
from keyshift.validation import cache
from keyshift.validation.decide import Code
from tests import factories
from tests.support import LiveServer

VALIDATE = "/v1/licenses/validate"


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    cache.default_cache.clear()


async def _license(db: Database, secrets: Secrets, plan_ref: str = factories.SEAT_NODE):
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db, plan_ref)
    row, key = await factories.issue_license(db, secrets, account.id)
    return row, key


async def _published_keys(client: httpx.AsyncClient) -> dict[str, str]:
    response = await client.get("/v1/keys/signing")
    assert response.status_code == 200
    return sdk.public_keys_from_jwks(response.json())


async def _validate(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post(VALIDATE, json=body)
    assert response.status_code == 200, response.text
    keys_ = await _published_keys(client)
    return sdk.verify_response(
        response.content, response.headers["keyshift-signature"], keys_, nonce=body.get("nonce")
    )


async def _set(db: Database, license_id: str, **values: Any) -> None:
    async with db.transaction() as session:
        await session.execute(update(License).where(License.id == license_id).values(**values))


async def _activate(db: Database, secrets: Secrets, key: str, *fingerprints: str) -> None:
    async with db.transaction() as session:
        for fingerprint in fingerprints:
            await activations.activate(session, SYSTEM, secrets.keyring, key, fingerprint)


# -- every code through the endpoint ---------------------------------------------------------


async def test_valid(client: httpx.AsyncClient, db: Database, secrets: Secrets) -> None:
    row, key = await _license(db, secrets)
    await _activate(db, secrets, key, "m1")
    body = await _validate(client, key=key, fingerprint="m1", feature="sync", nonce="abc_123-X")
    assert body["valid"] is True and body["code"] == Code.VALID
    assert body["license"] == {
        "id": row.id,
        "status": "active",
        "expires_at": body["license"]["expires_at"],
    }
    assert body["entitlements"]["features"]["export"] == {"mode": "enabled"}
    assert body["entitlements"]["quotas"] == {"projects": 10, "storage_gb": 5}
    assert body["activation"]["activated"] is True and body["activation"]["mode"] == "node"
    assert body["activation"]["live_activations"] == 1
    assert body["activation"]["max_activations"] == 3
    assert body["feature"] == {
        "name": "sync",
        "entitled": True,
        "mode": "throttled",
        "limit": 100,
        "period": "day",
    }
    assert body["expiry"]["in_grace"] is False
    assert body["nonce"] == "abc_123-X"


async def test_not_found(client: httpx.AsyncClient, db: Database, secrets: Secrets) -> None:
    await _license(db, secrets)
    body = await _validate(client, key=keys.generate(), fingerprint="m1", feature="export")
    assert body["valid"] is False and body["code"] == Code.NOT_FOUND
    assert body["license"] is None and body["entitlements"] is None and body["feature"] is None


async def test_revoked(client: httpx.AsyncClient, db: Database, secrets: Secrets) -> None:
    row, key = await _license(db, secrets)
    async with db.transaction() as session:
        await service.revoke_license(session, SYSTEM, row.id)
    body = await _validate(client, key=key)
    assert (body["valid"], body["code"]) == (False, Code.REVOKED)


async def test_suspended(client: httpx.AsyncClient, db: Database, secrets: Secrets) -> None:
    row, key = await _license(db, secrets)
    async with db.transaction() as session:
        await service.suspend_license(session, SYSTEM, row.id)
    body = await _validate(client, key=key)
    assert (body["valid"], body["code"]) == (False, Code.SUSPENDED)
    assert body["license"]["status"] == "suspended"


async def test_expired_past_grace(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    row, key = await _license(db, secrets)  # seat-node: 7 days of grace
    await _set(db, row.id, expires_at=utcnow() - timedelta(days=8))
    body = await _validate(client, key=key)
    assert (body["valid"], body["code"]) == (False, Code.EXPIRED)
    assert body["expiry"]["in_grace"] is False


async def test_expired_within_grace_is_valid(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    row, key = await _license(db, secrets)
    await _set(db, row.id, expires_at=utcnow() - timedelta(days=1))
    body = await _validate(client, key=key)
    assert (body["valid"], body["code"]) == (True, Code.VALID)
    assert body["expiry"]["in_grace"] is True
    assert body["expiry"]["grace_until"] > body["server_time"]


async def test_no_plan(client: httpx.AsyncClient, db: Database, secrets: Secrets) -> None:
    row, key = await _license(db, secrets)
    async with db.transaction() as session:  # no service ends a plan yet; do it to the data
        await session.execute(delete(Subscription).where(Subscription.account_id == row.account_id))
    body = await _validate(client, key=key)
    assert (body["valid"], body["code"], body["entitlements"]) == (False, Code.NO_PLAN, None)


async def test_no_activation(client: httpx.AsyncClient, db: Database, secrets: Secrets) -> None:
    _, key = await _license(db, secrets)
    body = await _validate(client, key=key, fingerprint="m1")
    assert (body["valid"], body["code"]) == (False, Code.NO_ACTIVATION)
    assert body["activation"]["activated"] is False


async def test_lapsed_floating_lease_means_no_activation(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    row, key = await _license(db, secrets, factories.SEAT_FLOATING)
    await _activate(db, secrets, key, "m1")
    assert (await _validate(client, key=key, fingerprint="m1"))["code"] == Code.VALID
    async with db.transaction() as session:
        await session.execute(
            update(Activation)
            .where(Activation.license_id == row.id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    cache.default_cache.clear()
    assert (await _validate(client, key=key, fingerprint="m1"))["code"] == Code.NO_ACTIVATION


async def test_fingerprint_mismatch(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    _, key = await _license(db, secrets)
    await _activate(db, secrets, key, "m1")
    body = await _validate(client, key=key, fingerprint="m2")
    assert (body["valid"], body["code"]) == (False, Code.FINGERPRINT_MISMATCH)


async def test_too_many_activations_after_the_cap_was_lowered(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    row, key = await _license(db, secrets)
    await _activate(db, secrets, key, "m1", "m2", "m3")
    await _set(db, row.id, max_activations_override=2)
    body = await _validate(client, key=key, fingerprint="m1")
    assert (body["valid"], body["code"]) == (False, Code.TOO_MANY_ACTIVATIONS)
    assert body["activation"]["live_activations"] == 3
    assert body["activation"]["max_activations"] == 2


@pytest.mark.parametrize("feature", ["beta", "not_in_edition"])
async def test_feature_not_entitled(
    client: httpx.AsyncClient, db: Database, secrets: Secrets, feature: str
) -> None:
    _, key = await _license(db, secrets)
    body = await _validate(client, key=key, feature=feature)
    assert (body["valid"], body["code"]) == (False, Code.FEATURE_NOT_ENTITLED)
    assert body["feature"]["entitled"] is False


def test_the_tests_cover_every_code() -> None:
    covered = {
        "VALID", "NOT_FOUND", "REVOKED", "SUSPENDED", "EXPIRED", "NO_PLAN", "NO_ACTIVATION",
        "FINGERPRINT_MISMATCH", "TOO_MANY_ACTIVATIONS", "FEATURE_NOT_ENTITLED",
        "QUOTA_EXCEEDED",  # covered in tests/metering/test_api.py
    }  # fmt: skip
    assert covered == {c.value for c in Code}


# -- signature and nonce ---------------------------------------------------------------------


async def test_signature_breaks_if_any_body_byte_changes(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    _, key = await _license(db, secrets)
    response = await client.post(VALIDATE, json={"key": key, "nonce": "n1"})
    header = response.headers["keyshift-signature"]
    assert header.startswith('keyid="s1", algorithm="ed25519", signature="')
    published = await _published_keys(client)
    assert sdk.verify_response(response.content, header, published)["code"] == "VALID"
    for position in range(len(response.content)):
        tampered = bytearray(response.content)
        tampered[position] ^= 0x01
        with pytest.raises(sdk.SignatureInvalid):
            sdk.verify_response(bytes(tampered), header, published)


async def test_a_replayed_answer_fails_the_nonce_check(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    _, key = await _license(db, secrets)
    response = await client.post(VALIDATE, json={"key": key, "nonce": "first"})
    published = await _published_keys(client)
    header = response.headers["keyshift-signature"]
    assert sdk.verify_response(response.content, header, published, nonce="first")
    with pytest.raises(sdk.NonceMismatch):
        sdk.verify_response(response.content, header, published, nonce="second")


async def test_signing_keys_are_published_without_auth(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/keys/signing")
    assert response.status_code == 200
    (entry,) = response.json()["keys"]
    assert entry["kid"] == "s1" and entry["alg"] == "ed25519" and entry["active"] is True


async def test_a_foreign_key_does_not_verify(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    from keyshift.security.signing import SigningKeys

    _, key = await _license(db, secrets)
    response = await client.post(VALIDATE, json={"key": key})
    impostor = {"s1": SigningKeys.generate().public_keys()["s1"]}
    with pytest.raises(sdk.SignatureInvalid):
        sdk.verify_response(response.content, response.headers["keyshift-signature"], impostor)


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"key": "7KQ2M-9XH3D-F4TVA-PZ8NE-R1CW7"}, "key"),
        ({"key": "not a key"}, "key"),
        ({"key": "X" * 65}, "key"),
        ({}, "key"),
        ({"key": 12345}, "key"),
        ({"key": "@KEY@", "fingerprint": "f" * 10_000}, "fingerprint"),
        ({"key": "@KEY@", "fingerprint": ""}, "fingerprint"),
        ({"key": "@KEY@", "fingerprint": "bell\x07"}, "fingerprint"),
        ({"key": "@KEY@", "nonce": "has space"}, "nonce"),
        ({"key": "@KEY@", "nonce": "n" * 129}, "nonce"),
        ({"key": "@KEY@", "nonce": ""}, "nonce"),
        ({"key": "@KEY@", "feature": "Bad Feature"}, "feature"),
        ({"key": "@KEY@", "machine": "m1"}, "machine"),
    ],
)
async def test_bad_input_is_422_naming_the_field(
    client: httpx.AsyncClient, db: Database, secrets: Secrets, body: dict[str, Any], field: str
) -> None:
    _, key = await _license(db, secrets)
    if body.get("key") == "@KEY@":
        body = {**body, "key": key}
    response = await client.post(VALIDATE, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert key not in response.text


# -- the cache on the endpoint ---------------------------------------------------------------


async def test_endpoint_sees_a_suspension_once_invalidated(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    row, key = await _license(db, secrets)
    assert (await _validate(client, key=key))["code"] == Code.VALID
    async with db.transaction() as session:
        await service.suspend_license(session, SYSTEM, row.id)
        await changes.announce(session, lookup=row.key_lookup)
    assert (await _validate(client, key=key))["code"] == Code.SUSPENDED


# -- a real server process -------------------------------------------------------------------


@pytest.mark.server
async def test_live_server_signs_what_it_publishes(
    live_server: LiveServer, db: Database, secrets: Secrets
) -> None:
    _, key = await _license(db, secrets)
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=10) as http:
        published = sdk.public_keys_from_jwks((await http.get("/v1/keys/signing")).json())
        response = await http.post(
            VALIDATE, json={"key": key, "fingerprint": "m1", "nonce": "live-1"}
        )
    assert response.status_code == 200
    body = sdk.verify_response(
        response.content, response.headers["Keyshift-Signature"], published, nonce="live-1"
    )
    assert body["code"] == Code.NO_ACTIVATION
    assert published == {"s1": secrets.signing.public_jwks()[0]["public_key"]}


@pytest.mark.server
async def test_live_server_forgives_only_ascii_in_a_key(
    live_server: LiveServer, db: Database, secrets: Secrets
) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db, factories.SEAT_NODE)
    # Keys are random: issue until one holds a 1 and one an S (each ~55 % per key).
    issued = [(await factories.issue_license(db, secrets, account.id))[1] for _ in range(3)]
    while not any("1" in k for k in issued) or not any("S" in k for k in issued):
        issued.append((await factories.issue_license(db, secrets, account.id))[1])
    with_1 = next(k for k in issued if "1" in k)
    with_s = next(k for k in issued if "S" in k)
    typed_unicode = [
        with_1.replace("1", "\u0131"),  # dotless i, which str.upper() makes I
        with_s.replace("S", "\u017f"),  # long s, which str.upper() makes S
        with_1.replace("-", "\u00a0"),  # no-break spaces
        with_1.replace("-", "\u3000"),  # ideographic spaces
    ]
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=10) as http:
        forgiven = await http.post(
            VALIDATE, json={"key": " " + with_1.lower().replace("1", "l").replace("-", " ")}
        )
        refused = [await http.post(VALIDATE, json={"key": typed}) for typed in typed_unicode]
    assert forgiven.status_code == 200 and forgiven.json()["code"] == Code.VALID
    for response in refused:
        assert response.status_code == 422, response.text
        # Refused by the schema's key pattern (invalid_request) or, past it, by the key's own
        # reading (malformed_key): either way a 422 naming the key, never a lookup.
        assert response.json()["error"]["code"] in ("invalid_request", "malformed_key")
        assert response.json()["error"]["field"] == "key"
