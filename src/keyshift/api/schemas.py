"""Shared request/response model bases: unknown fields are refused, not ignored; and the one
date type every request uses, bounded to the range ``keyshift.dates`` accepts."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from keyshift import dates


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Response(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def _in_range(value: datetime) -> datetime:
    if not dates.in_range(value):
        raise ValueError(f"must be {dates.RANGE_TEXT}")
    return value


#: A date-time with a timezone, between 1970-01-01T00:00:00Z and 9000-12-31T23:59:59Z.
Timestamp = Annotated[
    AwareDatetime,
    AfterValidator(_in_range),
    Field(
        json_schema_extra={
            "formatMinimum": dates.EARLIEST.isoformat().replace("+00:00", "Z"),
            "formatMaximum": "9000-12-31T23:59:59Z",
        }
    ),
]
