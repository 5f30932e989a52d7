"""Admin: mint, list and revoke API tokens."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import Field, field_validator

from keyshift.api.deps import Session, require
from keyshift.api.schemas import Instant, Request, Response
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
    created_at: Instant
    created_by: str
    expires_at: Instant | None
    revoked_at: Instant | None

    @field_validator("scopes", mode="before")
    @classmethod
    def _listed(cls, value: object) -> object:
        """The row keeps its scopes as ``{"scopes": [...]}`` (a JSON column)."""
        return value["scopes"] if isinstance(value, dict) else value


class TokenCreated(TokenOut):
    token: str = Field(description="The bearer secret. Shown once; only its hash is stored.")


@router.post("", status_code=201)
async def create_token(body: TokenCreate, actor: Writer, session: Session) -> TokenCreated:
    ttl = timedelta(seconds=body.ttl_seconds) if body.ttl_seconds else None
    issued = await tokens.create_token(session, actor, name=body.name, scopes=body.scopes, ttl=ttl)
    shown = TokenOut.model_validate(issued.token).model_dump()
    return TokenCreated.model_validate({**shown, "token": issued.plaintext})


@router.get("")
async def list_tokens(_actor: Writer, session: Session) -> list[TokenOut]:
    return [TokenOut.model_validate(t) for t in await tokens.list_tokens(session)]


@router.delete("/{token_id}")
async def revoke_token(token_id: str, actor: Writer, session: Session) -> TokenOut:
    return TokenOut.model_validate(await tokens.revoke_token(session, actor, token_id))
