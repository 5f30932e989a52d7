"""How usage is shown (the API's answers, the CLI's JSON): the answer to a recorded event and
an account's usage report."""

from __future__ import annotations

from pydantic import Field

from keyshift.schemas import Instant, Response


class PeriodOut(Response):
    start: Instant
    end: Instant | None = Field(description="None: the period never ends.")


class UsageRecorded(Response):
    """The answer to one event, the same on every replay of its idempotency key (the recording
    path writes it itself, ``metering.service.answer``; this model documents it)."""

    id: str
    account_id: str
    license_id: str | None
    meter: str
    quantity: int
    counted: int
    occurred_at: Instant
    received_at: Instant
    period: PeriodOut
    used: int
    included: int
    remaining: int
    policy: str
    over: bool
    overage_flagged: bool
    notices: list[int]
    replayed: bool = Field(
        description="An earlier request with this idempotency key and body was accepted; this"
        " is its answer."
    )


class UsageBatchRecorded(Response):
    count: int
    results: list[UsageRecorded]


class HistoryEventOut(Response):
    id: str
    license_id: str | None
    quantity: int
    counted: int | None
    occurred_at: Instant
    received_at: Instant
    idempotency_key: str | None


class MeterUsageOut(Response):
    used: int
    included: int
    remaining: int
    overage: str
    over: bool
    unit: str
    period_start: Instant
    period_end: Instant | None
    aggregation: str
    reset: str
    throttle: bool
    history: list[HistoryEventOut]


class UsageReportOut(Response):
    account_id: str
    plan: str
    period: str
    server_time: Instant
    meters: dict[str, MeterUsageOut]
