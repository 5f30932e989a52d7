"""Shared request/response model bases: unknown fields are refused, not ignored; and the one
date type every request uses, bounded to the range ``keyshift.dates`` accepts. ``Response``
and ``Instant`` live in ``keyshift.schemas`` (the domain's response models use them too) and
are re-exported here."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from keyshift import dates
from keyshift.catalog.manifests import REF_PATTERN
from keyshift.schemas import Instant, Response

__all__ = ["KEY_TEXT_PATTERN", "Instant", "LicenseKey", "Ref", "Request", "Response", "Timestamp"]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


#: A license key as typed: 25 symbols of Crockford base32 (any case; O, I and L read as 0, 1
#: and 1), ASCII spaces and dashes anywhere (as licensing.keys forgives; a Unicode ``\s``
#: would let NBSP through the schema). The last symbol is a check character, which no pattern
#: can express: a key that fits the pattern but not its check is still a 422 (malformed_key).
KEY_TEXT_PATTERN = r"^[ \t\r\n-]*(?:[0-9A-TV-Za-tv-z][ \t\r\n-]*){25}$"
LicenseKey = Annotated[
    str,
    Field(
        min_length=25,
        max_length=64,
        pattern=KEY_TEXT_PATTERN,
        description="The license key (`7KQ2M-9XH3D-F4TVA-PZ8NE-R1CW6`).",
    ),
]

#: A published catalog version, ``key@version`` (``pro-seat@2025``).
Ref = Annotated[
    str, Field(min_length=3, max_length=97, pattern=REF_PATTERN.pattern, examples=["pro@2025"])
]


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
            "formatMinimum": dates.rfc3339(dates.EARLIEST),
            "formatMaximum": "9000-12-31T23:59:59Z",
        }
    ),
]
