"""The token service: hashed at rest, expiry, revocation and the no-escalation rules."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from keyshift.context import SYSTEM, Actor
from keyshift.db.engine import Database
from keyshift.db.tables import ApiToken
from keyshift.errors import AuthenticationFailed, InvalidInput, PermissionDenied, TokenNotFound
from keyshift.security import tokens


async def test_only_the_hash_is_stored_and_it_authenticates(db: Database) -> None:
    async with db.transaction() as session:
        issued = await tokens.create_token(session, SYSTEM, name="x", scopes=["audit:read"])
    async with db.transaction() as session:
        rows = list((await session.execute(select(ApiToken))).scalars())
        assert [r.token_hash for r in rows] == [tokens.hash_token(issued.plaintext)]
        assert all(issued.plaintext not in (r.token_hash, r.name) for r in rows)
        actor = await tokens.authenticate(session, issued.plaintext, request_id="r-9")
    assert actor.id == f"token:{issued.token.id}"
    assert actor.scopes == {"audit:read"} and actor.request_id == "r-9"
    assert actor.can("audit:read") and not actor.can("tokens:write")


async def test_short_lived_token_expires(db: Database) -> None:
    async with db.transaction() as session:
        issued = await tokens.create_token(
            session, SYSTEM, name="worker", scopes=["migrations:run"], ttl=timedelta(minutes=5)
        )
    async with db.transaction() as session:
        await tokens.authenticate(session, issued.plaintext)
        row = await session.get(ApiToken, issued.token.id)
        assert row is not None and row.expires_at is not None
        row.expires_at = row.expires_at - timedelta(minutes=5, seconds=1)
    async with db.transaction() as session:
        with pytest.raises(AuthenticationFailed, match="expired"):
            await tokens.authenticate(session, issued.plaintext)


async def test_revoked_token_fails_and_revoking_is_idempotent(db: Database) -> None:
    async with db.transaction() as session:
        issued = await tokens.create_token(session, SYSTEM, name="x", scopes=["audit:read"])
    async with db.transaction() as session:
        first = (await tokens.revoke_token(session, SYSTEM, issued.token.id)).revoked_at
    async with db.transaction() as session:
        assert (await tokens.revoke_token(session, SYSTEM, issued.token.id)).revoked_at == first
        with pytest.raises(AuthenticationFailed, match="revoked"):
            await tokens.authenticate(session, issued.plaintext)
        with pytest.raises(TokenNotFound):
            await tokens.revoke_token(session, SYSTEM, "missing")


async def test_no_escalation_when_granting_or_revoking(db: Database) -> None:
    minter = Actor(id="token:m", scopes=frozenset({"tokens:write", "audit:read"}))
    async with db.transaction() as session:
        admin = await tokens.create_token(session, SYSTEM, name="root", scopes=["admin"])
        await tokens.create_token(session, minter, name="ok", scopes=["audit:read"])
        with pytest.raises(PermissionDenied):
            await tokens.create_token(session, minter, name="up", scopes=["licenses:write"])
        with pytest.raises(PermissionDenied):
            await tokens.revoke_token(session, minter, admin.token.id)
        with pytest.raises(InvalidInput):
            await tokens.create_token(session, SYSTEM, name="bad", scopes=["root"])
        with pytest.raises(InvalidInput):
            await tokens.create_token(session, SYSTEM, name="none", scopes=[])


@pytest.mark.parametrize("bad", ["", "kst_", "nope", "kst_" + "a" * 300])
async def test_malformed_or_unknown_tokens_fail(db: Database, bad: str) -> None:
    async with db.transaction() as session:
        with pytest.raises(AuthenticationFailed):
            await tokens.authenticate(session, bad)
