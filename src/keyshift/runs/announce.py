"""Announcing a run to its customers: a ``scheduled`` notice for every account the dry run
says the run migrates, with the date and what changes for that account (planned again from
the same rules, as the report planned it), sent ``lead_days`` before the date.

Written in chunks, one transaction each, as the report is; each notice's key names the run,
the date and the account, so announcing again for the same date writes nothing twice, and
announcing a new date cancels the notices of the old one that are not sent yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from keyshift.audit import service as audit
from keyshift.context import Actor
from keyshift.dates import rfc3339
from keyshift.db.engine import Database
from keyshift.db.tables import RunAccount
from keyshift.db.types import utcnow
from keyshift.errors import InvalidInput, KeyshiftError, Unavailable
from keyshift.migration.notices import changes_of
from keyshift.migration.rules import MigrationRules
from keyshift.notices import outbox
from keyshift.notices.kinds import NoticeKind
from keyshift.runs import service
from keyshift.runs.model import RunState, WrongRunState

#: A run is announced after its dry run and before it starts.
ANNOUNCEABLE: frozenset[RunState] = frozenset({RunState.REPORTED, RunState.APPROVED})
#: The report's verdict of an account the run will move.
MIGRATES = "migrate"
CHUNK = 500


@dataclass(frozen=True)
class Announcement:
    run_id: str
    on: datetime
    send_at: datetime
    notices: int


async def _check(
    db: Database, run_id: str, on: datetime, now: datetime
) -> tuple[str, MigrationRules]:
    if on.tzinfo is None:
        raise InvalidInput("the date needs a time zone (e.g. a trailing Z)", field="on")
    if on <= now:
        raise InvalidInput(f"{rfc3339(on)} is not in the future", field="on")
    async with db.transaction() as session:
        run = await service.get(session, run_id)
        if run.state not in ANNOUNCEABLE:
            raise WrongRunState(
                f"run {run_id} is {run.state}; it is announced when reported or approved",
                field="state",
            )
        return run.name, await service.rules_of(session, run)


async def announce(
    db: Database,
    actor: Actor,
    run_id: str,
    on: datetime,
    *,
    lead_days: int,
    clock: Callable[[], datetime] = utcnow,
) -> Announcement:
    """Write the run's ``scheduled`` notices for ``on``, due ``lead_days`` before it. A
    refusal (a date not in the future, a run not reported or approved) is audited."""
    now = clock()
    try:
        name, rules = await _check(db, run_id, on, now)
    except KeyshiftError as error:
        if isinstance(error, Unavailable):
            raise
        async with db.transaction() as session:
            await audit.record(
                session,
                actor,
                "run.announce.refused",
                "run",
                run_id[:200],
                details={"code": error.code, "field": error.field, "reason": error.message},
            )
        raise
    about = f"{run_id}@{rfc3339(on)}"
    send_at = on - timedelta(days=lead_days)
    planner = service.Planner(rules)
    written, after = 0, -1
    while True:
        async with db.transaction() as session:
            rows = (
                await session.execute(
                    select(RunAccount.account_id, RunAccount.position)
                    .where(
                        RunAccount.run_id == run_id,
                        RunAccount.verdict == MIGRATES,
                        RunAccount.position > after,
                    )
                    .order_by(RunAccount.position)
                    .limit(CHUNK)
                )
            ).all()
            if not rows:
                break
            plans = await planner.plans(session, [a for a, _ in rows], now)
            notices: list[dict[str, Any]] = []
            for account_id, _ in rows:
                plan = plans[account_id]
                if plan is None or not plan.can_apply:
                    continue
                notices.append(
                    outbox.notice(
                        NoticeKind.SCHEDULED,
                        account_id,
                        now=now,
                        about=about,
                        run_id=run_id,
                        due=send_at,
                        payload={
                            "run_id": run_id,
                            "run_name": name,
                            "from_plan": plan.source_ref,
                            "to_plan": plan.target_ref,
                            "date": rfc3339(on),
                            "changes": changes_of(plan),
                        },
                    )
                )
            await outbox.write(session, notices)
            written += len(notices)
            after = rows[-1][1]
    async with db.transaction() as session:
        # An earlier announcement's unsent notices: their date no longer holds.
        await outbox.cancel_other(session, run_id=run_id, kind=NoticeKind.SCHEDULED, keep=about)
        await audit.record(
            session,
            actor,
            "run.announce",
            "run",
            run_id,
            details={"on": rfc3339(on), "send_at": rfc3339(send_at), "notices": written},
        )
    return Announcement(run_id, on, send_at, written)
