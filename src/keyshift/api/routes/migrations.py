"""Migrations: check rules, plan one account's move (writes nothing), apply it, and manage it
afterwards — resume, roll back, finalize, cancel, approve a held change, run what is due.

Running and changing need ``migrations:run`` (approving a held change ``migrations:approve``);
reading needs ``migrations:read`` or ``migrations:run``. The engine is ``keyshift.migration``:
these routes parse, authorise and render, exactly as ``keyshift migrate …`` does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi import Request as HttpRequest
from pydantic import ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.accounts import service as accounts
from keyshift.api.deps import Migrations, State, get_state, require, require_any
from keyshift.api.schemas import Request, Response
from keyshift.catalog.loader import MAX_FILE_BYTES
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.db.tables import Migration
from keyshift.migration import loader, repository, rollback, schedule
from keyshift.migration.errors import RulesInvalid
from keyshift.migration.executor import Executor, check_rules, preview
from keyshift.migration.rules import MigrationRules
from keyshift.migration.schemas import MigrationDetail, MigrationList, PlanOut, RolledBack
from keyshift.states import MigrationState, Step

router = APIRouter(tags=["migrations"])
_can_run = require("migrations:run")
_can_approve = require("migrations:approve")


async def _counted(request: HttpRequest, actor: Actor) -> Actor:
    """Every migration request is shown to the anomaly detector (a burst from one token is
    flagged as an ``anomaly.migration_burst`` event)."""
    get_state(request).anomalies.migration_requested(actor, request_id=actor.request_id)
    return actor


async def _runner(request: HttpRequest, actor: Annotated[Actor, Depends(_can_run)]) -> Actor:
    return await _counted(request, actor)


async def _approver(request: HttpRequest, actor: Annotated[Actor, Depends(_can_approve)]) -> Actor:
    return await _counted(request, actor)


Runner = Annotated[Actor, Depends(_runner)]
Approver = Annotated[Actor, Depends(_approver)]
Reader = Annotated[Actor, Depends(require_any("migrations:read", "migrations:run"))]

#: What problems in rules sent over the API call their source: the request body's field (the
#: lines are lines of that field's text), unless /v1/rules/validate is given a ``name``.
RULES_FILE = "rules"
RulesText = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_FILE_BYTES,
        description="A migration rules manifest (TOML; see docs/migration-rules.md).",
    ),
]
AccountId = Annotated[str, Field(min_length=1, max_length=36)]


class _RulesBody(Request):
    # The rules are TOML: stripping whitespace would shift the line numbers problems report.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class RulesCheck(_RulesBody):
    rules: RulesText
    name: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._/ -]+$")] = (
        Field(
            default=RULES_FILE,
            description="What problems call the rules (default: the field they came in, `rules`).",
        )
    )


class PlanRequest(_RulesBody):
    rules: RulesText
    account_id: AccountId


class ApplyRequest(PlanRequest):
    on_pending: Literal["refuse", "replace", "queue"] = Field(
        default="refuse",
        description="If the account has a scheduled change: refuse (409), replace it, or queue"
        " this one after it.",
    )


class RollbackRequest(Request):
    reason: str | None = Field(default=None, max_length=500)


class RunDueRequest(Request):
    limit: int = Field(default=schedule.MAX_BATCH, ge=1, le=schedule.MAX_BATCH)


class RulesChecked(Response):
    valid: bool
    rules: str = Field(description="The rules' `key@version`.")
    hash: str
    source: list[str] = Field(alias="from", description="The plans the rules migrate from.")
    to: str


def _about_rules(error: RulesInvalid) -> RulesInvalid:
    """Name the request field the problems are in (each problem names its line and field)."""
    if error.field is None:
        error.field = "rules"
    return error


async def _checked(session: AsyncSession, text: str, name: str = RULES_FILE) -> MigrationRules:
    """Parse the rules and cross-check them with the published catalog; RulesInvalid with
    every problem on its line otherwise."""
    try:
        rules, source = loader.load_rules_text(name, text)
    except RulesInvalid as error:
        _about_rules(error)
        raise
    problems = await check_rules(session, rules)
    if problems:
        placed = loader.catalog_problems(name, source, problems)
        raise _about_rules(RulesInvalid(placed, source=name))
    return rules


async def _read_only_rules(db: Database, text: str, name: str = RULES_FILE) -> MigrationRules:
    async with db.transaction() as session:
        rules = await _checked(session, text, name)
        await session.rollback()  # reads only, whatever a future change to the checks does
    return rules


async def _detail(db: Database, row: Migration) -> MigrationDetail:
    """The migration with its plan and its ledger, steps in the order they were written."""
    async with db.transaction() as session:
        steps = (await repository.steps_done(session, row.id)).values()
    return MigrationDetail.of(row, steps)


# -- rules and plans ---------------------------------------------------------------------------


@router.post("/v1/rules/validate")
async def validate_rules(body: RulesCheck, _actor: Runner, state: State) -> RulesChecked:
    """Check a rules manifest: its schema, and that it fits the published plans it names.
    422 lists every problem (file, line, field, reason)."""
    rules = await _read_only_rules(state.db, body.rules, body.name)
    return RulesChecked.model_validate(
        {
            "valid": True,
            "rules": rules.ref,
            "hash": rules.content_hash(),
            "from": list(rules.rules.from_plans),
            "to": rules.rules.to,
        }
    )


@router.post("/v1/migrations/plan")
async def plan_migration(
    body: PlanRequest, _actor: Runner, state: State, engine: Migrations
) -> PlanOut:
    """What migrating the account would do — steps, changes, conflicts, risks and the
    expected end state. Writes nothing."""
    async with state.db.transaction() as session:
        rules = await _checked(session, body.rules)
        try:
            result, _ = await preview(session, rules, body.account_id, now=engine.clock())
        except RulesInvalid as error:
            _about_rules(error)
            raise
        await session.rollback()
    return PlanOut.model_validate(result.to_dict())


@router.post("/v1/migrations", status_code=201)
async def apply_migration(
    body: ApplyRequest, actor: Runner, state: State, engine: Migrations
) -> MigrationDetail:
    """Migrate one account now (201 with the migration, its plan and its ledger), or — if the
    rules take effect later — record it ``scheduled``: a pending change holding the account."""
    rules = await _read_only_rules(state.db, body.rules)
    try:
        row = await engine.request(actor, rules, body.account_id, on_pending=body.on_pending)
    except RulesInvalid as error:
        _about_rules(error)
        raise
    if row.state == MigrationState.LOCKED:
        row = await engine.run(actor, row.id)
    return await _detail(state.db, row)


# -- one migration -----------------------------------------------------------------------------


@router.get("/v1/migrations/{migration_id}")
async def show_migration(
    migration_id: str, _actor: Reader, state: State, engine: Migrations
) -> MigrationDetail:
    return await _detail(state.db, await engine.get(migration_id))


@router.post("/v1/migrations/run-due")
async def run_due(
    actor: Runner, engine: Migrations, body: RunDueRequest | None = None
) -> MigrationList:
    """Execute the scheduled changes whose time has come (re-planned first: one whose outcome
    changed is held for approval) and start queued ones whose account is free."""
    limit = body.limit if body else schedule.MAX_BATCH
    rows = await schedule.run_due(engine, actor, limit=limit)
    return MigrationList.model_validate({"items": rows})


@router.post("/v1/migrations/{migration_id}/resume")
async def resume_migration(
    migration_id: str, actor: Runner, state: State, engine: Migrations
) -> MigrationDetail:
    """Run the steps an interrupted migration has not done yet (safe to repeat)."""
    return await _detail(state.db, await engine.run(actor, migration_id))


async def _rolled_back(
    db: Database, engine: Executor, actor: Actor, migration_id: str, reason: str | None
) -> RolledBack:
    row = await rollback.rollback(engine, actor, migration_id, reason=reason or "requested")
    detail = await _detail(db, row)
    proof = detail.step(Step.ROLLBACK)
    return RolledBack.model_validate(
        {**detail.model_dump(), "rollback": proof.details if proof else None}
    )


@router.post("/v1/migrations/{migration_id}/rollback")
async def rollback_migration(
    migration_id: str,
    actor: Runner,
    state: State,
    engine: Migrations,
    body: RollbackRequest | None = None,
) -> RolledBack:
    """Restore the account to the migration's snapshot; ``rollback`` carries the proof
    (restored hash == snapshot hash). Idempotent; 409 once finalized."""
    return await _rolled_back(state.db, engine, actor, migration_id, body.reason if body else None)


@router.post("/v1/accounts/{account_id}/migrations/rollback")
async def rollback_account(
    account_id: str,
    actor: Runner,
    state: State,
    engine: Migrations,
    body: RollbackRequest | None = None,
) -> RolledBack:
    """Roll back the account's latest migration (409 if it never migrated)."""
    async with state.db.transaction() as session:
        await accounts.get_account(session, account_id)
        latest = await rollback.latest_for_account(session, account_id)
    return await _rolled_back(state.db, engine, actor, latest.id, body.reason if body else None)


@router.post("/v1/migrations/{migration_id}/finalize")
async def finalize_migration(
    migration_id: str, actor: Runner, state: State, engine: Migrations
) -> MigrationDetail:
    """Release the old copies and retire the snapshot: no rollback after this."""
    return await _detail(state.db, await rollback.finalize(engine, actor, migration_id))


@router.post("/v1/migrations/{migration_id}/cancel")
async def cancel_migration(
    migration_id: str, actor: Runner, state: State, engine: Migrations
) -> MigrationDetail:
    """Withdraw a scheduled, held or queued change before it runs."""
    return await _detail(state.db, await rollback.cancel(engine, actor, migration_id))


@router.post("/v1/migrations/{migration_id}/approve")
async def approve_migration(
    migration_id: str, actor: Approver, state: State, engine: Migrations
) -> MigrationDetail:
    """Apply a change held for review, as it stands now."""
    return await _detail(state.db, await schedule.approve(engine, actor, migration_id))


# -- an account's migrations -------------------------------------------------------------------


@router.get("/v1/accounts/{account_id}/migrations")
async def list_account_migrations(
    account_id: str,
    _actor: Reader,
    state: State,
    engine: Migrations,
    which: Annotated[Literal["pending", "all"], Query(alias="state")] = "all",
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> MigrationList:
    """``state=pending``: the changes not yet run (scheduled, held for review, queued), in the
    order they will run. ``state=all``: the latest migrations, newest first."""
    async with state.db.transaction() as session:
        await accounts.get_account(session, account_id)
        if which == "all":
            rows = await repository.latest_migrations(session, account_id, limit=limit)
    if which == "pending":
        rows = (await schedule.pending_for_account(engine, account_id))[:limit]
    return MigrationList.model_validate({"items": rows})
