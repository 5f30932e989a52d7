"""Offline license files issued under the old plan are superseded by a migration: the next
check-in says so and hands over a new file; a current file is left alone."""

from __future__ import annotations

import httpx

from keyshift import client as sdk
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.migration.executor import Executor
from keyshift.migration.rollback import rollback
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers


async def _checkout(client: httpx.AsyncClient, key: str) -> str:
    response = await client.post(
        "/v1/licenses/checkout", json={"key": key, "fingerprint": "machine-2"}
    )
    assert response.status_code == 200, response.text
    return response.json()["license_file"]


async def _check_in(client: httpx.AsyncClient, key: str, text: str) -> httpx.Response:
    return await client.post(
        "/v1/licenses/check-in",
        json={"key": key, "license_file": text, "fingerprint": "machine-2"},
    )


async def test_a_migration_supersedes_old_files_and_check_in_replaces_them(
    db: Database, secrets: Secrets, client: httpx.AsyncClient
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    key = keys[0][1]
    old_file = await _checkout(client, key)
    current = await _check_in(client, key, old_file)
    assert current.status_code == 200 and current.json()["superseded"] is False
    assert current.json()["license_file"] is None

    row = await Executor(db, secrets.signing).apply(SYSTEM, helpers.rules(), account_id)
    answer = await _check_in(client, key, old_file)

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["superseded"] is True
    assert "old-seat@1 → new-seat@1" in body["reason"]
    public = sdk.public_keys_from_jwks(secrets.signing.public_jwks())
    payload = sdk.verify_license_file(body["license_file"], public, license_key=key)
    assert payload["entitlements"]["plan"] == helpers.NEW
    assert payload["revision"] == body["current_revision"]
    # The new file is current; after a rollback it is superseded in its turn.
    again = await _check_in(client, key, body["license_file"])
    assert again.json()["superseded"] is False
    await rollback(Executor(db, secrets.signing), SYSTEM, row.id)
    after = await _check_in(client, key, body["license_file"])
    assert after.json()["superseded"] is True


async def test_check_in_refuses_a_tampered_or_foreign_file(
    db: Database, secrets: Secrets, client: httpx.AsyncClient
) -> None:
    await helpers.publish(db)
    _, keys = await helpers.rich_account(db, secrets)
    text = await _checkout(client, keys[0][1])
    lines = text.splitlines()
    lines[2] = ("B" if lines[2][0] != "B" else "C") + lines[2][1:]

    tampered = await _check_in(client, keys[0][1], "\n".join(lines))
    foreign = await _check_in(client, keys[1][1], text)
    unknown = await _check_in(client, "AAAAA-AAAAA-AAAAA-AAAAA-AAAAA", text)
    empty = await client.post("/v1/licenses/check-in", json={"key": keys[0][1]})

    assert tampered.status_code == 422, tampered.text
    assert tampered.json()["error"]["field"] == "license_file", tampered.text
    assert foreign.status_code == 422 and foreign.json()["error"]["field"] == "license_file"
    assert unknown.status_code in (404, 422)
    assert empty.status_code == 422 and "license_file" in empty.text
