"""Request-scoped dependencies: the app state, a transaction, and the authenticated actor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.api.ratelimit import RateLimited
from keyshift.api.retry import RetryRequest
from keyshift.api.state import AppState
from keyshift.context import Actor
from keyshift.errors import AuthenticationFailed, DatabaseBusy, KeyshiftError, PermissionDenied
from keyshift.migration.executor import Executor
from keyshift.security import tokens
from keyshift.validation import service as validation

# Dependencies that never block are ``async def``: FastAPI runs a plain ``def`` dependency in a
# worker thread, which on the validation hot path cost two thread hand-offs per request.


def get_state(request: Request) -> AppState:
    return get_state_of(request.app)


def get_state_of(app: Any) -> AppState:
    state: AppState = app.state.keyshift
    return state


async def state_dependency(request: Request) -> AppState:
    return get_state(request)


def request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def request_id_dependency(request: Request) -> str | None:
    return request_id(request)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One transaction per request: committed if the route returns, rolled back if it raises.
    When the database rolls it back to break a deadlock, the request is run again whole
    (``api.retry``): nothing of it was kept."""
    try:
        async with get_state(request).db.transaction() as session:
            yield session
    except DatabaseBusy as busy:
        if busy.attempts > 1:  # a unit of work that retried itself already: answer it
            raise
        raise RetryRequest(busy) from busy


# scope="function": the transaction commits before the response is sent. With the default
# (request) scope FastAPI would send a 201 carrying a new license key and only then commit:
# a failed commit would leave the client holding a key that was never stored.
Session = Annotated[AsyncSession, Depends(get_session, scope="function")]
State = Annotated[AppState, Depends(state_dependency)]


@dataclass(frozen=True)
class ScopeCheck:
    """A dependency that authenticates the bearer token and checks it holds one of ``scopes``
    (a read that a narrower read scope or the broader write scope may do).

    Every token-authenticated route declares its scope through one of these, so the route →
    scope table (``keyshift.api.access``, docs/security.md) is read from the routes themselves.
    """

    scopes: tuple[str, ...]

    async def __call__(self, request: Request) -> Actor:
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise AuthenticationFailed("missing bearer token")
        # Authentication uses its own short transaction so a failed auth writes nothing.
        state = get_state(request)
        async with state.db.transaction() as session:
            actor = await tokens.authenticate(
                session, credential.strip(), request_id=request_id(request)
            )
        if state.token_bucket is not None:
            wait = state.token_bucket.take(actor.id)
            if wait:
                raise RateLimited(wait, "token")
        if not any(actor.can(scope) for scope in self.scopes):
            wanted = " or ".join(repr(scope) for scope in self.scopes)
            raise PermissionDenied(f"this token lacks the {wanted} scope")
        return actor


def require(scope: str) -> ScopeCheck:
    """A dependency that authenticates the bearer token and checks ``scope``."""
    return ScopeCheck((scope,))


def require_any(*scopes: str) -> ScopeCheck:
    """A dependency that authenticates the bearer token and checks it holds one of ``scopes``."""
    return ScopeCheck(scopes)


@dataclass(frozen=True)
class TokenInsteadOfKey:
    """Declares that a client route (authenticated by the license key in its body) also takes
    a bearer token passing ``check`` in the key's place; the route calls ``check`` itself when
    the body names no key. Does nothing at request time: it is here so the route → scope table
    shows the second way in."""

    check: ScopeCheck

    async def __call__(self) -> None:
        return None


async def get_executor(request: Request) -> Executor:
    return get_state(request).executor


#: The migration engine, bound to the app's database, signing keys and validation cache.
Migrations = Annotated[Executor, Depends(get_executor)]


async def client_rate_limit(request: Request) -> None:
    """Per-address limit on the key-authenticated endpoints (off unless configured)."""
    bucket = get_state(request).client_bucket
    if bucket is None:
        return
    address = request.client.host if request.client else "unknown"
    wait = bucket.take(address)
    if wait:
        raise RateLimited(wait)


ClientLimited = [Depends(client_rate_limit)]


def limit_key(state: AppState, key: str | None) -> None:
    """Per-license-key limit on the key-authenticated endpoints (off unless configured). A
    key that cannot be one is left to the route, which refuses it with a 422."""
    bucket = state.key_bucket
    if bucket is None or key is None:
        return
    try:
        lookup = validation.lookup_of(state.secrets.keyring, key)
    except KeyshiftError:
        return
    wait = bucket.take(lookup)
    if wait:
        raise RateLimited(wait, "key")
