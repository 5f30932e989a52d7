"""API tokens: bearer secrets with scopes, stored as SHA-256, expiring and revocable."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift import dates
from keyshift.audit import service as audit
from keyshift.context import SCOPES, Actor
from keyshift.db.tables import ApiToken
from keyshift.db.types import utcnow
from keyshift.errors import AuthenticationFailed, InvalidInput, PermissionDenied, TokenNotFound

__all__ = ["ApiToken", "IssuedToken", "authenticate", "create_token", "list_tokens", "revoke_token"]

TOKEN_PREFIX = "kst_"


def hash_token(plaintext: str) -> str:
    # Tokens carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(plaintext.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    plaintext: str


def _check_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - SCOPES)
    if unknown:
        raise InvalidInput(f"unknown scope(s): {', '.join(unknown)}", field="scopes")
    if not scopes:
        raise InvalidInput("a token needs at least one scope", field="scopes")
    return sorted(set(scopes))


async def create_token(
    session: AsyncSession,
    actor: Actor,
    *,
    name: str,
    scopes: list[str],
    ttl: timedelta | None = None,
) -> IssuedToken:
    """Mint a token. An actor may only grant scopes it holds itself."""
    wanted = _check_scopes(scopes)
    if not all(actor.can(s) for s in wanted):
        raise PermissionDenied("cannot grant a scope you do not hold", field="scopes")
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        id=str(uuid.uuid4()),
        name=name,
        token_hash=hash_token(plaintext),
        scopes={"scopes": wanted},
        created_by=actor.id,
        expires_at=(utcnow() + ttl) if ttl else None,
    )
    session.add(token)
    await audit.record(
        session,
        actor,
        "token.create",
        "token",
        token.id,
        details={"name": name, "scopes": wanted, "expires_at": dates.rfc3339(token.expires_at)},
    )
    return IssuedToken(token, plaintext)


async def authenticate(
    session: AsyncSession, plaintext: str, *, request_id: str | None = None
) -> Actor:
    if not plaintext.startswith(TOKEN_PREFIX) or len(plaintext) > 200:
        raise AuthenticationFailed("malformed bearer token")
    token = (
        await session.execute(select(ApiToken).where(ApiToken.token_hash == hash_token(plaintext)))
    ).scalar_one_or_none()
    if token is None:
        raise AuthenticationFailed("unknown bearer token")
    if token.revoked_at is not None:
        raise AuthenticationFailed("token has been revoked")
    if token.expires_at is not None and token.expires_at <= utcnow():
        raise AuthenticationFailed("token has expired")
    return Actor(
        id=f"token:{token.id}", scopes=frozenset(token.scopes["scopes"]), request_id=request_id
    )


async def revoke_token(session: AsyncSession, actor: Actor, token_id: str) -> ApiToken:
    """Revoke a token (idempotent). Like granting, an actor may only revoke a token whose
    scopes it holds itself, so a ``tokens:write`` token cannot lock out the admins."""
    token = await session.get(ApiToken, token_id)
    if token is None:
        raise TokenNotFound(f"no token {token_id}", field="token_id")
    if not all(actor.can(s) for s in token.scopes["scopes"]):
        raise PermissionDenied(
            "cannot revoke a token with scopes you do not hold", field="token_id"
        )
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        await audit.record(session, actor, "token.revoke", "token", token.id)
    return token


async def list_tokens(session: AsyncSession) -> list[ApiToken]:
    return list((await session.execute(select(ApiToken).order_by(ApiToken.created_at))).scalars())
