"""Customer notices: the webhook endpoint, the templates, an account's notice history, the
dead-letter list and replay, and announcing a run to its customers — as ``keyshift
notices …`` and ``keyshift runs announce`` do.

Reading needs ``notices:read``; configuring and replaying ``notices:write``; announcing a run
``migrations:run``. Deliveries are made by ``keyshift notices deliver``, never in a request.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import Field

from keyshift.api.deps import Migrations, State, require
from keyshift.api.responses import error_response
from keyshift.api.schemas import Instant, Request, Response, Timestamp
from keyshift.context import Actor
from keyshift.db.tables import Notice
from keyshift.notices import service
from keyshift.notices.errors import NoticeNotFound
from keyshift.notices.kinds import NoticeKind, NoticeState
from keyshift.runs import announce as announcing

router = APIRouter(tags=["notices"])
Reader = Annotated[Actor, Depends(require("notices:read"))]
Writer = Annotated[Actor, Depends(require("notices:write"))]
Runner = Annotated[Actor, Depends(require("migrations:run"))]
Id = Annotated[str, Path(min_length=1, max_length=36)]


class EndpointIn(Request):
    url: str = Field(
        min_length=1, max_length=service.MAX_URL, examples=["https://example.com/hooks"]
    )
    secret: str | None = Field(
        default=None,
        max_length=200,
        description="A Standard Webhooks secret (`whsec_` + base64); omitted: one is made and"
        " shown once in the answer.",
    )
    enabled: bool = True


class EndpointOut(Response):
    url: str
    enabled: bool
    updated_at: Instant
    updated_by: str
    secret: str | None = Field(
        default=None, description="The secret made for you: shown only in this answer."
    )


class TemplateIn(Request):
    subject: str = Field(max_length=5000)
    body: str = Field(max_length=50_000)


class TemplateOut(Response):
    kind: NoticeKind
    subject: str
    body: str
    variables: list[str]
    custom: bool


class NoticeOut(Response):
    id: str
    account_id: str
    kind: NoticeKind
    state: NoticeState
    migration_id: str | None
    run_id: str | None
    payload: dict[str, Any]
    created_at: Instant
    next_attempt_at: Instant
    attempts: int
    last_status: int | None
    last_error: str | None
    last_attempt_at: Instant | None
    delivered_at: Instant | None


class AnnounceIn(Request):
    on: Timestamp = Field(description="The date the run moves the accounts.")
    lead_days: int | None = Field(
        default=None,
        ge=0,
        le=365,
        description="Days before `on` the notices go out (default: KEYSHIFT_NOTICE_LEAD_DAYS).",
    )


class AnnounceOut(Response):
    run_id: str
    on: Instant
    send_at: Instant
    notices: int


def _notice(row: Notice) -> NoticeOut:
    return NoticeOut.model_validate(row, from_attributes=True)


@router.put("/v1/notices/endpoint", response_model=EndpointOut)
async def set_endpoint(body: EndpointIn, actor: Writer, state: State) -> Any:
    """Set the webhook endpoint every notice is delivered to (its secret sealed at rest)."""
    info, made = await service.set_endpoint(
        state.db,
        state.secrets.keyring,
        actor,
        body.url,
        secret=body.secret,
        enabled=body.enabled,
    )
    return EndpointOut(
        url=info.url,
        enabled=info.enabled,
        updated_at=info.updated_at,
        updated_by=info.updated_by,
        secret=made,
    )


@router.get(
    "/v1/notices/endpoint", response_model=EndpointOut, responses={404: error_response(404)}
)
async def get_endpoint(_actor: Reader, state: State) -> Any:
    """The endpoint (never its secret); 404 before one is set."""
    async with state.db.transaction() as session:
        info = await service.endpoint_info(session)
    if info is None:
        raise NoticeNotFound("no webhook endpoint is set", field="endpoint")
    return EndpointOut(
        url=info.url, enabled=info.enabled, updated_at=info.updated_at, updated_by=info.updated_by
    )


@router.get("/v1/notices/templates", response_model=list[TemplateOut])
async def list_templates(_actor: Reader, state: State) -> Any:
    """Each kind's text (the vendor's, or the built-in one) and the variables it may use."""
    async with state.db.transaction() as session:
        return [
            TemplateOut.model_validate(t, from_attributes=True)
            for t in await service.list_templates(session)
        ]


@router.put("/v1/notices/templates/{notice_kind}", response_model=TemplateOut)
async def set_template(
    notice_kind: NoticeKind, body: TemplateIn, actor: Writer, state: State
) -> Any:
    """Store the text for one kind; a variable the kind does not have is refused (422
    ``invalid_template`` naming it) and the refusal audited."""
    info = await service.set_template(state.db, actor, notice_kind, body.subject, body.body)
    return TemplateOut.model_validate(info, from_attributes=True)


@router.delete("/v1/notices/templates/{notice_kind}", response_model=TemplateOut)
async def reset_template(notice_kind: NoticeKind, actor: Writer, state: State) -> Any:
    """Back to the built-in text."""
    info = await service.reset_template(state.db, actor, notice_kind)
    return TemplateOut.model_validate(info, from_attributes=True)


@router.get("/v1/accounts/{account_id}/notices", response_model=list[NoticeOut])
async def account_notices(
    account_id: Id,
    _actor: Reader,
    state: State,
    kind: NoticeKind | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Any:
    """The account's notices, newest first, with how each delivery went."""
    async with state.db.transaction() as session:
        rows = await service.history(session, account_id, kind=kind, limit=limit)
        return [_notice(r) for r in rows]


@router.get("/v1/notices/dead", response_model=list[NoticeOut])
async def dead_letters(
    _actor: Reader, state: State, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> Any:
    """The dead-letter list: notices every attempt failed for, oldest first."""
    async with state.db.transaction() as session:
        return [_notice(r) for r in await service.dead_letters(session, limit=limit)]


@router.get("/v1/notices/{notice_id}", response_model=NoticeOut)
async def get_notice(notice_id: Id, _actor: Reader, state: State) -> Any:
    async with state.db.transaction() as session:
        return _notice(await service.get(session, notice_id))


@router.post("/v1/notices/{notice_id}/replay", response_model=NoticeOut)
async def replay(notice_id: Id, actor: Writer, state: State) -> Any:
    """Send a dead (or delivered) notice again, with the same webhook id."""
    return _notice(await service.replay(state.db, actor, notice_id))


@router.post("/v1/runs/{run_id}/announce", response_model=AnnounceOut)
async def announce_run(
    run_id: Id, body: AnnounceIn, actor: Runner, state: State, engine: Migrations
) -> Any:
    """Write a `scheduled` notice for every account the run's dry run migrates, with the date
    and what changes for it, sent `lead_days` before the date."""
    lead = body.lead_days if body.lead_days is not None else state.settings.notice_lead_days
    done = await announcing.announce(
        state.db, actor, run_id, body.on, lead_days=lead, clock=engine.clock
    )
    return AnnounceOut(run_id=done.run_id, on=done.on, send_at=done.send_at, notices=done.notices)
