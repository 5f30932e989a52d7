"""What runs tell Prometheus: the outcome label a settled account is counted under, and the
gauges ``/metrics`` reads from the run tables at scrape time (runs by state, queue depth by
priority lane, leases). The series themselves are defined in
``keyshift.observability.migration_metrics``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Label, and_, case, func, or_, select

from keyshift.db.engine import Database
from keyshift.db.tables import MigrationRun, RunAccount
from keyshift.db.types import utcnow
from keyshift.errors import KeyshiftError
from keyshift.observability import migration_metrics
from keyshift.observability.migration_metrics import RunGauges
from keyshift.runs.model import LISTED_PRIORITY, AccountState, Phase, RunState

log = logging.getLogger("keyshift.runs.metrics")

#: The outcome of an attempt that failed and put the account back in the queue.
FAILED = "failed"
#: Runs whose accounts are being (or about to be) worked: they get per-run gauges.
IN_PROGRESS: frozenset[RunState] = frozenset(
    {RunState.RUNNING, RunState.PAUSED, RunState.READY, RunState.ROLLING_BACK}
)
#: What a rollback still has to undo (the rollback phase's queue).
_TO_ROLL_BACK = (AccountState.MIGRATED, AccountState.PREPARED, AccountState.SCHEDULED)
#: How long a scrape waits for the database before saying it is down.
SCRAPE_TIMEOUT = 5.0


def outcome_of(new_state: str, attempt_failed: bool) -> str:
    """The outcome label of one settled attempt: the account's new state, except that a
    failed attempt that will be retried is ``failed`` (one that was the last is
    ``quarantined``, its new state)."""
    if attempt_failed and new_state != AccountState.QUARANTINED:
        return FAILED
    return new_state


def count_settled(run_id: str, outcomes: Iterable[str]) -> None:
    """Count the accounts a worker settled (after their transaction committed)."""
    migration_metrics.count_run_accounts(run_id, outcomes)


def _lane() -> Label[str]:
    """A run account's priority lane: ``listed`` (named in ``priority.ids``), ``attribute``
    (ranked by the priority attribute, a non-zero value) or ``default``."""
    return case(
        (RunAccount.priority == LISTED_PRIORITY, "listed"),
        (RunAccount.priority != 0, "attribute"),
        else_="default",
    ).label("lane")


async def _read(db: Database, now: datetime) -> RunGauges:
    async with db.transaction() as session:
        by_state = dict(
            (
                await session.execute(
                    select(MigrationRun.state, func.count()).group_by(MigrationRun.state)
                )
            ).all()
        )
        open_runs = (
            await session.execute(
                select(MigrationRun.id, MigrationRun.state, MigrationRun.phase).where(
                    MigrationRun.state.in_(list(IN_PROGRESS))
                )
            )
        ).all()
        forward = [r.id for r in open_runs if r.phase != Phase.ROLLBACK]
        backward = [r.id for r in open_runs if r.phase == Phase.ROLLBACK]
        queue: Counter[tuple[str, str]] = Counter()
        leases: Counter[tuple[str, str]] = Counter()
        if open_runs:
            # Index-friendly: (run_id, state) is the prefix of ix_run_accounts_queue, and only
            # the rows still to do (and the few claimed) are counted, not the settled ones.
            expired = case((RunAccount.lease_expires_at < now, "expired"), else_="held").label(
                "lease"
            )
            lane = _lane()
            rows = await session.execute(
                select(RunAccount.run_id, RunAccount.state, lane, expired, func.count())
                .where(
                    or_(
                        RunAccount.state == AccountState.CLAIMED,
                        and_(
                            RunAccount.run_id.in_(forward),
                            RunAccount.state == AccountState.PENDING,
                        ),
                        and_(
                            RunAccount.run_id.in_(backward),
                            RunAccount.state.in_(list(_TO_ROLL_BACK)),
                        ),
                    ),
                    RunAccount.run_id.in_(forward + backward),
                )
                .group_by(RunAccount.run_id, RunAccount.state, lane, expired)
            )
            for run_id, state, lane_name, lease, count in rows.all():
                if state == AccountState.CLAIMED:
                    leases[(run_id, lease)] += count
                else:
                    queue[(run_id, lane_name)] += count
    return RunGauges(
        runs={state.value: int(by_state.get(state.value, 0)) for state in RunState},
        run_states={r.id: r.state for r in open_runs},
        queue=dict(queue),
        leases=dict(leases),
    )


async def read_gauges(db: Database, now: datetime | None = None) -> RunGauges | None:
    """The run gauges now, or None when the database did not answer within
    ``SCRAPE_TIMEOUT`` (a scrape then reports ``keyshift_database_up 0``, never an error)."""
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT):
            return await _read(db, now or utcnow())
    except TimeoutError:
        log.warning("metrics: the database did not answer within %.0f s", SCRAPE_TIMEOUT)
        return None
    except (KeyshiftError, OSError):
        return None  # the database layer logs an outage once, not per scrape
