"""The dashboard's routes: sign in and out, the runs, one run live, one account's ledger, the
run actions (each behind a confirmation page), the licensing overview. Server-rendered HTML
(Jinja2); the one script (``static/dashboard.js``) only follows a run's server-sent events.

Every page and form goes through ``SessionCheck`` with the scope the matching API route asks
for; a refused request gets an error page and a ``dashboard.refused`` audit event.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from keyshift import dates
from keyshift.api.dashboard import views
from keyshift.api.dashboard.auth import (
    COOKIE_PATH,
    SESSION_COOKIE,
    SIGN_IN_COOKIE,
    Refused,
    SessionCheck,
    SignInForm,
    audit_refusal,
    form_of,
    same_origin,
)
from keyshift.api.deps import State, client_rate_limit, request_id
from keyshift.api.errors import status_for
from keyshift.errors import AuthenticationFailed, KeyshiftError
from keyshift.runs import service
from keyshift.runs.model import TRANSITIONS, RunState
from keyshift.security import sessions

router = APIRouter(prefix="/dashboard", include_in_schema=False)

READ = ("migrations:read", "migrations:run")
LICENSING = ("licenses:read",)
Reader = Annotated[sessions.Session, Depends(SessionCheck(READ))]
Anyone = Annotated[sessions.Session, Depends(SessionCheck())]
LicensingReader = Annotated[sessions.Session, Depends(SessionCheck(LICENSING))]

Action = Literal["approve", "start", "pause", "resume", "abort", "rollback"]
#: Each action: the scope it needs (as its API route), what the button says, what it does.
ACTIONS: dict[str, tuple[str, str, str]] = {
    "approve": (
        "migrations:approve",
        "Approve",
        "Approve the run as it was reported; it is pinned to its rules and catalog hashes.",
    ),
    "start": ("migrations:run", "Start", "Workers start migrating the run's accounts."),
    "pause": (
        "migrations:run",
        "Pause",
        "Workers start nothing new; the accounts they hold now finish.",
    ),
    "resume": ("migrations:run", "Resume", "Workers take the run's accounts again."),
    "abort": (
        "migrations:run",
        "Abort",
        "Stop for good and release the accounts; those already moved stay moved.",
    ),
    "rollback": (
        "migrations:run",
        "Roll back",
        "Roll the whole run back, newest first, each account to its snapshot.",
    ),
}
DONE = {
    "approve": "Run approved.",
    "start": "Run started.",
    "pause": "Run paused.",
    "resume": "Run resumed.",
    "abort": "Run aborted.",
    "rollback": "Rollback started.",
}
#: How often a run page's events refresh, and the longest one event stream lasts: the
#: browser reconnects by itself after, and a server shutting down (which lets responses in
#: flight finish) waits for no stream longer than this.
EVENT_SECONDS = 1.0
STREAM_SECONDS = 30.0
#: A run in one of these states moves no more by itself: its stream ends.
STILL = frozenset({RunState.COMPLETED, RunState.FINALIZED, RunState.ABORTED, RunState.ROLLED_BACK})
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: under it Chromium sends `Origin: null` with our own form posts.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

templates = Environment(
    loader=PackageLoader("keyshift.api.dashboard", "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters["when"] = lambda value: dates.rfc3339(value) or ""


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {rest} s"


templates.filters["duration"] = _duration


def _static(name: str) -> bytes:
    return resources.files("keyshift.api.dashboard").joinpath("static", name).read_bytes()


def render(
    request: Request,
    template: str,
    status: int = 200,
    *,
    signed_in: sessions.Session | None = None,
    **context: Any,
) -> HTMLResponse:
    signed_in = signed_in or getattr(request.state, "dashboard_session", None)
    page = templates.get_template(template).render(
        session=signed_in,
        can=(lambda scope: signed_in is not None and signed_in.actor.can(scope)),
        **context,
    )
    return HTMLResponse(page, status_code=status, headers=SECURITY_HEADERS)


def _set_cookie(response: Response, request: Request, name: str, value: str, age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def _clear_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(
        name,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


async def refused_page(request: Request, refusal: Refused) -> Response:
    """The answer to a refused request: audited, then a page saying why (a plain visit with
    no session goes to the sign-in page instead)."""
    if refusal.sign_in and request.method == "GET":
        return RedirectResponse("/dashboard/sign-in", status_code=303, headers=SECURITY_HEADERS)
    await audit_refusal(request, refusal)
    response = render(request, "error.html", refusal.status, refusal=refusal)
    if refusal.end_session:
        _clear_cookie(response, request, SESSION_COOKIE)
    return response


def install(app: FastAPI) -> None:
    """Serve the dashboard from ``app``: its routes and the page for a refused request."""

    async def _refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return await refused_page(request, exc)

    app.add_exception_handler(Refused, _refused)
    app.include_router(router)


# -- public: static files and the sign-in form -----------------------------------------------


@router.get("/static/dashboard.js")
async def script() -> Response:
    return Response(_static("dashboard.js"), media_type="text/javascript")


@router.get("/static/dashboard.css")
async def stylesheet() -> Response:
    return Response(_static("dashboard.css"), media_type="text/css")


@router.get("/sign-in")
async def sign_in_page(request: Request) -> Response:
    """The sign-in form. A one-time value in a cookie and in the form (double submit) keeps
    another site from signing a browser in under its own token."""
    nonce = secrets.token_urlsafe(32)
    response = render(request, "sign_in.html", nonce=nonce, error=None)
    _set_cookie(response, request, SIGN_IN_COOKIE, nonce, 3600)
    return response


# The per-address limit of the key-authenticated routes (off unless configured) also bounds
# how fast one address can fill the audit log with refused sign-ins.
@router.post("/sign-in", dependencies=[Depends(SignInForm()), Depends(client_rate_limit)])
async def sign_in(request: Request, state: State) -> Response:
    """Exchange the bearer token in the form for a session cookie (HttpOnly, SameSite=Strict);
    the token is not kept in the browser."""
    form = await form_of(request, frozenset({"token", "csrf"}))
    expected = request.cookies.get(SIGN_IN_COOKIE, "")
    presented = form.get("csrf", "")
    if not same_origin(request) or not expected or not secrets.compare_digest(expected, presented):
        raise Refused(
            403,
            "csrf",
            "the sign-in form is stale or was posted from another site: load it again",
            field="csrf",
        )
    token = form.get("token", "").strip()
    if not token:
        raise Refused(422, "invalid_form", "token: paste an API token to sign in", field="token")
    try:
        async with state.db.transaction() as session:
            secret, _ = await sessions.sign_in(session, token, request_id=request_id(request))
    except AuthenticationFailed as error:
        refusal = Refused(401, "unauthenticated", f"{error.message}", field="token")
        await audit_refusal(request, refusal)
        nonce = secrets.token_urlsafe(32)
        page = render(request, "sign_in.html", 401, nonce=nonce, error=refusal.message)
        _set_cookie(page, request, SIGN_IN_COOKIE, nonce, 3600)
        return page
    response = RedirectResponse("/dashboard", status_code=303, headers=SECURITY_HEADERS)
    age = int(sessions.SESSION_TTL.total_seconds())
    _set_cookie(response, request, SESSION_COOKIE, secret, age)
    _clear_cookie(response, request, SIGN_IN_COOKIE)
    return response


# -- any session -------------------------------------------------------------------------------


@router.get("")
async def home(signed_in: Anyone) -> Response:
    """The runs if the session may read them, else the licensing overview."""
    actor = signed_in.actor
    target = "/dashboard/runs" if any(actor.can(s) for s in READ) else "/dashboard/licensing"
    if not any(actor.can(s) for s in (*READ, *LICENSING)):
        target = "/dashboard/nothing"
    return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)


@router.get("/nothing")
async def nothing(request: Request, signed_in: Anyone) -> Response:
    """A session whose scopes open no dashboard page."""
    return render(request, "nothing.html", signed_in=signed_in)


@router.post("/sign-out")
async def sign_out(request: Request, state: State, signed_in: Anyone) -> Response:
    async with state.db.transaction() as session:
        await sessions.sign_out(session, signed_in)
    response = RedirectResponse("/dashboard/sign-in", status_code=303, headers=SECURITY_HEADERS)
    _clear_cookie(response, request, SESSION_COOKIE)
    return response


# -- runs --------------------------------------------------------------------------------------


@router.get("/runs")
async def runs_page(request: Request, state: State, _session: Reader) -> Response:
    now = state.executor.clock()
    async with state.db.transaction() as session:
        rows = await service.list_runs(session, limit=50)
        listed = [(run, await service.progress(session, run, now)) for run in rows]
    return render(request, "runs.html", runs=listed)


def _available(run_state: str, signed_in: sessions.Session) -> list[tuple[str, str]]:
    """The actions this session may take on a run in ``run_state``: (action, label)."""
    return [
        (action, label)
        for action, (scope, label, _) in ACTIONS.items()
        if run_state in TRANSITIONS[action] and signed_in.actor.can(scope)
    ]


@router.get("/runs/{run_id}")
async def run_page(
    request: Request,
    run_id: str,
    state: State,
    signed_in: Reader,
    done: Action | None = None,
) -> Response:
    async with state.db.transaction() as session:
        page = await _or_page(views.run_page(session, run_id[:64], state.executor.clock()))
    return render(
        request,
        "run.html",
        page=page,
        actions=_available(page.run.state, signed_in),
        done=DONE.get(done or ""),
        csrf=signed_in.csrf,
    )


async def _or_page(awaitable: Any) -> Any:
    try:
        return await awaitable
    except KeyshiftError as error:
        raise Refused(status_for(error), error.code, error.message, field=error.field) from error


def _event(name: str, html: str) -> bytes:
    data = "\n".join(f"data: {line}" for line in html.splitlines() or [""])
    return f"event: {name}\n{data}\n\n".encode()


@router.get("/runs/{run_id}/events")
async def run_events(request: Request, run_id: str, state: State, _session: Reader) -> Response:
    """Server-sent events: the run's live progress as HTML, every ``EVENT_SECONDS``; an
    ``end`` event once the run has come to rest (completed, finalized, aborted, rolled back)."""
    async with state.db.transaction() as session:
        await _or_page(service.get(session, run_id[:64]))
    fragment = templates.get_template("_progress.html")

    async def stream() -> AsyncIterator[bytes]:
        deadline = time.monotonic() + STREAM_SECONDS
        yield b"retry: 2000\n\n"
        while time.monotonic() < deadline and not await request.is_disconnected():
            async with state.db.transaction() as session:
                page = await views.live_progress(session, run_id, state.executor.clock())
            yield _event("progress", fragment.render(page=page))
            if page.run.state in STILL:
                yield _event("end", page.run.state)
                return
            await asyncio.sleep(EVENT_SECONDS)

    headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


@router.get("/runs/{run_id}/accounts/{account_id}")
async def account_page(
    request: Request, run_id: str, account_id: str, state: State, _session: Reader
) -> Response:
    """One account of a run: its ledger steps, snapshot hash and receipt."""
    async with state.db.transaction() as session:
        page = await _or_page(
            views.account_page(
                session, run_id[:64], account_id[:64], state.secrets.signing.public_keys()
            )
        )
    return render(request, "account.html", page=page)


def _confirm_route(action: str) -> Callable[..., Any]:
    scope, label, meaning = ACTIONS[action]
    # A default, not an Annotated alias: annotations are strings resolved in the module's
    # globals, where a local alias is not found (the parameter would become a query field).
    check = Depends(SessionCheck((scope,)))

    async def confirm(
        request: Request, run_id: str, state: State, signed_in: sessions.Session = check
    ) -> Response:
        async with state.db.transaction() as session:
            run = await _or_page(service.get(session, run_id[:64]))
        return render(
            request,
            "confirm.html",
            run=run,
            action=action,
            label=label,
            meaning=meaning,
            csrf=signed_in.csrf,
        )

    confirm.__name__ = f"confirm_{action}"
    confirm.__doc__ = f"The confirmation page of {action}: {meaning}"
    return confirm


def _action_route(action: str) -> Callable[..., Any]:
    scope, _, meaning = ACTIONS[action]
    check = SessionCheck((scope,), fields=frozenset({"csrf", "confirm"}))
    checked = Depends(check)

    async def act(
        request: Request, run_id: str, state: State, signed_in: sessions.Session = checked
    ) -> Response:
        form = await form_of(request, check.fields)
        if form.get("confirm") != "yes":
            raise Refused(
                422,
                "not_confirmed",
                "confirm: the action was not confirmed (post confirm=yes from its page)",
                field="confirm",
                actor=signed_in.actor,
            )
        actor = signed_in.actor
        clock = state.executor.clock
        try:
            if action == "approve":
                await service.approve(
                    state.db,
                    actor,
                    run_id[:64],
                    four_eyes=state.settings.runs_four_eyes,
                    clock=clock,
                )
            else:
                await getattr(service, action)(state.db, actor, run_id[:64], clock=clock)
        except KeyshiftError as error:
            raise Refused(
                status_for(error), error.code, error.message, field=error.field, actor=actor
            ) from error
        return RedirectResponse(
            f"/dashboard/runs/{run_id}?done={action}", status_code=303, headers=SECURITY_HEADERS
        )

    act.__name__ = f"{action}_run"
    act.__doc__ = meaning
    return act


for _action in ACTIONS:
    router.add_api_route(f"/runs/{{run_id}}/{_action}", _confirm_route(_action), methods=["GET"])
    router.add_api_route(f"/runs/{{run_id}}/{_action}", _action_route(_action), methods=["POST"])


# -- licensing ---------------------------------------------------------------------------------


@router.get("/licensing")
async def licensing_page(request: Request, state: State, signed_in: LicensingReader) -> Response:
    """Validations by code, usage ingest, activations and anomalies."""
    async with state.db.transaction() as session:
        overview = await views.licensing(
            session, state.executor.clock(), with_anomalies=signed_in.actor.can("audit:read")
        )
    return render(request, "licensing.html", overview=overview)
