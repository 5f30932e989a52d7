"""What a run is, without any I/O: its states and the moves between them, the cohort and
option documents a run is created from, its schedule window, and how its accounts are put
into lanes and waves. Everything here is pure, so it is tested without a database.
"""

from __future__ import annotations

import math
from datetime import datetime, time
from enum import StrEnum
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keyshift.catalog.manifests import REF_PATTERN
from keyshift.errors import Conflict
from keyshift.migration.rules import AccountStatus, AttributePredicate

#: The most accounts one run may hold (a larger base is moved in several runs).
MAX_RUN_ACCOUNTS = 10_000_000
#: The most ids an explicit id list may name.
MAX_IDS = 1_000_000


class RunState(StrEnum):
    """Where a run is (``migration_runs.state``); see docs/runs.md for the diagram."""

    DRAFT = "draft"
    REPORTED = "reported"
    APPROVED = "approved"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"  # blue-green: every account prepared, waiting for the cutoff
    COMPLETED = "completed"
    FINALIZED = "finalized"
    ABORTED = "aborted"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


R = RunState

#: The run holds its accounts (``run_accounts.hold_account_id`` set).
ACTIVE: frozenset[RunState] = frozenset(
    {R.DRAFT, R.REPORTED, R.APPROVED, R.RUNNING, R.PAUSED, R.READY, R.COMPLETED, R.ROLLING_BACK}
)
#: Workers claim accounts of these runs.
CLAIMABLE: frozenset[RunState] = frozenset({R.RUNNING, R.ROLLING_BACK})

#: Every move a person (or the run itself) can make, and the states it starts from.
TRANSITIONS: dict[str, frozenset[RunState]] = {
    "report": frozenset({R.DRAFT, R.REPORTED}),
    "approve": frozenset({R.REPORTED}),
    "start": frozenset({R.APPROVED}),
    "pause": frozenset({R.RUNNING}),
    "resume": frozenset({R.PAUSED}),
    "cutover": frozenset({R.READY}),
    "complete": frozenset({R.RUNNING}),
    "abort": frozenset({R.DRAFT, R.REPORTED, R.APPROVED, R.RUNNING, R.PAUSED, R.READY}),
    "rollback": frozenset({R.RUNNING, R.PAUSED, R.READY, R.COMPLETED, R.ABORTED, R.ROLLING_BACK}),
    "finalize": frozenset({R.COMPLETED}),
}


class WrongRunState(Conflict):
    code = "wrong_run_state"


def check_move(move: str, state: str, run_id: str) -> None:
    """Refuse ``move`` from ``state`` with a message that says what would be allowed."""
    allowed = TRANSITIONS[move]
    if state not in allowed:
        names = ", ".join(sorted(allowed))
        raise WrongRunState(
            f"run {run_id} is {state}; {move} needs it to be {names}", field="state"
        )


class AccountState(StrEnum):
    """Where one account of a run is (``run_accounts.state``)."""

    PENDING = "pending"  # waiting to be claimed (again, after a failed attempt)
    CLAIMED = "claimed"  # a worker holds it under a lease
    MIGRATED = "migrated"
    SCHEDULED = "scheduled"  # its rules take effect later: a scheduled migration holds it
    PREPARED = "prepared"  # blue-green: staged, waiting for the cutoff
    SKIPPED = "skipped"  # ineligible or blocked when planned: nothing to do
    HELD = "held"  # plans differently from the approved report: waits for a person
    QUARANTINED = "quarantined"  # kept failing: waits for a person, the run goes on
    ROLLED_BACK = "rolled_back"


A = AccountState

#: A worker has nothing more to do with it in the current phase.
SETTLED_ACCOUNT: frozenset[AccountState] = frozenset(
    {A.MIGRATED, A.SCHEDULED, A.PREPARED, A.SKIPPED, A.HELD, A.QUARANTINED, A.ROLLED_BACK}
)


class Strategy(StrEnum):
    PROGRESSIVE = "progressive"
    BLUE_GREEN = "blue_green"


class Phase(StrEnum):
    MIGRATE = "migrate"  # progressive: every step of each account
    PREPARE = "prepare"  # blue-green, before the cutoff: lock, snapshot, prepare
    FLIP = "flip"  # blue-green, after the cutoff: cutover, verify, receipt
    ROLLBACK = "rollback"  # the whole run, newest first


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Ref = Annotated[str, Field(pattern=REF_PATTERN.pattern, max_length=97)]
AccountId = Annotated[str, Field(min_length=1, max_length=36)]


class Sample(_Strict):
    """A seeded random sample of what the rest of the cohort selects: N accounts or N %."""

    count: int | None = Field(default=None, ge=1, le=MAX_RUN_ACCOUNTS)
    percent: float | None = Field(default=None, gt=0, le=100)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)

    def problems(self) -> list[tuple[str, str]]:
        if (self.count is None) == (self.percent is None):
            return [("sample", "give exactly one of count and percent")]
        return []


class Where(_Strict):
    """One test on an account attribute, as in the rules' eligibility (docs/migration-rules.md):
    ``op`` is eq, ne, in, not_in, exists, missing, gte or lte."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    op: Literal["eq", "ne", "in", "not_in", "exists", "missing", "gte", "lte"]
    value: str | int | float | bool | list[str | int | float] | None = None


class Cohort(_Strict):
    """Which accounts a run moves. Every part narrows: accounts on ``plans`` (default: the
    rules' source plans), whose attributes satisfy every ``where`` predicate (the rules'
    eligibility language), with a status in ``statuses``, among ``ids`` if given; then a
    ``sample`` of those."""

    plans: list[Ref] | None = Field(default=None, min_length=1, max_length=50)
    where: list[Where] = Field(default_factory=list, max_length=50)
    statuses: list[AccountStatus] | None = Field(default=None, min_length=1)
    ids: list[AccountId] | None = Field(default=None, min_length=1, max_length=MAX_IDS)
    sample: Sample | None = None

    def predicates(self) -> list[AttributePredicate]:
        """``where`` in the rules' eligibility language (call after ``problems``)."""
        return [AttributePredicate.model_validate(w.model_dump()) for w in self.where]

    def problems(self) -> list[tuple[str, str]]:
        """What no schema can say: duplicate ids, a sample of both kinds, a predicate whose
        value does not fit its op. (field, reason) each; empty if the cohort is sound."""
        out: list[tuple[str, str]] = []
        if self.ids is not None:
            seen: set[str] = set()
            duplicates = sorted({i for i in self.ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
            if duplicates:
                shown = ", ".join(duplicates[:5]) + (" …" if len(duplicates) > 5 else "")
                out.append(("ids", f"{len(duplicates)} duplicate id(s): {shown}"))
        if self.sample is not None:
            out += self.sample.problems()
        for index, clause in enumerate(self.where):
            try:
                AttributePredicate.model_validate(clause.model_dump())
            except ValidationError as error:
                reason = error.errors()[0]["msg"].removeprefix("Value error, ")
                out.append((f"where[{index}]", reason))
        return out


class Window(_Strict):
    """When workers may start accounts: from ``start`` to ``end`` (local time in
    ``timezone``); an end before the start spans midnight (22:00 to 04:00)."""

    start: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", examples=["01:00"])]
    end: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", examples=["05:00"])]
    timezone: Annotated[str, Field(min_length=1, max_length=64)] = "UTC"

    def problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            out.append(("window.timezone", f"unknown time zone {self.timezone!r}"))
        if self.start == self.end:
            out.append(("window", "start and end are the same time: the window would be empty"))
        return out

    @staticmethod
    def _time(text: str) -> time:
        hours, minutes = text.split(":")
        return time(int(hours), int(minutes))

    def contains(self, when: datetime) -> bool:
        local = when.astimezone(ZoneInfo(self.timezone)).time().replace(tzinfo=None)
        start, end = self._time(self.start), self._time(self.end)
        if start < end:
            return start <= local < end
        return local >= start or local < end


class Priority(_Strict):
    """Lanes: accounts in ``ids`` first, then by the numeric attribute ``attribute``
    (higher first, e.g. monthly revenue); the rest in their order."""

    attribute: str | None = Field(default=None, min_length=1, max_length=64)
    ids: list[AccountId] = Field(default_factory=list, max_length=MAX_IDS)


class RunOptions(_Strict):
    strategy: Strategy = Strategy.PROGRESSIVE
    #: Progressive: the canary, N accounts or N % of the cohort (0: none).
    canary: int = Field(default=0, ge=0, le=MAX_RUN_ACCOUNTS)
    canary_percent: float | None = Field(default=None, gt=0, le=100)
    #: Progressive: accounts per wave after the canary (None: one wave).
    wave_size: int | None = Field(default=None, ge=1, le=MAX_RUN_ACCOUNTS)
    #: Accounts a worker claims at a time.
    batch_size: int = Field(default=50, ge=1, le=1000)
    #: Accounts per second over all workers (None: as fast as they go).
    rate: float | None = Field(default=None, gt=0, le=1_000_000)
    window: Window | None = None
    #: The run halts when more than this share of a wave's attempts fail …
    failure_threshold: float = Field(default=0.05, ge=0, le=1)
    #: … once at least this many accounts of the wave were tried.
    min_attempts: int = Field(default=20, ge=1, le=1_000_000)
    #: Attempts per account before it is quarantined.
    max_attempts: int = Field(default=3, ge=1, le=20)
    #: Seconds a claim holds its accounts without renewal.
    lease_seconds: int = Field(default=60, ge=5, le=3600)
    priority: Priority | None = None

    def problems(self) -> list[tuple[str, str]]:
        """What no schema can say (field, reason); empty if the options are sound."""
        out: list[tuple[str, str]] = []
        if self.canary and self.canary_percent is not None:
            out.append(("canary", "give canary or canary_percent, not both"))
        if self.strategy is Strategy.BLUE_GREEN and (self.canary or self.canary_percent):
            out.append(
                ("canary", "a blue-green run has no canary: its cutoff flips the whole cohort")
            )
        if self.window is not None:
            out += self.window.problems()
        return out

    def canary_size(self, total: int) -> int:
        if self.canary_percent is not None:
            return min(total, max(1, math.ceil(total * self.canary_percent / 100)))
        return min(total, self.canary)


#: The priority of an account listed in ``Priority.ids``: above every attribute value.
LISTED_PRIORITY = 2**31 - 1


def priority_of(attributes: dict[str, object], account_id: str, spec: Priority | None) -> int:
    """An account's lane: higher is claimed first. Listed accounts above every attribute
    value; a missing or non-numeric attribute is 0. Clamped to the column's range."""
    if spec is None:
        return 0
    if account_id in spec.ids:
        return LISTED_PRIORITY
    if spec.attribute is None:
        return 0
    value = attributes.get(spec.attribute)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return 0
    return int(max(-(2**31) + 1, min(2**31 - 2, value)))


def wave_after_canary(index: int, canary: int, options: RunOptions) -> int:
    """The wave of the ``index``-th account outside the canary, in claim order (priority,
    then cohort order): wave 0 is the canary, so the rest start at 1 (or at 0 if there is
    no canary), in waves of ``wave_size``."""
    first = 1 if canary else 0
    if options.wave_size is None:
        return first
    return first + index // options.wave_size


def failure_rate_exceeded(tried: int, failed: int, options: RunOptions) -> bool:
    return tried >= options.min_attempts and failed / tried > options.failure_threshold
