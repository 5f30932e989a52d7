"""Dashboard sessions: a bearer token exchanged once, at sign-in, for a session secret that
lives only in an HttpOnly cookie. The bearer token itself is never stored in the browser.

A session is a row of ``api_tokens`` (named ``dashboard session``, with the scopes of the
token that signed in, expiring after ``SESSION_TTL``) whose secret has the prefix ``kss_``
instead of ``kst_``, so it is refused as a bearer token by the API; only the dashboard takes
it. It acts with the authority of the token that signed in (``token:<id>``, as in every audit
event of the API), and ends when it is signed out, when it expires, or when that token is
revoked or expires. Its CSRF token is derived from the secret, so it is per session and known
only to the server and to pages served inside the session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit import service as audit
from keyshift.context import Actor
from keyshift.db.tables import ApiToken
from keyshift.db.types import utcnow
from keyshift.errors import AuthenticationFailed
from keyshift.security import tokens

SESSION_PREFIX = "kss_"
SESSION_NAME = "dashboard session"
SESSION_TTL = timedelta(hours=8)
_OWNER_PREFIX = "token:"


@dataclass(frozen=True)
class Session:
    """A signed-in dashboard session: who acts (the token that signed in) and the session's
    own id (the ``api_tokens`` row)."""

    id: str
    actor: Actor
    csrf: str


def csrf_of(secret: str) -> str:
    """The session's CSRF token: a keyed hash of its secret (the cookie), never the secret."""
    return hmac.new(secret.encode(), b"keyshift-dashboard-csrf", hashlib.sha256).hexdigest()


def csrf_matches(secret: str, presented: str) -> bool:
    return hmac.compare_digest(csrf_of(secret), presented)


def _live(token: ApiToken | None, what: str) -> ApiToken:
    if token is None:
        raise AuthenticationFailed(f"unknown {what}")
    if token.revoked_at is not None:
        raise AuthenticationFailed(f"the {what} has been revoked")
    if token.expires_at is not None and token.expires_at <= utcnow():
        raise AuthenticationFailed(f"the {what} has expired")
    return token


async def sign_in(
    session: AsyncSession, bearer: str, *, request_id: str | None = None
) -> tuple[str, Session]:
    """Exchange a bearer token for a new session: (the session secret, the session). The
    session expires after ``SESSION_TTL`` or with the token, whichever comes first."""
    actor = await tokens.authenticate(session, bearer, request_id=request_id)
    owner = await session.get(ApiToken, actor.id.removeprefix(_OWNER_PREFIX))
    owner = _live(owner, "token")
    expires = utcnow() + SESSION_TTL
    if owner.expires_at is not None and owner.expires_at < expires:
        expires = owner.expires_at
    secret = SESSION_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        id=str(uuid.uuid4()),
        name=SESSION_NAME,
        token_hash=tokens.hash_token(secret),
        scopes={"scopes": sorted(actor.scopes)},
        created_by=actor.id,
        expires_at=expires,
    )
    session.add(row)
    await audit.record(
        session,
        actor,
        "dashboard.sign_in",
        "token",
        row.id,
        details={"scopes": sorted(actor.scopes), "expires_at": expires.isoformat()},
    )
    return secret, Session(row.id, actor, csrf_of(secret))


async def authenticate(
    session: AsyncSession, secret: str, *, request_id: str | None = None
) -> Session:
    """The live session a cookie names, acting as the token that signed in."""
    if not secret.startswith(SESSION_PREFIX) or len(secret) > 200:
        raise AuthenticationFailed("malformed session")
    row = (
        await session.execute(
            select(ApiToken).where(ApiToken.token_hash == tokens.hash_token(secret))
        )
    ).scalar_one_or_none()
    row = _live(row, "session")
    if row.name != SESSION_NAME or not row.created_by.startswith(_OWNER_PREFIX):
        raise AuthenticationFailed("unknown session")
    owner = _live(
        await session.get(ApiToken, row.created_by.removeprefix(_OWNER_PREFIX)),
        "token this session signed in with",
    )
    scopes = frozenset(row.scopes["scopes"]) & frozenset(owner.scopes["scopes"])
    actor = Actor(id=row.created_by, scopes=scopes, request_id=request_id)
    return Session(row.id, actor, csrf_of(secret))


async def sign_out(session: AsyncSession, signed_in: Session) -> None:
    """End the session now (idempotent): its cookie opens nothing afterwards."""
    row = await session.get(ApiToken, signed_in.id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        await audit.record(session, signed_in.actor, "dashboard.sign_out", "token", row.id)
