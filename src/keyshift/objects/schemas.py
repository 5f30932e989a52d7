"""The public form of a data object: what ``/v1/accounts/{id}/objects`` answers with, read
from the ORM row (``ObjectOut.model_validate(row)``). The content itself is never shown, only
its hash."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from keyshift import dates

#: An instant in a response: RFC 3339 in UTC with ``Z`` (``keyshift.dates.rfc3339``) — the
#: same type as ``keyshift.api.schemas.Instant``, which the domain may not import.
Instant = Annotated[
    datetime,
    PlainSerializer(dates.rfc3339, return_type=str, when_used="json"),
    Field(json_schema_extra={"format": "date-time"}),
]


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
