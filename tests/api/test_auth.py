"""Bearer tokens over HTTP: 401 for every way a credential can be wrong, 403 for a missing
scope, and what a token may grant and revoke."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update

from keyshift.db.engine import Database
from keyshift.db.tables import ApiToken, AuditEvent
from keyshift.db.types import utcnow
from keyshift.security.tokens import hash_token
from tests.support import mint_token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_401(response: httpx.Response, fragment: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "unauthenticated"
    assert fragment in error["message"]


async def test_no_authorization_header_is_401(client: httpx.AsyncClient) -> None:
    _assert_401(await client.get("/v1/tokens"), "missing bearer token")


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "Token kst_abc", "kst_abc"],
)
async def test_wrong_scheme_or_empty_credential_is_401(
    client: httpx.AsyncClient, header: str
) -> None:
    _assert_401(await client.get("/v1/tokens", headers={"Authorization": header}), "missing")


async def test_unknown_token_is_401(client: httpx.AsyncClient, db: Database) -> None:
    await mint_token(db, "admin")
    _assert_401(await client.get("/v1/tokens", headers=_bearer("kst_" + "x" * 43)), "unknown")


async def test_malformed_token_is_401(client: httpx.AsyncClient) -> None:
    _assert_401(await client.get("/v1/tokens", headers=_bearer("not-one-of-ours")), "malformed")


async def test_revoked_token_is_401(client: httpx.AsyncClient, db: Database) -> None:
    admin = await mint_token(db, "admin")
    victim = await mint_token(db, "audit:read")
    assert (await client.get("/v1/audit/events", headers=_bearer(victim))).status_code == 200
    listed = (await client.get("/v1/tokens", headers=_bearer(admin))).json()
    victim_id = next(t["id"] for t in listed if t["scopes"] == ["audit:read"])
    revoked = await client.delete(f"/v1/tokens/{victim_id}", headers=_bearer(admin))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    _assert_401(await client.get("/v1/audit/events", headers=_bearer(victim)), "revoked")


async def test_expired_token_is_401(client: httpx.AsyncClient, db: Database) -> None:
    token = await mint_token(db, "audit:read")
    assert (await client.get("/v1/audit/events", headers=_bearer(token))).status_code == 200
    async with db.transaction() as session:
        await session.execute(
            update(ApiToken)
            .where(ApiToken.token_hash == hash_token(token))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    _assert_401(await client.get("/v1/audit/events", headers=_bearer(token)), "expired")


async def test_wrong_scope_is_403(client: httpx.AsyncClient, db: Database) -> None:
    token = await mint_token(db, "audit:read")
    response = await client.get("/v1/tokens", headers=_bearer(token))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert "tokens:write" in response.json()["error"]["message"]
    assert "www-authenticate" not in response.headers


async def test_admin_scope_implies_every_scope(client: httpx.AsyncClient, db: Database) -> None:
    admin = await mint_token(db, "admin")
    assert (await client.get("/v1/tokens", headers=_bearer(admin))).status_code == 200
    assert (await client.get("/v1/audit/events", headers=_bearer(admin))).status_code == 200
    assert (await client.get("/v1/audit/verify", headers=_bearer(admin))).status_code == 200


async def test_token_create_list_revoke_round_trip(client: httpx.AsyncClient, db: Database) -> None:
    admin = await mint_token(db, "admin")
    created = await client.post(
        "/v1/tokens",
        json={"name": "worker", "scopes": ["migrations:run"], "ttl_seconds": 900},
        headers=_bearer(admin),
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["token"].startswith("kst_")
    assert body["scopes"] == ["migrations:run"]
    assert body["expires_at"] is not None
    # Only the hash is stored; the list never shows a secret.
    async with db.transaction() as session:
        row = await session.get(ApiToken, body["id"])
        assert row is not None and row.token_hash == hash_token(body["token"])
        assert body["token"] not in str(
            [(t.token_hash, t.name) for t in (await session.execute(select(ApiToken))).scalars()]
        )
    listed = (await client.get("/v1/tokens", headers=_bearer(admin))).json()
    assert {t["id"] for t in listed} >= {body["id"]}
    assert all("token" not in t for t in listed)
    revoked = await client.delete(f"/v1/tokens/{body['id']}", headers=_bearer(admin))
    assert revoked.status_code == 200
    again = await client.delete(f"/v1/tokens/{body['id']}", headers=_bearer(admin))
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    async with db.transaction() as session:
        actions = [e.action for e in (await session.execute(select(AuditEvent))).scalars()]
    assert actions.count("token.create") == 2 and actions.count("token.revoke") == 1


async def test_revoking_an_unknown_token_is_404(client: httpx.AsyncClient, db: Database) -> None:
    admin = await mint_token(db, "admin")
    response = await client.delete("/v1/tokens/nope", headers=_bearer(admin))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "token_not_found"


async def test_a_token_cannot_grant_a_scope_it_lacks(
    client: httpx.AsyncClient, db: Database
) -> None:
    minter = await mint_token(db, "tokens:write", "audit:read")
    ok = await client.post(
        "/v1/tokens", json={"name": "reader", "scopes": ["audit:read"]}, headers=_bearer(minter)
    )
    assert ok.status_code == 201
    for scopes in (["admin"], ["audit:read", "licenses:write"]):
        denied = await client.post(
            "/v1/tokens", json={"name": "escalate", "scopes": scopes}, headers=_bearer(minter)
        )
        assert denied.status_code == 403, denied.text
        assert denied.json()["error"]["field"] == "scopes"


async def test_a_token_cannot_revoke_a_more_powerful_one(
    client: httpx.AsyncClient, db: Database
) -> None:
    admin = await mint_token(db, "admin")
    minter = await mint_token(db, "tokens:write")
    listed = (await client.get("/v1/tokens", headers=_bearer(admin))).json()
    admin_id = next(t["id"] for t in listed if t["scopes"] == ["admin"])
    denied = await client.delete(f"/v1/tokens/{admin_id}", headers=_bearer(minter))
    assert denied.status_code == 403
    assert (await client.get("/v1/tokens", headers=_bearer(admin))).status_code == 200


async def test_unknown_scope_is_422_naming_the_field(
    client: httpx.AsyncClient, db: Database
) -> None:
    admin = await mint_token(db, "admin")
    response = await client.post(
        "/v1/tokens", json={"name": "x", "scopes": ["root"]}, headers=_bearer(admin)
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "scopes"
    assert "root" in response.json()["error"]["message"]


async def test_failed_authentication_writes_no_audit_event(
    client: httpx.AsyncClient, db: Database
) -> None:
    await client.post("/v1/tokens", json={"name": "x", "scopes": ["admin"]})
    async with db.transaction() as session:
        assert (await session.execute(select(AuditEvent))).first() is None
