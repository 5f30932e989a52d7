"""The manifest schema: what an edition and a plan file may say (documented in
``docs/manifests.md``). Unknown keys are errors, never silently ignored."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from keyshift.catalog.durations import Duration

KEY_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"
REF_PATTERN = re.compile(r"^([a-z][a-z0-9_-]{0,63})@([A-Za-z0-9][A-Za-z0-9._-]{0,31})$")

Key = Annotated[str, Field(pattern=KEY_PATTERN)]
Version = Annotated[str, Field(pattern=VERSION_PATTERN)]
Period = Literal["minute", "hour", "day", "week", "month"]

#: Bounds that keep every number inside a signed 64-bit integer (the canonical JSON form).
MAX_LIMIT = 10**15
MAX_FEATURES = 500
MAX_QUOTAS = 200


def parse_ref(ref: str) -> tuple[str, str]:
    """``pro@2025`` → ("pro", "2025"); ValueError otherwise."""
    match = REF_PATTERN.match(ref)
    if not match:
        raise ValueError(f"{ref!r} is not a reference of the form key@version")
    return match.group(1), match.group(2)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Header(Strict):
    key: Key
    version: Version
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)


class ThrottledFeature(Strict):
    mode: Literal["throttled"]
    limit: int = Field(strict=True, ge=1, le=MAX_LIMIT)
    period: Period


QuotaLimit = Annotated[int, Field(strict=True, ge=0, le=MAX_LIMIT)]


class Quota(Strict):
    limit: QuotaLimit
    unit: str = Field(default="", max_length=32)


def _table_or_value(value: Any) -> str:
    # A table (dict or model) is the long form; anything else the short one. Choosing the
    # branch up front gives one error per mistake instead of one per union member.
    return "table" if isinstance(value, dict | BaseModel) else "value"


FeatureSpec = Annotated[
    Annotated[Literal["enabled", "disabled"], Tag("value")]
    | Annotated[ThrottledFeature, Tag("table")],
    Discriminator(_table_or_value),
]
QuotaSpec = Annotated[
    Annotated[QuotaLimit, Tag("value")] | Annotated[Quota, Tag("table")],
    Discriminator(_table_or_value),
]


class Edition(Strict):
    """A feature set. ``features``: each ``enabled``, ``disabled`` or throttled; ``quotas``:
    named non-negative limits."""

    edition: Header
    features: dict[Key, FeatureSpec] = Field(default_factory=dict, max_length=MAX_FEATURES)
    quotas: dict[Key, QuotaSpec] = Field(default_factory=dict, max_length=MAX_QUOTAS)

    @field_validator("quotas")
    @classmethod
    def _non_negative(cls, quotas: dict[str, int | Quota]) -> dict[str, int | Quota]:
        for name, value in quotas.items():
            if isinstance(value, int) and value < 0:
                raise ValueError(f"quota {name!r} must be >= 0")
        return quotas

    def quota_limits(self) -> dict[str, int]:
        return {k: v if isinstance(v, int) else v.limit for k, v in self.quotas.items()}


class SeatLicensing(Strict):
    model: Literal["seat"]
    max_activations: int = Field(ge=1, le=100_000)
    activation: Literal["node-locked", "floating"] = "node-locked"
    lease_ttl: str | None = None

    @model_validator(mode="after")
    def _lease(self) -> SeatLicensing:
        if self.activation == "floating":
            if self.lease_ttl is None:
                raise ValueError("floating activation needs lease_ttl (e.g. '1h')")
            ttl = Duration.parse(self.lease_ttl)
            if ttl.is_calendar or not 60 <= ttl.seconds() <= 30 * 86400:
                raise ValueError("lease_ttl must be between 1m and 30d")
        elif self.lease_ttl is not None:
            raise ValueError("lease_ttl only applies to floating activation")
        return self

    def lease_seconds(self) -> int | None:
        return Duration.parse(self.lease_ttl).seconds() if self.lease_ttl else None


class Meter(Strict):
    """A metered unit (the usage model). Enforcement is the metering service's."""

    key: Key
    unit: str = Field(min_length=1, max_length=32)
    aggregation: Literal["sum", "max", "unique"] = "sum"
    reset: Literal["day", "month", "term", "never"] = "month"
    included: int = Field(strict=True, ge=0, le=MAX_LIMIT)
    overage: Literal["block", "allow", "notify"] = "block"
    notify_at: list[Annotated[int, Field(ge=1, le=1000)]] = Field(default_factory=list)


class UsageLicensing(Strict):
    model: Literal["usage"]
    max_activations: int | None = Field(default=None, ge=1, le=100_000)


Licensing = Annotated[SeatLicensing | UsageLicensing, Field(discriminator="model")]


class Term(Strict):
    length: str | Literal["perpetual"] = "1y"
    grace_period: str = "0d"
    offline_allowance: str = "0d"

    @field_validator("length")
    @classmethod
    def _length(cls, value: str) -> str:
        if value != "perpetual":
            Duration.parse(value)
        return value

    @field_validator("grace_period", "offline_allowance")
    @classmethod
    def _fixed(cls, value: str) -> str:
        if Duration.parse(value).is_calendar:
            raise ValueError("use a fixed unit (s, m, h, d, w) here")
        return value


class PlanHeader(Header):
    edition: str = Field(description="The edition reference, key@version")

    @field_validator("edition")
    @classmethod
    def _ref(cls, value: str) -> str:
        parse_ref(value)
        return value


class Plan(Strict):
    """Commercial terms over an edition: licensing model, term, grace, offline allowance, meters."""

    plan: PlanHeader
    licensing: Licensing
    term: Term = Field(default_factory=Term)
    meters: list[Meter] = Field(default_factory=list, max_length=50)

    @model_validator(mode="after")
    def _meters(self) -> Plan:
        keys = [m.key for m in self.meters]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"meter key(s) declared twice: {', '.join(duplicates)}")
        if self.licensing.model == "usage" and not self.meters:
            raise ValueError("a usage plan needs at least one [[meters]] entry")
        return self


def manifest_kind(data: dict[str, Any]) -> Literal["edition", "plan"] | None:
    if "edition" in data and isinstance(data["edition"], dict):
        return "edition"
    if "plan" in data:
        return "plan"
    return None
