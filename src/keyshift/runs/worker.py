"""A worker: claims batches of a running run's accounts and migrates them.

Claims take the rows with ``FOR UPDATE SKIP LOCKED`` (two workers never take the same row)
and a time-limited lease, renewed while the batch is worked; a dead worker's rows are taken
again once its lease has run out. The migration of each account is the one-account engine
(``Executor``): its ledger makes every step idempotent, so an account taken again after a
crash is resumed, never migrated twice. Each account is planned again when it is taken; one
whose outcome differs from the approved report is held for review. An account that fails is
retried (alone) up to ``max_attempts`` times, then quarantined while the run goes on. A run
rolled back as a whole goes back through its accounts newest first, a batch at a time
(``rollback_many``); an account whose rollback is refused is quarantined at once.

Transient database errors (lost connection, a restart, deadlocks) are retried with
exponential backoff and jitter (tenacity); SIGTERM finishes the batch in hand (under a rate
limit, the account in hand) and releases the rest of the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import case, func, or_, select, update
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from keyshift.audit import service as audit
from keyshift.context import Actor
from keyshift.db.sql import among
from keyshift.db.tables import Migration, MigrationRun, RunAccount
from keyshift.errors import AccountNotFound, KeyshiftError, Unavailable
from keyshift.migration import rollback as migration_rollback
from keyshift.migration.errors import MigrationBlocked, NotEligible, OutcomeChanged
from keyshift.migration.executor import Executor
from keyshift.migration.rules import MigrationRules
from keyshift.observability import tracing
from keyshift.runs import metrics as run_metrics
from keyshift.runs import service
from keyshift.runs.model import (
    CLAIMABLE,
    AccountState,
    Phase,
    RunOptions,
    RunState,
    failure_rate_exceeded,
)
from keyshift.states import IN_FLIGHT, REVERSIBLE, WAITING, MigrationState, Step

log = logging.getLogger("keyshift.runs.worker")

#: How long a worker keeps retrying a database that is down before it gives up on a batch
#: (its lease then lets another worker, or itself later, take the rows again).
OUTAGE_PATIENCE = 120.0


@dataclass
class Claim:
    run_id: str
    phase: Phase
    options: RunOptions
    rules_hash: str
    batch_id: str
    wave: int
    #: (account id, expected outcome digest, the earliest moment it may start)
    accounts: list[tuple[str, str | None, datetime]]
    lease_until: datetime
    cutoff_at: datetime | None = None


@dataclass
class Worker:
    """One worker process's loop. ``clock`` is the time source (tests move it)."""

    executor: Executor
    actor: Actor
    worker_id: str = field(default_factory=service.new_worker_id)
    poll_seconds: float = 1.0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _rules: dict[str, MigrationRules] = field(default_factory=dict)
    processed: int = 0

    @property
    def db(self) -> Any:
        return self.executor.db

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.executor.clock

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, *, run_id: str | None = None, until_idle: bool = False) -> int:
        """Work until stopped — or, with ``until_idle``, until there is nothing to claim and
        no run (or only ``run_id``) is still running. Returns the accounts processed."""
        while not self.stopping.is_set():
            claim = await self._retrying(lambda: self.claim(run_id=run_id))
            if claim is None:
                for rid in await self._running_runs(run_id):
                    await self._retrying(
                        partial(service.complete_if_done, self.db, self.actor, rid, self.clock())
                    )
                if until_idle and not await self._has_work(run_id):
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.poll_seconds)
                continue
            await self.work(claim)
            # Whether the run is done is a count over all its accounts: after every batch it
            # made a run's cost grow with the square of its size. A full batch says the queue
            # had more (the next claim, finding none, completes the run); a short one, or a
            # worker about to stop, looks now.
            if len(claim.accounts) < claim.options.batch_size or self.stopping.is_set():
                await self._retrying(
                    partial(
                        service.complete_if_done, self.db, self.actor, claim.run_id, self.clock()
                    )
                )
        return self.processed

    async def _retrying(self, call: Callable[[], Any]) -> Any:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((Unavailable, ConnectionError, OSError)),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.5),
            stop=stop_after_delay(OUTAGE_PATIENCE),
            reraise=True,
        ):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    log.warning(
                        "retrying after a database error",
                        extra={
                            "worker": self.worker_id,
                            "attempt": attempt.retry_state.attempt_number,
                        },
                    )
                return await call()
        return None  # pragma: no cover - reraise=True

    async def _running_runs(self, run_id: str | None) -> list[str]:
        async with self.db.transaction() as session:
            query = select(MigrationRun.id).where(MigrationRun.state.in_(list(CLAIMABLE)))
            if run_id is not None:
                query = query.where(MigrationRun.id == run_id)
            return list((await session.execute(query)).scalars())

    async def _has_work(self, run_id: str | None) -> bool:
        return bool(await self._retrying(lambda: self._running_runs(run_id)))

    # -- claiming ------------------------------------------------------------------------------

    async def claim(self, *, run_id: str | None = None) -> Claim | None:
        """Take up to a batch of accounts of the oldest running run that has any to give
        (in its window), in claim order: the lowest unfinished wave, then priority."""
        now = self.clock()
        async with self.db.transaction() as session:
            query = (
                select(MigrationRun)
                .where(MigrationRun.state.in_(list(CLAIMABLE)))
                .order_by(MigrationRun.created_at)
            )
            if run_id is not None:
                query = query.where(MigrationRun.id == run_id)
            for run in (await session.execute(query)).scalars():
                options = RunOptions.model_validate(run.options)
                rollback = run.phase == Phase.ROLLBACK
                if not rollback and options.window and not options.window.contains(now):
                    continue
                picked = await self._pick(session, run, options, now, rollback=rollback)
                if not picked:
                    continue
                wave, ids = picked
                starts = await self._pace(session, run, options, len(ids), now)
                batch_id = str(uuid.uuid4())
                lease = now + timedelta(seconds=options.lease_seconds)
                await session.execute(
                    update(RunAccount)
                    .where(
                        RunAccount.run_id == run.id,
                        among(session, RunAccount.account_id, [i for i, _ in ids]),
                    )
                    .values(
                        state=AccountState.CLAIMED,
                        batch_id=batch_id,
                        lease_owner=self.worker_id,
                        lease_expires_at=lease,
                        updated_at=now,
                    )
                )
                return Claim(
                    run_id=run.id,
                    phase=Phase(run.phase),
                    options=options,
                    rules_hash=run.rules_hash,
                    batch_id=batch_id,
                    wave=wave,
                    accounts=[(a, d, s) for (a, d), s in zip(ids, starts, strict=True)],
                    lease_until=lease,
                    cutoff_at=run.cutoff_at,
                )
        return None

    async def _pick(
        self, session: Any, run: MigrationRun, options: RunOptions, now: datetime, *, rollback: bool
    ) -> tuple[int, list[tuple[str, str | None]]] | None:
        lapsed = (RunAccount.state == AccountState.CLAIMED) & (RunAccount.lease_expires_at < now)
        if rollback:
            query = (
                select(RunAccount.account_id, RunAccount.expected_digest)
                .where(
                    RunAccount.run_id == run.id,
                    or_(
                        RunAccount.state.in_(
                            [AccountState.MIGRATED, AccountState.PREPARED, AccountState.SCHEDULED]
                        ),
                        lapsed,
                    ),
                )
                # Newest first: the reverse of the order they were moved in.
                .order_by(RunAccount.done_at.desc(), RunAccount.position.desc())
            )
            wave = -1
        else:
            wave = (
                await session.execute(
                    select(func.min(RunAccount.wave)).where(
                        RunAccount.run_id == run.id,
                        RunAccount.state.in_([AccountState.PENDING, AccountState.CLAIMED]),
                    )
                )
            ).scalar_one_or_none()
            if wave is None:
                return None
            query = (
                select(RunAccount.account_id, RunAccount.expected_digest)
                .where(
                    RunAccount.run_id == run.id,
                    RunAccount.wave == wave,
                    or_(RunAccount.state == AccountState.PENDING, lapsed),
                )
                .order_by(RunAccount.priority.desc(), RunAccount.position)
            )
        rows = (
            await session.execute(query.limit(options.batch_size).with_for_update(skip_locked=True))
        ).all()
        if not rows:
            return None
        return wave, [(r[0], r[1]) for r in rows]

    async def _pace(
        self, session: Any, run: MigrationRun, options: RunOptions, count: int, now: datetime
    ) -> list[datetime]:
        """When each claimed account may start, under the run's rate shared by every worker:
        the run row keeps the next free moment (a generic cell rate algorithm)."""
        if options.rate is None:
            return [now] * count
        locked = await service.get(session, run.id, lock=True)
        cursor = locked.rate_cursor
        if cursor is not None and cursor.tzinfo is None:
            cursor = cursor.replace(tzinfo=now.tzinfo)
        start = max(cursor or now, now)
        step = timedelta(seconds=1 / options.rate)
        locked.rate_cursor = start + step * count
        return [start + step * i for i in range(count)]

    # -- working a batch -----------------------------------------------------------------------

    @tracing.observed_run_batch
    async def work(self, claim: Claim) -> None:
        """Work the batch: forward phases as one batch through the executor (each step one
        transaction over the batch), a rollback as one batch through ``rollback_many`` — or,
        under a rate limit, in batches of one at their paced moments. Stop early (releasing
        the rest) when asked to stop, or when the run left the state the batch was claimed
        in. The lease is renewed all the while (``_heartbeat``); a database that stays down
        past our patience leaves the rest of the batch to its lease."""
        ended = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(claim, ended))
        try:
            await self._work(claim)
        except Unavailable:
            log.error("database unavailable; leaving the batch to its lease")
        finally:
            ended.set()
            await heartbeat

    async def _work(self, claim: Claim) -> None:
        rules = await self._retrying(partial(self._rules_for, claim.rules_hash))
        paced = claim.options.rate is not None
        groups = [[item] for item in claim.accounts] if paced else [list(claim.accounts)]
        for index, group in enumerate(groups):
            if self.stopping.is_set() or not await self._retrying(
                partial(self._still_running, claim)
            ):
                rest = [a for g in groups[index:] for a, _, _ in g]
                await self._retrying(partial(self._release, rest, claim))
                return
            delay = (group[0][2] - self.clock()).total_seconds()
            if delay > 0:
                await asyncio.sleep(delay)
            if claim.phase == Phase.ROLLBACK:
                ids = [a for a, _, _ in group]
                await self._retrying(partial(self._backward, claim, ids))
            else:
                pairs = [(a, expected) for a, expected, _ in group]
                await self._retrying(partial(self._forward, claim, rules, pairs))
            self.processed += len(group)

    async def _forward(
        self, claim: Claim, rules: MigrationRules, pairs: list[tuple[str, str | None]]
    ) -> None:
        """Migrate (or prepare, or flip) a batch: accounts this run already started are
        resumed from their ledger, the others are locked together (each planned against its
        approved outcome digest), then every one is driven through the remaining steps as one
        batch. Safe to call again after any failure: what committed is found and resumed."""
        until = Step.PREPARE if claim.phase == Phase.PREPARE else None
        ids = [a for a, _ in pairs]
        async with self.db.transaction() as session:
            existing = {m.account_id: m for m in await _run_migrations(session, claim.run_id, ids)}
        outcomes: dict[str, tuple[AccountState | None, str | None, str | None]] = {}
        to_run: list[str] = []
        fresh: list[tuple[str, str | None]] = []
        locked: dict[str, Migration | KeyshiftError] = {}
        for account_id, expected in pairs:
            row = existing.get(account_id)
            if row is not None and row.state in IN_FLIGHT:
                if claim.phase == Phase.FLIP and claim.cutoff_at is not None:
                    await self._stamp_cutoff(row.id, claim.cutoff_at)
                to_run.append(row.id)
            elif row is not None and row.state == MigrationState.COMPLETED:
                outcomes[account_id] = _outcome(row)
            else:
                fresh.append((account_id, expected))
        prepared: list[str] = []
        if fresh:
            # Locked, snapshotted and staged in one transaction (nothing the app reads
            # changes before the cutover); the rest of the way as one batch below.
            locked = await self.executor.request_many(
                self.actor, rules, fresh, run_id=claim.run_id, through=Step.PREPARE
            )
            for account_id, result in locked.items():
                if isinstance(result, KeyshiftError):
                    outcomes[account_id] = _refusal(result)
                elif result.state == MigrationState.PREPARED and until is None:
                    prepared.append(result.id)
                else:
                    outcomes[account_id] = _outcome(result)
                    self.executor.forget([result.id])  # no next phase in this batch
        account_of = {m.id: m.account_id for m in existing.values()}
        account_of.update(
            {r.id: r.account_id for r in locked.values() if not isinstance(r, KeyshiftError)}
        )
        resumed: list[tuple[list[str], Step | None]] = [(to_run, None), (prepared, Step.PREPARE)]
        for migration_ids, after in resumed:
            if not migration_ids:
                continue
            ran = await self.executor.run_batch(
                self.actor, migration_ids, until=until, after=after, outcome_only=True
            )
            for migration_id, result in ran.items():
                if isinstance(result, KeyshiftError):
                    outcomes[account_of[migration_id]] = (None, result.message, migration_id)
                else:
                    outcomes[result.account_id] = _outcome(result)
        await self._settle_many(claim, outcomes)

    async def _backward(self, claim: Claim, account_ids: list[str]) -> None:
        """Roll a batch back: every migration this run made of each account, newest first —
        rolled back if it ran (refused if it was finalized), cancelled if it waits — each
        account's newest ones together (``rollback_many``, ``cancel_many``: one transaction
        each), then the next newest, if any. The accounts go in the order claimed (newest
        first). An account whose rollback is refused is quarantined with its error while its
        neighbours are rolled back. Safe to call again after any failure: what is rolled back
        (or cancelled) stays so."""
        async with self.db.transaction() as session:
            found = await session.execute(
                select(Migration.account_id, Migration.id, Migration.state)
                .where(
                    Migration.run_id == claim.run_id,
                    among(session, Migration.account_id, account_ids),
                )
                .order_by(Migration.created_at.desc(), Migration.id)
            )
            newest: dict[str, list[tuple[str, str]]] = {a: [] for a in account_ids}
            for account_id, migration_id, state in found:
                newest[account_id].append((migration_id, state))
        reason = f"run {claim.run_id} rolled back"
        errors: dict[str, str] = {}
        for depth in range(max(map(len, newest.values()), default=0)):
            turn = {
                account_id: rows[depth]
                for account_id, rows in newest.items()
                if len(rows) > depth and account_id not in errors
            }
            back = [m for m, state in turn.values() if state in _TO_ROLL_BACK]
            waiting = [m for m, state in turn.values() if state in WAITING]
            results: dict[str, Migration | KeyshiftError] = {}
            if back:
                results |= await migration_rollback.rollback_many(
                    self.executor, self.actor, back, reason=reason
                )
            if waiting:
                results |= await migration_rollback.cancel_many(self.executor, self.actor, waiting)
            for account_id, (migration_id, _) in turn.items():
                if isinstance(result := results.get(migration_id), KeyshiftError):
                    errors[account_id] = result.message
        outcomes: dict[str, tuple[AccountState | None, str | None, str | None]] = {}
        for account_id, rows in newest.items():
            latest = rows[0][0] if rows else None
            if account_id in errors:
                outcomes[account_id] = (None, errors[account_id], latest)
            else:
                outcomes[account_id] = (AccountState.ROLLED_BACK, None, latest)
        await self._settle_many(claim, outcomes)

    async def _stamp_cutoff(self, migration_id: str, cutoff: datetime) -> None:
        """Blue-green: the run's cutoff is the effective time on the receipt."""
        async with self.db.transaction() as session:
            await session.execute(
                update(Migration)
                .where(Migration.id == migration_id, Migration.state == MigrationState.PREPARED)
                .values(effective_at=cutoff)
            )

    async def _rules_for(self, digest: str) -> MigrationRules:
        if digest not in self._rules:
            from keyshift.migration.executor import rules_by_hash

            async with self.db.transaction() as session:
                self._rules[digest] = await rules_by_hash(session, digest)
        return self._rules[digest]

    async def _still_running(self, claim: Claim) -> bool:
        async with self.db.transaction() as session:
            state, phase = (
                await session.execute(
                    select(MigrationRun.state, MigrationRun.phase).where(
                        MigrationRun.id == claim.run_id
                    )
                )
            ).one()
        return state in CLAIMABLE and phase == claim.phase

    async def _heartbeat(self, claim: Claim, ended: asyncio.Event) -> None:
        """Renew the claim's lease every third of it until ``ended``: a batch that takes
        longer than its lease (a slow database, a long outage of a step) is not taken over by
        another worker while this one is alive and working it. A renewal that fails is tried
        again at the next beat; the lease covers two of them."""
        every = claim.options.lease_seconds / 3
        while not ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), every)
                return
            try:
                await self._renew(claim)
            except (Unavailable, ConnectionError, OSError) as error:
                log.warning("could not renew a lease: %s", error, extra={"worker": self.worker_id})

    async def _renew(self, claim: Claim) -> None:
        now = self.clock()
        claim.lease_until = now + timedelta(seconds=claim.options.lease_seconds)
        # SKIP LOCKED: rows being settled are not waited for (nor deadlocked with: a settle
        # locks them in account order, an UPDATE in whatever order it finds them).
        held = (
            select(RunAccount.account_id)
            .where(
                RunAccount.run_id == claim.run_id,
                RunAccount.batch_id == claim.batch_id,
                RunAccount.state == AccountState.CLAIMED,
            )
            .with_for_update(skip_locked=True)
        )
        async with self.db.transaction() as session:
            await session.execute(
                update(RunAccount)
                .where(RunAccount.run_id == claim.run_id, RunAccount.account_id.in_(held))
                .values(lease_expires_at=claim.lease_until)
            )

    async def _release(self, account_ids: list[str], claim: Claim) -> None:
        """Give claimed rows back (SIGTERM, a pause): pending again, or — in a rollback — as
        they were, which their migrations tell."""
        if not account_ids:
            return
        async with self.db.transaction() as session:
            back: dict[AccountState, list[str]] = {}
            if claim.phase == Phase.ROLLBACK:
                latest = {
                    m.account_id: m
                    for m in await _run_migrations(session, claim.run_id, account_ids)
                }
                for account_id in account_ids:
                    state = _forward_state(latest.get(account_id))
                    back.setdefault(state, []).append(account_id)
            else:
                back[AccountState.PENDING] = list(account_ids)
            for state, ids in back.items():  # one statement per state given back
                await session.execute(
                    update(RunAccount)
                    .where(
                        RunAccount.run_id == claim.run_id,
                        among(session, RunAccount.account_id, sorted(ids)),
                        RunAccount.batch_id == claim.batch_id,
                        RunAccount.state == AccountState.CLAIMED,
                    )
                    .values(state=state, lease_owner=None, lease_expires_at=None)
                )

    # -- outcomes ------------------------------------------------------------------------------

    @tracing.observed_settle
    async def _settle_many(
        self,
        claim: Claim,
        outcomes: dict[str, tuple[AccountState | None, str | None, str | None]],
    ) -> None:
        """Record the accounts' outcomes in one transaction — each only if this worker still
        holds it (else the lease ran out and another worker's outcome counts) — counting the
        attempt, quarantining after too many, and halting the run when its wave fails too often
        or its canary's verification found a difference."""
        now = self.clock()
        async with self.db.transaction() as session:
            rows = (
                (
                    await session.execute(
                        select(RunAccount)
                        .where(
                            RunAccount.run_id == claim.run_id,
                            among(session, RunAccount.account_id, sorted(outcomes)),
                            RunAccount.batch_id == claim.batch_id,
                            RunAccount.state == AccountState.CLAIMED,
                        )
                        .order_by(RunAccount.account_id)
                        .with_for_update()
                    )
                )
                .scalars()
                .all()
            )
            first_failure: tuple[str, str] | None = None
            for row in rows:
                state, error, migration_id = outcomes[row.account_id]
                _apply_outcome(row, claim, state, error, migration_id, now)
                if state is None and first_failure is None:
                    first_failure = (row.account_id, error or "")
            settled = [
                run_metrics.outcome_of(r.state, outcomes[r.account_id][0] is None) for r in rows
            ]
            await session.flush()
            if first_failure is not None and claim.phase != Phase.ROLLBACK:
                await self._maybe_halt(session, claim, *first_failure, now)
        run_metrics.count_settled(claim.run_id, settled)

    async def _settle(
        self,
        claim: Claim,
        account_id: str,
        state: AccountState | None,
        error: str | None,
        migration_id: str | None,
    ) -> None:
        """One account's outcome (``_settle_many`` of one)."""
        await self._settle_many(claim, {account_id: (state, error, migration_id)})

    async def _maybe_halt(
        self, session: Any, claim: Claim, account_id: str, error: str, now: datetime
    ) -> None:
        canary = claim.wave == 0 and (claim.options.canary or claim.options.canary_percent)
        reason = None
        if canary and "verification failed" in error:
            reason = (
                f"the canary's verification found a difference on account {account_id}: {error}"
            )
        else:
            tried, failed = (
                await session.execute(
                    select(
                        func.count(),
                        # Accounts whose last attempt failed: not one held or skipped by
                        # design (they carry the reason as their error), nor one that failed
                        # once and then migrated.
                        func.coalesce(func.sum(case((_LAST_ATTEMPT_FAILED, 1), else_=0)), 0),
                    ).where(
                        RunAccount.run_id == claim.run_id,
                        RunAccount.wave == claim.wave,
                        RunAccount.attempts > 0,
                    )
                )
            ).one()
            if failure_rate_exceeded(int(tried), int(failed), claim.options):
                reason = (
                    f"wave {claim.wave}: {failed} of {tried} accounts failed, over the"
                    f" threshold of {claim.options.failure_threshold:.0%}"
                )
        if reason is None:
            return
        run = await service.get(session, claim.run_id, lock=True)
        if run.state != RunState.RUNNING:
            return
        run.state, run.halted_reason, run.updated_at = RunState.PAUSED, reason, now
        await audit.record(
            session,
            self.actor,
            "run.halt",
            "run",
            run.id,
            details={"reason": reason, "from": RunState.RUNNING, "to": RunState.PAUSED},
        )


def _forward_state(latest: Migration | None) -> AccountState:
    """Where a rollback's account goes back to, by its latest migration in the run."""
    if latest is None or latest.state in (
        MigrationState.ROLLED_BACK,
        MigrationState.CANCELLED,
        MigrationState.REFUSED,
        MigrationState.FAILED,
    ):
        return AccountState.ROLLED_BACK
    if latest.state == MigrationState.PREPARED:
        return AccountState.PREPARED
    if latest.state in WAITING:
        return AccountState.SCHEDULED
    return AccountState.MIGRATED


#: The states of a migration a run's rollback sends to ``rollback_many``: those that moved the
#: account (a finalized one is refused there, and its account quarantined with the error).
_TO_ROLL_BACK = REVERSIBLE | {MigrationState.FINALIZED}

#: A run account whose last attempt failed: back in the queue, taken again, or quarantined.
_LAST_ATTEMPT_FAILED = RunAccount.error.is_not(None) & RunAccount.state.in_(
    [AccountState.PENDING, AccountState.CLAIMED, AccountState.QUARANTINED]
)


def _apply_outcome(
    row: RunAccount,
    claim: Claim,
    state: AccountState | None,
    error: str | None,
    migration_id: str | None,
    now: datetime,
) -> None:
    """Count the attempt; a failed one goes back to the queue (to be retried alone) or, after
    ``max_attempts`` (in a rollback, at once), is quarantined."""
    row.attempts += 1
    row.migration_id = migration_id or row.migration_id
    row.lease_owner, row.lease_expires_at, row.updated_at = None, None, now
    if state is None:
        row.error = error
        # A refused rollback (finalized by hand, a later migration stands …) does not go away
        # by trying again, and a rollback takes no pending account: a person looks at it.
        quarantine = claim.phase == Phase.ROLLBACK or row.attempts >= claim.options.max_attempts
        row.state = AccountState.QUARANTINED if quarantine else AccountState.PENDING
        if quarantine:
            row.done_at = now
    else:
        row.state, row.done_at = state, now
        if state in (AccountState.HELD, AccountState.SKIPPED):
            row.error = error


def _refusal(error: KeyshiftError) -> tuple[AccountState | None, str | None, str | None]:
    """What a refused lock step means for the account: a changed outcome is held, one that
    is not eligible (or blocked, or gone) is skipped; anything else is a failed attempt."""
    if isinstance(error, OutcomeChanged):
        return AccountState.HELD, error.message, None
    if isinstance(error, NotEligible | MigrationBlocked | AccountNotFound):
        return AccountState.SKIPPED, error.message, None
    return None, error.message, None


async def _run_migrations(session: Any, run_id: str, account_ids: list[str]) -> list[Migration]:
    """Each account's latest migration made by this run (accounts with none are left out)."""
    rows = (
        (
            await session.execute(
                select(Migration)
                .where(
                    Migration.run_id == run_id, among(session, Migration.account_id, account_ids)
                )
                .order_by(Migration.created_at)
                .execution_options(populate_existing=True)
            )
        )
        .scalars()
        .all()
    )
    latest: dict[str, Migration] = {}
    for row in rows:
        latest[row.account_id] = row  # ordered by creation: the last one wins
    return list(latest.values())


def _outcome(row: Migration) -> tuple[AccountState | None, str | None, str | None]:
    match row.state:
        case MigrationState.COMPLETED | MigrationState.FINALIZED:
            return AccountState.MIGRATED, None, row.id
        case MigrationState.PREPARED:
            return AccountState.PREPARED, None, row.id
        case MigrationState.SCHEDULED | MigrationState.QUEUED | MigrationState.HELD:
            return AccountState.SCHEDULED, None, row.id
        case MigrationState.REFUSED:
            return AccountState.SKIPPED, row.error, row.id
    return None, row.error or f"the migration ended {row.state}", row.id


#: The collector's thresholds in a worker (``tune_collector``): a young collection every
#: 50,000 net allocations instead of 700, and older ones as rarely in proportion.
COLLECTOR_THRESHOLDS = (50_000, 20, 100)


def tune_collector() -> None:
    """Set the garbage collector up for a worker's life: what the process holds once it has
    started (modules, tables, compiled statements) is frozen out of every collection, and
    young collections are made rarer. A batch allocates hundreds of thousands of short-lived
    containers (rows, states, plans, JSON documents) that reference counting frees; with the
    default thresholds they set off a full collection every second or so, each walking the
    whole heap: a third of a worker's CPU per account (1.76 → 1.16 ms measured with and
    without, docs/benchmarks.md), most of it showing up in whatever allocated when it struck
    — the JSON decoder, usually. Cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)
