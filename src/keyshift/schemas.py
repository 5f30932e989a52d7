"""The two pieces every response model shares, importable by the domain packages (which own
their response models, ``<noun>/schemas.py``) as well as by the API: the ``Response`` base,
read from attributes of ORM rows and dataclasses, and ``Instant``, the one form of a
timestamp in a response."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from keyshift import dates


class Response(BaseModel):
    model_config = ConfigDict(from_attributes=True)


#: An instant in a response: always RFC 3339 in UTC with ``Z`` (``keyshift.dates.rfc3339``),
#: whatever offset or naivety the database handed back.
Instant = Annotated[
    datetime,
    PlainSerializer(dates.rfc3339, return_type=str, when_used="json"),
    Field(json_schema_extra={"format": "date-time"}),
]
