"""Who is looking at the dashboard: the session cookie, its scopes, the CSRF check of every
form post, and the refusals (each audited, each answered with a page that says why).

Every dashboard route declares what it needs through one ``SessionCheck`` (the route table in
docs/security.md reads it, as it reads the API's ``ScopeCheck``); the sign-in form declares
``SignInForm``.
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from keyshift.api.deps import get_state, request_id
from keyshift.api.inputs import text_problem
from keyshift.api.ratelimit import RateLimited
from keyshift.audit import service as audit
from keyshift.context import Actor
from keyshift.errors import AuthenticationFailed, KeyshiftError
from keyshift.security import sessions

log = logging.getLogger("keyshift.dashboard")

SESSION_COOKIE = "keyshift_session"
SIGN_IN_COOKIE = "keyshift_sign_in"
COOKIE_PATH = "/dashboard"
#: Who a refusal is audited under when no session says who is asking.
ANONYMOUS = Actor(id="dashboard:anonymous")
#: The most fields a dashboard form has, and the longest value one takes.
MAX_FIELDS = 8
MAX_VALUE = 256


class Refused(Exception):
    """A dashboard request refused: answered with an error page of ``status``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        actor: Actor | None = None,
        end_session: bool = False,
        sign_in: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.actor = actor
        self.end_session = end_session  # the cookie names no live session: clear it
        self.sign_in = sign_in  # a plain visit with no session: send to the sign-in page


async def audit_refusal(request: Request, refusal: Refused) -> None:
    """Append a ``dashboard.refused`` event in its own transaction (the refused request wrote
    nothing else). A database that cannot take it is logged, not raised: the refusal stands."""
    state = get_state(request)
    actor = refusal.actor or ANONYMOUS
    if actor.request_id is None:
        actor = Actor(actor.id, actor.scopes, request_id(request))
    details: dict[str, Any] = {
        "method": request.method,
        "path": request.url.path[:200],
        "status": refusal.status,
        "code": refusal.code,
        "reason": refusal.message[:500],
        "address": request.client.host if request.client else None,
    }
    if refusal.field:
        details["field"] = refusal.field
    try:
        async with state.db.transaction() as session:
            await audit.record(
                session, actor, "dashboard.refused", "dashboard", request.url.path[:200],
                details=details,
            )  # fmt: skip
    except KeyshiftError:
        log.exception("could not audit a dashboard refusal", extra=details)


async def form_of(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    """The posted form (``application/x-www-form-urlencoded``): each field once, only the
    ``allowed`` ones, each plain text of at most ``MAX_VALUE`` characters."""
    cached = getattr(request.state, "dashboard_form", None)
    if cached is not None:
        return dict(cached)
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
        pairs = urllib.parse.parse_qsl(
            text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=MAX_FIELDS
        )
    except (UnicodeDecodeError, ValueError) as error:
        raise Refused(
            422, "invalid_form", f"the form could not be read: {error}", field="body"
        ) from error
    form: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise Refused(422, "invalid_form", f"{name[:40]}: unknown field", field=name[:40])
        if name in form:
            raise Refused(422, "invalid_form", f"{name}: given more than once", field=name)
        problem = text_problem(value)
        if problem is not None:
            raise Refused(422, "invalid_form", f"{name}: {problem[1]}", field=name)
        if len(value) > MAX_VALUE:
            raise Refused(
                422, "invalid_form", f"{name}: longer than {MAX_VALUE} characters", field=name
            )
        form[name] = value
    request.state.dashboard_form = form
    return dict(form)


def same_origin(request: Request) -> bool:
    """A browser's ``Origin`` (sent with every form post) names this server; no ``Origin`` at
    all passes (the CSRF token still has to match)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    parsed = urllib.parse.urlsplit(origin)
    return parsed.netloc == host and parsed.scheme in ("http", "https")


@dataclass(frozen=True)
class SessionCheck:
    """A dependency: a live dashboard session holding one of ``scopes`` (any session when
    empty); on a form post, the session's CSRF token in the form and a same-origin ``Origin``.
    Returns the session."""

    scopes: tuple[str, ...] = ()
    #: The fields a form posted to the route may have.
    fields: frozenset[str] = frozenset({"csrf"})

    async def __call__(self, request: Request) -> sessions.Session:
        secret = request.cookies.get(SESSION_COOKIE)
        if not secret:
            raise Refused(401, "unauthenticated", "sign in to use the dashboard", sign_in=True)
        state = get_state(request)
        try:
            async with state.db.transaction() as session:
                signed_in = await sessions.authenticate(
                    session, secret, request_id=request_id(request)
                )
        except AuthenticationFailed as error:
            raise Refused(
                401, "unauthenticated", f"{error.message}: sign in again", end_session=True
            ) from error
        actor = signed_in.actor
        if state.token_bucket is not None:
            wait = state.token_bucket.take(actor.id)
            if wait:
                raise RateLimited(wait, "token")
        if request.method == "POST":
            await _check_form_post(request, signed_in, self.fields)
        if self.scopes and not any(actor.can(scope) for scope in self.scopes):
            wanted = " or ".join(repr(scope) for scope in self.scopes)
            raise Refused(403, "forbidden", f"this session lacks the {wanted} scope", actor=actor)
        request.state.dashboard_session = signed_in
        return signed_in


async def _check_form_post(
    request: Request, signed_in: sessions.Session, allowed: frozenset[str]
) -> None:
    actor = signed_in.actor
    if not same_origin(request):
        raise Refused(
            403, "csrf", "the form was posted from another site", field="origin", actor=actor
        )
    try:
        form = await form_of(request, allowed)
    except Refused as refused:
        refused.actor = actor
        raise
    presented = form.get("csrf", "")
    if not presented or not sessions.csrf_matches(_secret(request), presented):
        raise Refused(
            403,
            "csrf",
            "the form's CSRF token is missing or not this session's: reload the page and try again",
            field="csrf",
            actor=actor,
        )


def _secret(request: Request) -> str:
    return request.cookies.get(SESSION_COOKIE, "")


@dataclass(frozen=True)
class SignInForm:
    """Declares that a route takes a bearer token in its form, once, to open a session (the
    route checks it). Does nothing at request time: it is here for the route table."""

    async def __call__(self) -> None:
        return None
