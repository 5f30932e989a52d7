"""A migration run rehearsed on synthetic accounts (``keyshift simulate``): the steps around the
workers — create, report, approve as a second person, start — and, once the workers are done,
the run's outcome and the check of every account against what it should be."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.db.tables import RunAccount
from keyshift.db.types import utcnow
from keyshift.migration.rules import MigrationRules
from keyshift.migration.state import state_hash
from keyshift.runs import service
from keyshift.runs.model import AccountState, Cohort, RunOptions
from keyshift.simulation.checksum import account_states

#: Who approves a rehearsal's run: not its creator, so the four-eyes rule is exercised.
APPROVER = Actor(id="simulate:approver", scopes=frozenset({"migrations:approve"}))


async def create_and_report(
    db: Database, actor: Actor, rules: MigrationRules, options: RunOptions
) -> tuple[str, dict[str, Any]]:
    """A run of ``rules`` over every account on its source plans, reported; returns the run's
    id and its report."""
    run = await service.create(db, actor, rules, Cohort(), options)
    run = await service.report(db, actor, run.id)
    assert run.report is not None  # report() always writes one
    return run.id, run.report


async def approve_and_start(db: Database, actor: Actor, run_id: str) -> None:
    """Approve as ``APPROVER`` with four eyes required, then start as ``actor``."""
    await service.approve(db, APPROVER, run_id, four_eyes=True)
    await service.start(db, actor, run_id)


@dataclass(frozen=True)
class Outcome:
    """Where a run ended: its state, why it halted (if it did), its accounts by state."""

    state: str
    halted_reason: str | None
    total: int
    by_state: dict[str, int]
    retried: int  # accounts that took more than one attempt
    waves: dict[int, dict[str, int]]
    seconds: float | None  # from start to completion, as the run recorded them


async def outcome(db: Database, run_id: str) -> Outcome:
    async with db.transaction() as session:
        run = await service.get(session, run_id)
        numbers = await service.progress(session, run, utcnow())
        retried = (
            await session.execute(
                select(func.count()).where(RunAccount.run_id == run_id, RunAccount.attempts > 1)
            )
        ).scalar_one()
    seconds = None
    if run.started_at is not None and run.finished_at is not None:
        seconds = (run.finished_at - run.started_at).total_seconds()
    return Outcome(
        state=run.state,
        halted_reason=run.halted_reason,
        total=run.total,
        by_state=numbers.by_state,
        retried=int(retried),
        waves=numbers.waves,
        seconds=seconds,
    )


async def state_hashes(db: Database, at: datetime) -> dict[str, str]:
    """Every account's state hash (``state_hash``), to compare after the run."""
    return {state["account"]["id"]: state_hash(state) async for state in account_states(db, at=at)}


@dataclass
class Verification:
    """Every account checked: each migrated one against the state its migration expected,
    every other one against its state before the run."""

    migrated: int = 0
    unchanged: int = 0
    #: account id → what differs
    problems: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify_every_account(
    db: Database, run_id: str, before: Mapping[str, str], at: datetime
) -> Verification:
    """Check every account: a migrated one against its migration's expected state
    (``service.verify_sample`` over all of them), any other — not in the run, or skipped,
    held, quarantined by it — against its state hash from ``before``."""
    async with db.transaction() as session:
        migrated_ids = set(
            (
                await session.execute(
                    select(RunAccount.account_id).where(
                        RunAccount.run_id == run_id, RunAccount.state == AccountState.MIGRATED
                    )
                )
            ).scalars()
        )
    result = Verification()
    if migrated_ids:
        for item in await service.verify_sample(db, run_id, len(migrated_ids)):
            result.migrated += 1
            if item.problems:
                result.problems[item.account_id] = item.problems
    seen = set()
    async for state in account_states(db, at=at):
        account_id = state["account"]["id"]
        seen.add(account_id)
        if account_id in migrated_ids:
            continue
        if account_id not in before:
            result.problems[account_id] = ["an account the run did not start with"]
        elif state_hash(state) != before[account_id]:
            result.problems[account_id] = ["changed, but the run did not migrate it"]
        else:
            result.unchanged += 1
    for account_id in sorted(set(before) - seen):
        result.problems[account_id] = ["gone after the run"]
    return result
