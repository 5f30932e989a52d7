"""Usage: recording metered events and reading counters back.

Client applications record with their license key in the body (``{"key": …}``, no bearer
token; they act as ``license:<id>``). Services record for an account with a bearer token
scoped ``usage:write`` and ``{"account_id": …}``. Reading needs ``accounts:read`` or
``licenses:read``. Semantics (idempotency, windows, quotas) are in ``docs/usage.md``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ConfigDict, Field, model_validator
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.api.deps import (
    ClientLimited,
    State,
    TokenInsteadOfKey,
    limit_key,
    request_id,
    require,
    require_any,
)
from keyshift.api.errors import JsonResponse
from keyshift.api.schemas import LicenseKey, Timestamp
from keyshift.api.schemas import Request as RequestModel
from keyshift.api.schemas import Response as ResponseModel
from keyshift.catalog.manifests import KEY_PATTERN
from keyshift.context import Actor
from keyshift.errors import KeyshiftError
from keyshift.metering import reports, subjects
from keyshift.metering import service as metering
from keyshift.metering.schemas import UsageBatchRecorded, UsageRecorded, UsageReportOut
from keyshift.observability import metrics

router = APIRouter(tags=["usage"])

REPLAYED_HEADER = "Idempotent-Replayed"


class UsageEventIn(RequestModel):
    meter: Annotated[str, Field(pattern=KEY_PATTERN)]
    quantity: Annotated[int, Field(strict=True, ge=0, le=metering.MAX_QUANTITY)]
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255)]
    timestamp: Timestamp | None = Field(
        default=None, description="When it happened (client clock); default: now."
    )
    member: Annotated[str, Field(min_length=1, max_length=metering.MAX_MEMBER)] | None = Field(
        default=None, description="What a unique meter counts (device id, user id …)."
    )

    def to_domain(self) -> metering.UsageIn:
        return metering.UsageIn(
            self.meter, self.quantity, self.idempotency_key, self.timestamp, self.member
        )


class Credential(RequestModel):
    # Exactly one of the two, said in the schema too.
    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["key"]}, {"required": ["account_id"]}]}
    )

    key: LicenseKey | None = None
    account_id: Annotated[str, Field(min_length=1, max_length=36)] | None = None

    @model_validator(mode="after")
    def _one(self) -> Credential:
        if (self.key is None) == (self.account_id is None):
            raise ValueError("give either key (client) or account_id (service, bearer token)")
        return self


class UsageRecord(Credential, UsageEventIn):
    pass


class UsageBatch(Credential):
    events: list[UsageEventIn] = Field(min_length=1, max_length=metering.MAX_BATCH)


#: ``account_id`` in place of ``key``: a service records usage with a ``usage:write`` token.
_BY_TOKEN = TokenInsteadOfKey(require("usage:write"))
_KEY_OR_TOKEN = [*ClientLimited, Depends(_BY_TOKEN)]


async def _writer(request: Request, credential: Credential) -> Actor | None:
    """The bearer actor for an account_id request (needs ``usage:write``); None for a key."""
    if credential.account_id is None:
        return None
    return await _BY_TOKEN.check(request)


async def _subject(session: AsyncSession, state: Any, credential: Credential) -> subjects.Subject:
    if credential.key is not None:
        return await subjects.subject_for_key(session, state.secrets.keyring, credential.key)
    assert credential.account_id is not None
    return await subjects.subject_for_account(session, credential.account_id)


# The recording routes answer with orjson directly (the answers are built while recording);
# ``response_model`` documents them.
@router.post("/v1/usage", dependencies=_KEY_OR_TOKEN, response_model=UsageRecorded)
async def record_usage(body: UsageRecord, request: Request, state: State) -> JsonResponse:
    """Record one event, or replay the first answer to the same idempotency key and body."""
    limit_key(state, body.key)
    bearer = await _writer(request, body)
    policy = metering.UsagePolicy.from_settings(state.settings)

    async def work(session: AsyncSession) -> metering.Recorded:
        subject = await _subject(session, state, body)
        actor = bearer or subjects.key_actor(subject, request_id(request))
        return await metering.record(session, actor, subject, body.to_domain(), policy=policy)

    [recorded] = await _counted("single", 1, _one(metering.in_transaction(state.db, work)))
    return JsonResponse(
        recorded.to_dict(), headers={REPLAYED_HEADER: str(recorded.replayed).lower()}
    )


@router.post("/v1/usage/batch", dependencies=_KEY_OR_TOKEN, response_model=UsageBatchRecorded)
async def record_usage_batch(body: UsageBatch, request: Request, state: State) -> JsonResponse:
    """Up to 1,000 events, all or nothing; each has its own idempotency key. Recorded with a
    fixed number of statements whatever the batch size (``metering.service._record``)."""
    limit_key(state, body.key)
    bearer = await _writer(request, body)
    policy = metering.UsagePolicy.from_settings(state.settings)
    events = [e.to_domain() for e in body.events]

    async def work(session: AsyncSession) -> list[metering.Recorded]:
        subject = await _subject(session, state, body)
        actor = bearer or subjects.key_actor(subject, request_id(request))
        return await metering.record_batch(session, actor, subject, events, policy=policy)

    results = await _counted("batch", len(events), metering.in_transaction(state.db, work))
    # Serialised by orjson in one pass: a thousand answers through FastAPI's encoder would
    # cost more than recording them.
    return JsonResponse({"count": len(results), "results": [r.to_dict() for r in results]})


async def _one(recording: Awaitable[metering.Recorded]) -> list[metering.Recorded]:
    return [await recording]


async def _counted(
    kind: str, events: int, recording: Awaitable[list[metering.Recorded]]
) -> list[metering.Recorded]:
    """Await ``recording`` (the request's events) and count them, by result, with its time."""
    started = time.perf_counter()
    try:
        results = await recording
    except KeyshiftError:
        metrics.record_usage(kind, 0, 0, events, time.perf_counter() - started)
        raise
    replayed = sum(1 for r in results if r.replayed)
    metrics.record_usage(kind, len(results) - replayed, replayed, 0, time.perf_counter() - started)
    return results


#: A bearer token with ``accounts:read`` or ``licenses:read``.
Reader = Annotated[Actor, Depends(require_any("accounts:read", "licenses:read"))]


@router.get("/v1/accounts/{account_id}/usage")
async def account_usage(
    account_id: str,
    _actor: Reader,
    state: State,
    period: Annotated[
        str,
        Query(
            max_length=32,
            description="`current`, `previous` or a date (`2026-05-01`) from 1970-01-01 to"
            " 9000-12-31.",
        ),
    ] = "current",
    history_limit: Annotated[int, Query(ge=0, le=1000)] = reports.HISTORY_LIMIT,
) -> UsageReportOut:
    """Counters and recent events of every meter: ``period`` = current, previous or a date."""
    async with state.db.transaction() as session:
        report = await reports.account_usage(
            session, account_id, period=period, history_limit=history_limit
        )
    return UsageReportOut.model_validate(report)


class Pruned(ResponseModel):
    released: int = Field(description="Idempotency keys released (their events are kept).")


@router.post("/v1/usage/prune")
async def prune_usage(
    actor: Annotated[Actor, Depends(require("usage:write"))], state: State
) -> Pruned:
    """Release the idempotency keys older than their window (`keyshift usage prune`); the
    events stay. Audited."""
    async with state.db.transaction() as session:
        return Pruned(released=await metering.prune(session, actor))
