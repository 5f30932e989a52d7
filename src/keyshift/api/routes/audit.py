"""Audit log: read events and verify the chain."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from keyshift.api.deps import Session, require
from keyshift.api.inputs import INT64_MAX
from keyshift.api.schemas import Instant, Response
from keyshift.audit import service as audit
from keyshift.audit.chain import ProblemKind
from keyshift.context import Actor

router = APIRouter(prefix="/v1/audit", tags=["audit"])
Reader = Annotated[Actor, Depends(require("audit:read"))]


class AuditEventOut(Response):
    seq: int
    id: str
    occurred_at: Instant
    actor: str
    action: str
    target_type: str
    target_id: str
    account_id: str | None
    request_id: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str


class ProblemOut(Response):
    seq: int
    kind: ProblemKind
    message: str
    details: dict[str, Any]


class VerifyOut(Response):
    ok: bool
    checked: int
    problems: list[ProblemOut]


@router.get("/events")
async def list_events(
    _actor: Reader,
    session: Session,
    account_id: Annotated[str | None, Query(max_length=36)] = None,
    after_seq: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEventOut]:
    rows = await audit.list_events(session, account_id=account_id, after_seq=after_seq, limit=limit)
    return [AuditEventOut.model_validate(row) for row in rows]


@router.get("/verify")
async def verify(_actor: Reader, session: Session) -> VerifyOut:
    """Walk the chain; ``problems`` starts with the first row whose content or link is wrong
    (kinds: content_edited, link_broken, gap, inserted, head_mismatch; see docs/security.md)."""
    return VerifyOut.model_validate(await audit.verify(session))
