"""Admin: mint, list and revoke API tokens."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import Field

from keyshift.api.deps import Session, require
from keyshift.api.schemas import Request, Response
from keyshift.context import SCOPES, Actor
from keyshift.security import tokens

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])
Writer = Annotated[Actor, Depends(require("tokens:write"))]


class TokenCreate(Request):
    name: str = Field(min_length=1, max_length=200)
    scopes: list[Annotated[str, Field(json_schema_extra={"enum": sorted(SCOPES)})]] = Field(
        min_length=1, max_length=20
    )
    ttl_seconds: int | None = Field(default=None, ge=60, le=10 * 365 * 86400)


class TokenOut(Response):
    id: str
    name: str
    scopes: list[str]
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="The bearer secret. Shown once; only its hash is stored.")


def _out(t: tokens.ApiToken) -> dict[str, object]:
    return {
        "id": t.id,
        "name": t.name,
        "scopes": t.scopes["scopes"],
        "created_at": t.created_at,
        "created_by": t.created_by,
        "expires_at": t.expires_at,
        "revoked_at": t.revoked_at,
    }


@router.post("", status_code=201, response_model=TokenCreated)
async def create_token(body: TokenCreate, actor: Writer, session: Session) -> dict[str, object]:
    ttl = timedelta(seconds=body.ttl_seconds) if body.ttl_seconds else None
    issued = await tokens.create_token(session, actor, name=body.name, scopes=body.scopes, ttl=ttl)
    return {**_out(issued.token), "token": issued.plaintext}


@router.get("", response_model=list[TokenOut])
async def list_tokens(_actor: Writer, session: Session) -> list[dict[str, object]]:
    return [_out(t) for t in await tokens.list_tokens(session)]


@router.delete("/{token_id}", response_model=TokenOut)
async def revoke_token(token_id: str, actor: Writer, session: Session) -> dict[str, object]:
    return _out(await tokens.revoke_token(session, actor, token_id))
