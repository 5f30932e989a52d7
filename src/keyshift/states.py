"""A migration's states, its steps and the outcomes its ledger records, defined once.

The values are exactly the strings stored in ``migrations.state``, ``migration_ledger.step``
and ``migration_ledger.outcome`` and shown in API bodies, so the database, the API and the
docs do not change; a ``StrEnum`` member compares equal to its string, so SQL filters and
``in`` checks work unchanged.

Why here, at the top of the package and not in ``migration/``: ``accounts`` (refusing admin
changes while a migration is in flight) and ``metering`` (usage before a cutover) need the
named sets but sit below ``migration`` in the layers, and the planner — which names the
steps — may import no database code, so neither ``migration/`` nor ``db/`` can hold it.
Like ``keyshift.errors`` it is pure vocabulary (stdlib only), importable from every layer.
"""

from __future__ import annotations

from enum import StrEnum


class MigrationState(StrEnum):
    """Where one migration is (``migrations.state``)."""

    QUEUED = "queued"  # waits behind a scheduled change; planned when taken up
    SCHEDULED = "scheduled"  # takes effect later; holds the account
    HELD = "held"  # came due but its plan changed; waits for approval
    LOCKED = "locked"
    SNAPSHOTTED = "snapshotted"
    PREPARED = "prepared"
    CUTOVER = "cutover"
    VERIFIED = "verified"
    COMPLETED = "completed"
    FINALIZED = "finalized"  # completed, its snapshot dropped: no rollback any more
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"
    CANCELLED = "cancelled"
    FAILED = "failed"


S = MigrationState

#: Waiting to start: not yet locked, may be cancelled (``queued`` does not hold the account).
WAITING: frozenset[MigrationState] = frozenset({S.QUEUED, S.SCHEDULED, S.HELD})
#: The steps still have work to do; admin changes to the account are refused.
IN_FLIGHT: frozenset[MigrationState] = frozenset(
    {S.LOCKED, S.SNAPSHOTTED, S.PREPARED, S.CUTOVER, S.VERIFIED}
)
#: The migration holds its account: ``lock_account_id`` is set (its UNIQUE constraint is the
#: one-migration-per-account guarantee).
HOLDING: frozenset[MigrationState] = frozenset({S.SCHEDULED, S.HELD}) | IN_FLIGHT
#: Holding but not started: a new migration may replace or queue behind it.
REPLACEABLE: frozenset[MigrationState] = HOLDING - IN_FLIGHT
#: The account has been switched to the target plan (the cutover step is done).
CUT_OVER: frozenset[MigrationState] = frozenset({S.CUTOVER, S.VERIFIED, S.COMPLETED, S.FINALIZED})
#: Rollback can still restore the snapshot.
REVERSIBLE: frozenset[MigrationState] = IN_FLIGHT | {S.COMPLETED}
#: Ended without changing the account for good.
SETTLED: frozenset[MigrationState] = frozenset({S.ROLLED_BACK, S.REFUSED, S.CANCELLED, S.FAILED})


class Step(StrEnum):
    """A ledger step (``migration_ledger.step``)."""

    LOCK = "lock"
    SNAPSHOT = "snapshot"
    PREPARE = "prepare"
    CUTOVER = "cutover"
    VERIFY = "verify"
    RECEIPT = "receipt"
    ROLLBACK = "rollback"
    FINALIZE = "finalize"


#: The forward steps, in order.
STEPS: tuple[Step, ...] = (
    Step.LOCK,
    Step.SNAPSHOT,
    Step.PREPARE,
    Step.CUTOVER,
    Step.VERIFY,
    Step.RECEIPT,
)


class StepOutcome(StrEnum):
    """What a ledger row records of its step (``migration_ledger.outcome``)."""

    DONE = "done"
    FAILED = "failed"
    REFUSED = "refused"
    INEXACT = "inexact"  # a rollback that could not restore everything exactly
