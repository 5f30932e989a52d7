"""The public form of a data object: what ``/v1/accounts/{id}/objects`` answers with, read
from the ORM row (``ObjectOut.model_validate(row)``). The content itself is never shown, only
its hash."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from keyshift.schemas import Instant


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ObjectOut(_Out):
    id: str
    account_id: str
    quota: str
    name: str
    units: int
    tier: str = Field(description="`standard`, or `archive` once a migration archived it.")
    state: str = Field(description="`active`, `staged` or `superseded`.")
    content_hash: str
    created_at: Instant


class ObjectList(_Out):
    items: list[ObjectOut]
