"""Migration runs: create one over a cohort, report, approve, start, pause, resume, abort,
roll back or finalize it as a whole, and watch it — exactly as ``keyshift runs …`` does.

Creating and driving a run needs ``migrations:run``; approving it ``migrations:approve`` (and,
with ``KEYSHIFT_RUNS_FOUR_EYES``, not the token that created it); reading it
``migrations:read`` or ``migrations:run``. The per-account work is done by workers
(``keyshift worker``), never inside a request.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import ConfigDict, Field
from sqlalchemy import select

from keyshift.api.deps import Migrations, State, require, require_any
from keyshift.api.inputs import INT64_MAX
from keyshift.api.routes.migrations import RULES_FILE, RulesText, _about_rules, _RulesBody
from keyshift.api.schemas import Instant, Request, Response, Timestamp
from keyshift.context import Actor
from keyshift.db.tables import MigrationRun, MigrationStep, RunAccount
from keyshift.migration import loader
from keyshift.migration.errors import RulesInvalid
from keyshift.runs import service
from keyshift.runs.errors import NoReport
from keyshift.runs.model import AccountState, Cohort, RunOptions

router = APIRouter(prefix="/v1/runs", tags=["runs"])
Runner = Annotated[Actor, Depends(require("migrations:run"))]
Approver = Annotated[Actor, Depends(require("migrations:approve"))]
Reader = Annotated[Actor, Depends(require_any("migrations:read", "migrations:run"))]
RunId = Annotated[str, Field(min_length=1, max_length=36)]


class RunCreate(_RulesBody):
    rules: RulesText
    name: str | None = Field(default=None, min_length=1, max_length=200)
    cohort: Cohort = Field(default_factory=Cohort)
    options: RunOptions = Field(default_factory=RunOptions)


class CutoverRequest(Request):
    at: Timestamp | None = Field(
        default=None, description="The cutoff moment (default: now): every receipt's time."
    )


class RunOut(Response):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    id: str
    name: str
    state: str
    strategy: str
    phase: str
    rules: str = Field(validation_alias="rules_ref")
    rules_hash: str
    cohort: dict[str, Any]
    options: dict[str, Any]
    total: int
    report_hash: str | None
    approved_hash: str | None
    halted_reason: str | None
    cutoff_at: Instant | None
    created_by: str
    approved_by: str | None
    created_at: Instant
    approved_at: Instant | None
    started_at: Instant | None
    finished_at: Instant | None


class ProgressOut(Response):
    total: int
    done: int
    by_state: dict[str, int]
    failed_attempts: int
    rate: float | None = Field(description="Accounts per second over the last minute.")
    eta_seconds: float | None
    waves: dict[int, dict[str, int]]


class RunDetail(RunOut):
    progress: ProgressOut


class LedgerStepOut(Response):
    step: str
    outcome: str
    snapshot_hash: str | None
    at: Instant
    details: dict[str, Any]


class RunAccountOut(Response):
    account_id: str
    position: int
    state: str
    wave: int
    priority: int
    verdict: str | None
    migration_id: str | None
    attempts: int
    error: str | None
    done_at: Instant | None
    ledger: list[LedgerStepOut] = Field(default_factory=list)


class VerifiedOut(Response):
    account_id: str
    migration_id: str
    problems: list[str] = Field(description="Each difference from the expected state.")


class RunVerified(Response):
    checked: int
    accounts: list[VerifiedOut] = Field(description="Every account checked, in id order.")


class RunAccountsPage(Response):
    accounts: list[RunAccountOut]
    next_after: int | None = Field(
        description="Pass as `after` for the next page; null on the last page."
    )


def _run(row: MigrationRun) -> RunOut:
    return RunOut.model_validate(row)


async def _detail(state: Any, run_id: str, now: datetime) -> RunDetail:
    async with state.db.transaction() as session:
        run = await service.get(session, run_id)
        progress = await service.progress(session, run, now)
    body = RunOut.model_validate(run).model_dump()
    return RunDetail(**body, progress=ProgressOut.model_validate(progress))


@router.post("", status_code=201, response_model=RunDetail)
async def create_run(body: RunCreate, actor: Runner, state: State, engine: Migrations) -> Any:
    """A draft run: the rules and every account the cohort selects, held by this run (an
    account is in one active run at a time). Nothing about the accounts changes."""
    try:
        rules, _ = loader.load_rules_text(RULES_FILE, body.rules)
        run = await service.create(
            state.db, actor, rules, body.cohort, body.options, name=body.name, clock=engine.clock
        )
    except RulesInvalid as error:
        raise _about_rules(error) from error
    return await _detail(state, run.id, engine.clock())


@router.get("", response_model=list[RunOut])
async def list_runs(
    _actor: Reader, state: State, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> Any:
    """The most recent runs first."""
    async with state.db.transaction() as session:
        return [_run(r) for r in await service.list_runs(session, limit=limit)]


@router.get("/{run_id}", response_model=RunDetail)
async def get_run(run_id: RunId, _actor: Reader, state: State, engine: Migrations) -> Any:
    """The run and its progress: accounts per state and per wave, rate and ETA."""
    return await _detail(state, run_id, engine.clock())


@router.post("/{run_id}/report", response_model=RunDetail)
async def report_run(run_id: RunId, actor: Runner, state: State, engine: Migrations) -> Any:
    """The dry run: plan every account (writing no account state) and record the counts,
    the accounts at risk and each account's expected outcome."""
    async with state.db.transaction() as session:
        throughput = await service.measured_throughput(session)
    await service.report(state.db, actor, run_id, clock=engine.clock, throughput=throughput)
    return await _detail(state, run_id, engine.clock())


@router.get("/{run_id}/report", response_model=dict[str, Any])
async def get_report(run_id: RunId, _actor: Reader, state: State) -> Any:
    """The last dry-run report of the run (404 ``no_report`` before the first)."""
    async with state.db.transaction() as session:
        run = await service.get(session, run_id)
    if run.report is None:
        raise NoReport(f"run {run_id} has no report yet; POST …/report", field="run_id")
    return run.report


@router.post("/{run_id}/approve", response_model=RunDetail)
async def approve_run(run_id: RunId, actor: Approver, state: State, engine: Migrations) -> Any:
    """Approve the reported run as it was reported (pinned to its rules and catalog hashes)."""
    await service.approve(
        state.db, actor, run_id, four_eyes=state.settings.runs_four_eyes, clock=engine.clock
    )
    return await _detail(state, run_id, engine.clock())


Move = Literal["start", "pause", "resume", "abort", "rollback"]


async def _move(move: Move, run_id: str, actor: Actor, state: Any, engine: Any) -> RunDetail:
    await getattr(service, move)(state.db, actor, run_id, clock=engine.clock)
    return await _detail(state, run_id, engine.clock())


@router.post("/{run_id}/start", response_model=RunDetail)
async def start_run(run_id: RunId, actor: Runner, state: State, engine: Migrations) -> Any:
    """Start an approved run (refused if its rules or plans changed since the report):
    workers take its accounts from now on."""
    return await _move("start", run_id, actor, state, engine)


@router.post("/{run_id}/pause", response_model=RunDetail)
async def pause_run(run_id: RunId, actor: Runner, state: State, engine: Migrations) -> Any:
    """Workers start nothing new (the account each has in hand finishes)."""
    return await _move("pause", run_id, actor, state, engine)


@router.post("/{run_id}/resume", response_model=RunDetail)
async def resume_run(run_id: RunId, actor: Runner, state: State, engine: Migrations) -> Any:
    """Resume a paused or halted run."""
    return await _move("resume", run_id, actor, state, engine)


@router.post("/{run_id}/abort", response_model=RunDetail)
async def abort_run(run_id: RunId, actor: Runner, state: State, engine: Migrations) -> Any:
    """Stop for good and release the accounts; those already moved stay moved (roll the run
    back to undo them)."""
    return await _move("abort", run_id, actor, state, engine)


@router.post("/{run_id}/rollback", response_model=RunDetail)
async def rollback_run(run_id: RunId, actor: Runner, state: State, engine: Migrations) -> Any:
    """Roll the whole run back, newest first (workers do it; idempotent, resumable)."""
    return await _move("rollback", run_id, actor, state, engine)


@router.post("/{run_id}/cutover", response_model=RunDetail)
async def cutover_run(
    run_id: RunId,
    actor: Runner,
    state: State,
    engine: Migrations,
    body: CutoverRequest | None = None,
) -> Any:
    """Blue-green: flip every prepared account at the cutoff moment."""
    at = body.at if body is not None else None
    await service.cutover(state.db, actor, run_id, at=at, clock=engine.clock)
    return await _detail(state, run_id, engine.clock())


@router.post("/{run_id}/finalize", response_model=RunDetail)
async def finalize_run(run_id: RunId, actor: Runner, state: State, engine: Migrations) -> Any:
    """Release the old copies and retire the snapshots of every migrated account: no
    rollback after this."""
    from keyshift.migration.rollback import finalize_many

    async def many(migration_ids: list[str]) -> Any:
        return await finalize_many(engine, actor, migration_ids)

    await service.finalize(state.db, actor, run_id, many, clock=engine.clock)
    return await _detail(state, run_id, engine.clock())


@router.get("/{run_id}/accounts", response_model=RunAccountsPage)
async def run_accounts(
    run_id: RunId,
    _actor: Reader,
    state: State,
    account_state: Annotated[AccountState | None, Query(alias="state")] = None,
    after: Annotated[int, Query(ge=-1, le=2**31)] = -1,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Any:
    """Per-account outcomes in cohort order, each with its migration's ledger; page with
    ``after``."""
    async with state.db.transaction() as session:
        await service.get(session, run_id)
        rows: list[RunAccount] = await service.accounts(
            session, run_id, state=account_state, after=after, limit=limit
        )
        ids = [r.migration_id for r in rows if r.migration_id]
        steps: dict[str, list[MigrationStep]] = {}
        if ids:
            for step in (
                await session.execute(
                    select(MigrationStep)
                    .where(MigrationStep.migration_id.in_(ids))
                    .order_by(MigrationStep.seq)
                )
            ).scalars():
                steps.setdefault(step.migration_id, []).append(step)
    out = []
    for row in rows:
        item = RunAccountOut.model_validate(row)
        item.ledger = [
            LedgerStepOut.model_validate(s) for s in steps.get(row.migration_id or "", [])
        ]
        out.append(item)
    return RunAccountsPage(
        accounts=out, next_after=rows[-1].position if len(rows) == limit else None
    )


@router.get("/{run_id}/verify", response_model=RunVerified)
async def verify_run(
    run_id: RunId,
    _actor: Reader,
    state: State,
    engine: Migrations,
    sample: Annotated[int, Query(ge=1, le=1_000_000)] = 100,
    seed: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
) -> Any:
    """Re-verify a seeded random sample of the run's migrated accounts against the state their
    migration expected (reads only), as ``keyshift runs verify`` does."""
    checked = await service.verify_sample(state.db, run_id, sample, seed=seed, clock=engine.clock)
    return RunVerified(
        checked=len(checked), accounts=[VerifiedOut.model_validate(v) for v in checked]
    )
