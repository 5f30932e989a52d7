"""The executor: performs migrations step by step over a batch (one account is a batch of
one), each step's ledger row committed in the transaction of its effect, so a process killed
anywhere leaves a state that ``run`` resumes. Rollback and finalize live in
``keyshift.migration.rollback``.

Steps: lock → snapshot → prepare → cutover → verify → receipt (``planner.STEPS``), in the
transactions ``PHASES`` groups them into.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import load_only

from keyshift.audit import service as audit
from keyshift.canonical import canonical_json
from keyshift.catalog import service as catalog
from keyshift.context import Actor
from keyshift.db import changes
from keyshift.db.engine import Database
from keyshift.db.sql import among
from keyshift.db.tables import (
    Activation,
    DataObject,
    License,
    Migration,
    MigrationRulesVersion,
    Subscription,
)
from keyshift.db.types import utcnow
from keyshift.errors import (
    AccountNotFound,
    InvalidInput,
    KeyshiftError,
    MigrationInProgress,
    NotFound,
    Unavailable,
)
from keyshift.migration import notices, repository
from keyshift.migration.batching import FAULT_ENV as FAULT_ENV  # the crash tests set it
from keyshift.migration.batching import fault_point, isolated
from keyshift.migration.errors import (
    MigrationBlocked,
    MigrationNotFound,
    NotEligible,
    OutcomeChanged,
    RulesInvalid,
    RulesVersionConflict,
)
from keyshift.migration.planner import CounterMove, MigrationPlan, plan_migration
from keyshift.migration.repository import MigrationRecord
from keyshift.migration.rollback import rollback_many
from keyshift.migration.rules import MigrationRules, PlanPair, check_against_catalog
from keyshift.migration.state import (
    ExpectedState,
    Snapshot,
    as_snapshot,
    differences,
    iso,
    parse_iso,
)
from keyshift.observability import tracing
from keyshift.observability.migration_metrics import observe_steps
from keyshift.security.signing import SigningKeys
from keyshift.states import IN_FLIGHT, REPLACEABLE, MigrationState, Step, StepOutcome
from keyshift.validation import cache as license_cache
from keyshift.validation import decide as policy
from keyshift.validation import service as validation

RUN_STEPS = (Step.SNAPSHOT, Step.PREPARE, Step.CUTOVER, Step.VERIFY, Step.RECEIPT)

#: The transactions ``run_batch`` drives a batch through. Every step keeps its own ledger row,
#: committed with its effect; steps share a transaction where nothing is gained by a commit
#: between them: the snapshot and the staging of copies change nothing the app reads (a crash
#: between them would only redo the snapshot), and the receipt certifies the verification it
#: follows. The cutover stands alone: verification reads what it committed. With a run's
#: lock step taking on the first phase (``request_many(through=…)``), a batch takes three
#: transactions instead of six — each carries the rows' locks, the ledger read and the
#: write-back.
PHASES: tuple[tuple[Step, ...], ...] = (
    (Step.SNAPSHOT, Step.PREPARE),
    (Step.CUTOVER,),
    (Step.VERIFY, Step.RECEIPT),
)

#: The steps a run's lock step may take on in its own transaction (``request_many``'s
#: ``through``): the first phase, which changes nothing the app reads.
LOCK_PHASE = PHASES[0]


class Flow(StrEnum):
    """What a step's handler tells ``run`` to do next."""

    NEXT = "next"
    STOP = "stop"
    VERIFY_FAILED = "verify_failed"


#: One step's work, given the locked migration row and the batch it is part of; it writes
#: the step's ledger row (``Batch.write_step``).
StepHandler = Callable[[AsyncSession, Actor, MigrationRecord, "Batch"], Awaitable[Flow]]


# -- rules and plans ----------------------------------------------------------------------------


async def plan_pair(session: AsyncSession, ref: str) -> PlanPair | None:
    try:
        plan, digest = await catalog.get_plan(session, ref)
        edition, _ = await catalog.get_edition(session, plan.plan.edition)
    except NotFound:
        return None
    return PlanPair(plan, digest, edition)


async def check_rules(session: AsyncSession, rules: MigrationRules) -> list[Any]:
    """Cross-check rules with the published catalog (problems; empty if they fit)."""
    sources = {ref: await plan_pair(session, ref) for ref in rules.rules.from_plans}
    return check_against_catalog(rules, sources, await plan_pair(session, rules.rules.to))


async def register_rules(
    session: AsyncSession, actor: Actor, rules: MigrationRules
) -> audit.EventIn | None:
    """Record the rules as used (immutable by key@version): inserted if absent, so parallel
    first uses of a new version all go ahead; ``RulesVersionConflict`` if the version was
    used before with other content. Returns the audit event to record if this call
    registered them — the caller appends it with its others, last (see ``Executor.request``)."""
    digest = rules.content_hash()
    key, version = rules.rules.key, rules.rules.version
    existing = (
        await session.execute(
            select(MigrationRulesVersion.content_hash).where(
                MigrationRulesVersion.key == key, MigrationRulesVersion.version == version
            )
        )
    ).scalar_one_or_none()
    if existing is None:
        inserted = await repository.insert_rules_if_absent(
            session,
            {
                "key": key,
                "version": version,
                "content_hash": digest,
                "content": rules.content(),
                "registered_at": utcnow(),
                "registered_by": actor.id,
            },
        )
        if inserted:
            return audit.EventIn(
                "migration.rules.register", "rules", rules.ref, None, {"hash": digest}
            )
        existing = (await repository.rules_version(session, key, version)).content_hash
    if existing != digest:
        raise RulesVersionConflict(
            f"rules {rules.ref} were used before with different content"
            f" ({existing[:12]}…); publish a new version",
            field="rules.version",
        )
    return None


async def rules_by_hash(session: AsyncSession, digest: str) -> MigrationRules:
    row = (
        (
            await session.execute(
                select(MigrationRulesVersion).where(MigrationRulesVersion.content_hash == digest)
            )
        )
        .scalars()
        .first()
    )
    if row is None:
        raise NotFound(f"no registered rules with hash {digest}")
    return MigrationRules.model_validate(row.content)


async def preview(
    session: AsyncSession,
    rules: MigrationRules,
    account_id: str,
    *,
    now: datetime,
    migration_id: str = "preview",
    batch: Batch | None = None,
) -> tuple[MigrationPlan, Snapshot]:
    """The plan for one account, from its state now; reads only. In a ``batch``, the state
    read ahead for the batch and the catalog lookups it already made are used."""
    snapshot = batch.states.get(account_id) if batch is not None else None
    if snapshot is None:
        snapshot = await repository.read_state(session, account_id, now)
    if snapshot is None:
        raise AccountNotFound(f"no account {account_id}", field="account_id")
    pairs = batch if batch is not None else Batch(session, now)
    problems = await pairs.check(rules)
    if problems:
        raise RulesInvalid(problems)
    target = await pairs.plan_pair(rules.rules.to)
    assert target is not None  # check_rules found it
    source = None
    sub = snapshot.get("subscription")
    if sub is not None:
        source = await pairs.plan_pair(sub["plan"])
    plan = plan_migration(snapshot, rules, source, target, migration_id=migration_id, now=now)
    return plan, snapshot


@dataclass
class Batch:
    """What one step over a batch of migrations shares inside its transaction: the states
    read ahead for every account in one query per table, the catalog and rules lookups (made
    once, not once per account), the steps each migration has in its ledger, and the ledger
    rows written, inserted together at the end (``flush``)."""

    session: AsyncSession
    now: datetime
    done: dict[str, set[Step]] = field(default_factory=dict)
    states: dict[str, Snapshot] = field(default_factory=dict)
    ledger: list[dict[str, Any]] = field(default_factory=list)
    _pairs: dict[str, PlanPair | None] = field(default_factory=dict)
    _rules: dict[str, MigrationRules] = field(default_factory=dict)
    _problems: dict[str, list[Any]] = field(default_factory=dict)
    #: Accounts whose licenses changed, announced by ``flush`` (to ``announce_to`` only, if
    #: given; else to every subscriber).
    changed: list[str] = field(default_factory=list)
    announce_to: Callable[[str], None] | None = None
    _registered: set[str] = field(default_factory=set)
    _digest: tuple[MigrationRules, str] | None = None
    #: Read ahead for a cutover: subscriptions and licenses (locked), and activations.
    subscriptions: dict[str, Subscription] | None = None
    licenses: dict[str, list[License]] = field(default_factory=dict)
    machines: dict[str, list[Any]] = field(default_factory=dict)
    #: Machines to put in another mode, by (mode, lease): written together by ``flush``.
    conversions: dict[tuple[str, datetime | None], list[str]] = field(default_factory=dict)
    #: Read ahead for a verify: every license of the batch's accounts, as validation loads it.
    loaded: dict[str, license_cache.CachedLicense] | None = None
    #: Migration rows to insert (the lock step's), inserted by ``flush`` before the ledger.
    new_migrations: list[dict[str, Any]] = field(default_factory=list)
    #: Customer notices the steps wrote (``migration.notices``), inserted by ``flush``.
    notices: list[dict[str, Any]] = field(default_factory=list)
    #: Read ahead by ``read_holders``: the migration holding each account, the run holding it.
    _holders: dict[str, Migration] | None = None
    _runs: dict[str, str] | None = None
    #: The states in ``states`` were read under the snapshot's locks (``lock_for_snapshot``),
    #: in this transaction: a snapshot step takes them as they are.
    cut: bool = False
    #: The plans the lock step made, by migration id: the snapshot step in the same
    #: transaction, from the same state at the same time, would make the same.
    plans: dict[str, MigrationPlan] = field(default_factory=dict)
    #: Seconds spent in each step's own work (read-ahead and handlers), for the step metrics.
    timings: dict[Step, float] = field(default_factory=dict)
    #: The documents each snapshot step wrote, by migration id (``Documents.keep``).
    taken: dict[str, TakenDocuments] = field(default_factory=dict)

    async def read_holders(self, account_ids: Sequence[str]) -> None:
        self._holders = await repository.active_migrations(self.session, account_ids)
        self._runs = await repository.holding_runs(self.session, account_ids)

    async def holder(self, account_id: str) -> Migration | None:
        if self._holders is None:
            return await repository.active_migration(self.session, account_id)
        return self._holders.get(account_id)

    async def holding_run(self, account_id: str) -> str | None:
        if self._runs is None:
            return await repository.holding_run(self.session, account_id)
        return self._runs.get(account_id)

    async def register(self, actor: Actor, rules: MigrationRules) -> audit.EventIn | None:
        """``register_rules``, once per rules content in the batch."""
        digest = self.digest(rules)
        if digest in self._registered:
            return None
        self._registered.add(digest)
        return await register_rules(self.session, actor, rules)

    async def read_states(self, account_ids: Sequence[str]) -> None:
        for state in await repository.read_states(self.session, account_ids, self.now):
            self.states[state["account"]["id"]] = state

    async def plan_pair(self, ref: str) -> PlanPair | None:
        if ref not in self._pairs:
            self._pairs[ref] = await plan_pair(self.session, ref)
        return self._pairs[ref]

    def digest(self, rules: MigrationRules) -> str:
        """The rules' content hash, computed once per batch."""
        if self._digest is None or self._digest[0] is not rules:
            self._digest = (rules, rules.content_hash())
        return self._digest[1]

    async def check(self, rules: MigrationRules) -> list[Any]:
        """``check_rules``, once per rules content in the batch."""
        digest = self.digest(rules)
        if digest not in self._problems:
            sources = {ref: await self.plan_pair(ref) for ref in rules.rules.from_plans}
            target = await self.plan_pair(rules.rules.to)
            self._problems[digest] = check_against_catalog(rules, sources, target)
        return self._problems[digest]

    async def rules(self, digest: str) -> MigrationRules:
        if digest not in self._rules:
            self._rules[digest] = await rules_by_hash(self.session, digest)
        return self._rules[digest]

    def write_step(
        self,
        migration: Migration | MigrationRecord,
        step: Step,
        *,
        outcome: StepOutcome = StepOutcome.DONE,
        snapshot_hash: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """The step's ledger row (as ``repository.write_step``), inserted by ``flush``; its
        primary key (migration, step) still makes a replay fail loudly."""
        done = self.done.setdefault(migration.id, set())
        self.ledger.append(
            {
                "migration_id": migration.id,
                "step": step,
                "account_id": migration.account_id,
                "seq": len(done) + 1,
                "outcome": outcome,
                "snapshot_hash": snapshot_hash,
                "details": details or {},
                "at": self.now,
            }
        )
        done.add(step)

    async def flush(self) -> None:
        """Insert the ledger rows, convert the machines collected, and announce the accounts whose licenses changed (caches
        drop them when the transaction commits)."""
        migrations, self.new_migrations = self.new_migrations, []
        await repository.insert_migrations(self.session, migrations)
        rows, self.ledger = self.ledger, []
        await repository.insert_steps(self.session, rows)
        written, self.notices = self.notices, []
        await notices.write(self.session, written)
        conversions, self.conversions = self.conversions, {}
        for (mode, lease), ids in conversions.items():
            await repository.convert_now(self.session, mode, lease, ids)
        changed, self.changed = self.changed, []
        await changes.announce_accounts(self.session, changed, to=self.announce_to)


# -- documents carried between phases ----------------------------------------------------------

#: (snapshot hash, snapshot, plan) of a migration, as its snapshot step wrote them.
TakenDocuments = tuple[str, dict[str, Any], dict[str, Any]]


@dataclass
class Documents:
    """The snapshot and plan each migration's snapshot step wrote, kept by this process for the
    migration's next phases (cutover, verify), so they are not read back from the database —
    most of a migration row, and the larger part of reading it (JSON sent, decompressed and
    parsed again). Both are written once, by the snapshot step, and never changed while the
    migration is in flight; a phase takes them only for rows whose snapshot hash, read with
    the row, is the one kept, and reads the row whole otherwise. Kept only once the
    transaction that wrote them committed, dropped when the migration leaves the batch or the
    batch ends (``run_batch``, ``Executor.forget``), at most ``limit`` at a time (oldest
    dropped first): a batch's worth, parsed, is tens of MB."""

    limit: int = 2_000
    _kept: OrderedDict[str, TakenDocuments] = field(default_factory=OrderedDict)

    def keep(self, taken: Mapping[str, TakenDocuments], committed: Mapping[str, object]) -> None:
        """Keep what ``taken`` holds for the migrations whose step committed (their answer
        in ``committed`` is not an error)."""
        for migration_id, documents in taken.items():
            answer = committed.get(migration_id)
            if answer is None or isinstance(answer, KeyshiftError):
                continue
            self._kept[migration_id] = documents
            self._kept.move_to_end(migration_id)
        while len(self._kept) > self.limit:
            self._kept.popitem(last=False)

    def get(self, migration_id: str) -> TakenDocuments | None:
        return self._kept.get(migration_id)

    def drop(self, migration_ids: Iterable[str]) -> None:
        for migration_id in migration_ids:
            self._kept.pop(migration_id, None)


# -- the executor -------------------------------------------------------------------------------


@dataclass
class Executor:
    """Runs migrations against one database. ``clock`` is the time source (tests move it)."""

    db: Database
    signing: SigningKeys
    cache: license_cache.LicenseStateCache | None = None
    clock: Callable[[], datetime] = field(default=utcnow)
    documents: Documents = field(default_factory=Documents)

    @tracing.traced_request
    async def request(
        self,
        actor: Actor,
        rules: MigrationRules,
        account_id: str,
        *,
        on_pending: str = "refuse",
        run_id: str | None = None,
        expect: str | None = None,
    ) -> Migration:
        """Check, plan and lock: the first step. A migration whose rules take effect later is
        created ``scheduled`` (it holds the account; ``run_due`` executes it). ``on_pending``:
        what to do when the account has a scheduled change — ``refuse``, ``replace`` it, or
        ``queue`` after it. ``run_id``: the run this migration is part of; an account another
        active run holds is refused (``MigrationInProgress``). ``expect``: the outcome digest
        that was approved; a plan that differs now is refused (``OutcomeChanged``)."""
        if on_pending not in ("refuse", "replace", "queue"):
            raise InvalidInput("on_pending is refuse, replace or queue", field="on_pending")
        fault_point("before:lock")
        now = self.clock()
        migration_id = str(uuid.uuid4())

        # Lock order (the same as every admin change): the account's rows first — here the
        # migration row, whose foreign key takes a share lock on the account — and the audit
        # head last, in one append of all of this transaction's events. Taking the head
        # before the account (as registering the rules used to) deadlocks against an admin
        # change that holds the account and waits for the head.
        async def lock(session: AsyncSession) -> Migration:
            batch = Batch(session, now)
            with audit.deferred(session) as events:
                row = await self._lock_one(
                    batch,
                    actor,
                    rules,
                    account_id,
                    migration_id=migration_id,
                    on_pending=on_pending,
                    run_id=run_id,
                    expect=expect,
                )
                await session.flush()
                await batch.flush()  # the migration row: the account's share lock
            await audit.append_deferred(session, events)  # the audit head: last
            fault_point("inside:lock")
            return row

        try:
            row = await self.db.run(lock)
        except IntegrityError as exc:
            if "lock_account_id" not in str(exc.orig):
                raise
            # Two requests raced for the account: the unique lock_account_id settled it.
            raise MigrationInProgress(
                f"account {account_id} already has a migration in progress", field="account_id"
            ) from exc
        fault_point("after:lock")
        return row

    async def _lock_one(
        self,
        batch: Batch,
        actor: Actor,
        rules: MigrationRules,
        account_id: str,
        *,
        migration_id: str,
        on_pending: str = "refuse",
        run_id: str | None = None,
        expect: str | None = None,
    ) -> Migration:
        """The lock step's work for one account, in the batch's transaction (see
        ``request``): checks that may refuse it first, writing nothing, then its writes."""
        plan, holder, queued = await self._check_lock(
            batch, rules, account_id, migration_id, on_pending, run_id, expect
        )
        return await self._write_lock(
            batch, actor, rules, account_id, plan, holder, queued, migration_id, run_id, on_pending
        )

    async def _check_lock(
        self,
        batch: Batch,
        rules: MigrationRules,
        account_id: str,
        migration_id: str,
        on_pending: str,
        run_id: str | None,
        expect: str | None,
    ) -> tuple[MigrationPlan, Migration | None, bool]:
        """Plan the account and refuse it — writing nothing — if it may not be locked:
        another run holds it, it plans differently from ``expect``, it is not eligible or
        blocked, or another migration holds it. The plan, the migration holding the account
        (if any) and whether the new one queues behind it."""
        session = batch.session
        plan, _ = await preview(
            session, rules, account_id, now=batch.now, migration_id=migration_id, batch=batch
        )
        batch.plans[migration_id] = plan
        holder = await batch.holder(account_id)
        in_run = await batch.holding_run(account_id)
        if in_run is not None and in_run != run_id:
            raise MigrationInProgress(
                f"account {account_id} is in run {in_run}; the run moves it",
                field="account_id",
                run_id=in_run,
            )
        if expect is not None and plan.outcome_digest() != expect:
            raise OutcomeChanged(
                "it plans differently from the approved report (now: "
                + ("eligible" if plan.eligible else "not eligible")
                + (", blocked" if plan.blocked else "")
                + (f"; {'; '.join(plan.reasons)}" if plan.reasons else "")
                + ")",
                field="account_id",
            )
        queued = holder is not None and on_pending == "queue"
        # A queued change is planned against the state its predecessor leaves, when
        # it is taken up; now only the rules themselves are checked.
        if not plan.eligible and not queued:
            raise NotEligible(
                "the account is not eligible: " + "; ".join(plan.reasons),
                field="account_id",
                reasons=list(plan.reasons),
            )
        if plan.blocked and not queued:
            raise MigrationBlocked(
                "the rules block this migration: " + "; ".join(plan.reasons),
                field="account_id",
                reasons=list(plan.reasons),
            )
        if holder is not None and (holder.state not in REPLACEABLE or on_pending == "refuse"):
            raise MigrationInProgress(
                f"account {account_id} already has migration {holder.id} ({holder.state})",
                field="account_id",
                migration_id=holder.id,
            )
        return plan, holder, queued

    async def _write_lock(
        self,
        batch: Batch,
        actor: Actor,
        rules: MigrationRules,
        account_id: str,
        plan: MigrationPlan,
        holder: Migration | None,
        queued: bool,
        migration_id: str,
        run_id: str | None,
        on_pending: str,
    ) -> Migration:
        """The lock step's writes for a checked account: the migration row (whose unique
        ``lock_account_id`` holds the account), the rules registered, the ledger row."""
        session, now = batch.session, batch.now
        events: list[audit.EventIn] = []
        effective_at = parse_iso(plan.effective_at)
        scheduled = effective_at is not None and effective_at > now
        if holder is not None and on_pending == "replace":
            holder.state, holder.lock_account_id = MigrationState.CANCELLED, None
            holder.finished_at = now
            await notices.cancelled(session, [holder.id])
            holder.error = f"replaced by migration {migration_id}"
            await session.flush()
            events.append(
                audit.EventIn(
                    "migration.cancel",
                    "migration",
                    holder.id,
                    account_id,
                    {"replaced_by": migration_id},
                )
            )
        values: dict[str, Any] = dict(
            id=migration_id,
            account_id=account_id,
            lock_account_id=None if queued else account_id,
            state=(
                MigrationState.QUEUED
                if queued
                else MigrationState.SCHEDULED
                if scheduled
                else MigrationState.LOCKED
            ),
            rules_ref=rules.ref,
            rules_hash=batch.digest(rules),
            source_ref=plan.source_ref,
            source_hash=None,
            target_ref=plan.target_ref,
            target_hash=plan.target_hash,
            effective_at=effective_at,
            outcome_digest=None if queued else plan.outcome_digest(),
            plan=plan.to_dict() if (scheduled or queued) else None,
            created_by=actor.id,
            created_at=now,
            updated_at=now,
            run_id=run_id,
        )
        batch.new_migrations.append(values)  # inserted together, in ``Batch.flush``
        row = Migration(**values)
        registered = await batch.register(actor, rules)
        if registered is not None:
            events.insert(0, registered)
        if row.state == MigrationState.LOCKED:
            batch.write_step(row, Step.LOCK, details={"rules": rules.ref})
            batch.notices.append(notices.started(row, now))
        elif row.state == MigrationState.SCHEDULED and effective_at is not None:
            batch.notices.append(notices.scheduled(row, plan, effective_at, now))
        events.append(
            audit.EventIn(
                f"migration.{row.state if row.state != MigrationState.LOCKED else 'start'}",
                "migration",
                row.id,
                account_id,
                {
                    "rules": rules.ref,
                    "rules_hash": row.rules_hash,
                    "from": plan.source_ref,
                    "to": plan.target_ref,
                    "to_hash": plan.target_hash,
                    "effective_at": plan.effective_at,
                },
            )
        )
        await audit.record_many(session, actor, events)
        return row

    async def apply(self, actor: Actor, rules: MigrationRules, account_id: str) -> Migration:
        """Request and, unless it is scheduled for later, run to the end."""
        row = await self.request(actor, rules, account_id)
        if row.state != MigrationState.LOCKED:
            return row
        return await self.run(actor, row.id)

    async def run(self, actor: Actor, migration_id: str, *, until: Step | None = None) -> Migration:
        """Run (or resume) every step not yet in the ledger — up to and including ``until``
        if given (a blue-green run prepares every account before its cutoff). Safe to call
        again after a crash at any point: a committed step is skipped, an uncommitted one is
        redone. A batch of one: the same path as a run's batches (``run_batch``)."""
        result = (await self.run_batch(actor, [migration_id], until=until)).get(migration_id)
        if isinstance(result, KeyshiftError):
            raise result
        if result is None:
            raise MigrationNotFound(f"no migration {migration_id}", field="migration_id")
        return result

    async def get(self, migration_id: str) -> Migration:
        async with self.db.transaction() as session:
            row = await session.get(Migration, migration_id, populate_existing=True)
            if row is None:
                raise MigrationNotFound(f"no migration {migration_id}", field="migration_id")
            return row

    @property
    def _handlers(self) -> dict[Step, StepHandler]:
        """The step table: each step ``run`` drives, and the method that does it."""
        return {
            Step.SNAPSHOT: self._snapshot,
            Step.PREPARE: self._prepare,
            Step.CUTOVER: self._cutover,
            Step.VERIFY: self._verify,
            Step.RECEIPT: self._receipt,
        }

    async def _step(self, actor: Actor, migration_id: str, step: Step) -> Flow:
        """One step of one migration in its own transaction (a batch of one)."""
        flow = (await self._batch_step(actor, [migration_id], (step,)))[migration_id]
        if isinstance(flow, KeyshiftError):
            raise flow
        return flow

    async def _steps_in(
        self,
        session: AsyncSession,
        actor: Actor,
        migration_ids: Sequence[str],
        steps: Sequence[Step],
        timings: dict[Step, float] | None = None,
        taken: dict[str, TakenDocuments] | None = None,
    ) -> dict[str, Flow | KeyshiftError]:
        """Steps (a phase, ``PHASES``) of many migrations in the caller's transaction, each
        with its ledger row; a step already in a migration's ledger is skipped. The rows are
        locked and the ledger read in one query each (``_steps_on`` does the rest)."""
        batch = Batch(session, self.clock())
        if timings is not None:
            batch.timings = timings
        if taken is not None:
            batch.taken = taken
        without = set.intersection(*(set(_NOT_READ.get(step, ())) for step in steps))
        kept = {m: self.documents.get(m) for m in migration_ids}
        carried = Step.SNAPSHOT not in steps and all(kept.values())
        if carried:
            without |= {"snapshot", "plan"}
        rows = await repository.lock_records(session, migration_ids, without=tuple(without))
        if carried:
            stale = []
            for row in rows.values():
                documents = kept[row.id]
                if documents is None or documents[0] != row.snapshot_hash:
                    stale.append(row.id)
                    continue
                row.snapshot, row.plan = documents[1], documents[2]
                row.read["snapshot"], row.read["plan"] = row.snapshot, row.plan
            if stale:  # not as kept (never, but the database is the authority): read whole
                rows |= await repository.lock_records(session, stale)
        tracing.note_accounts(rows.values())
        batch.done = await repository.ledger_steps(session, list(rows))
        return await self._steps_on(session, actor, migration_ids, rows, steps, batch)

    async def _steps_on(
        self,
        session: AsyncSession,
        actor: Actor,
        migration_ids: Sequence[str],
        rows: dict[str, MigrationRecord],
        steps: Sequence[Step],
        batch: Batch,
    ) -> dict[str, Flow | KeyshiftError]:
        """The steps over locked rows whose ledger ``batch.done`` holds, one after the other:
        a migration goes on to the next step while its flow is ``NEXT``. Each step reads the
        accounts' states ahead in one query per table where it needs them; the rows' changes
        are written back, and the ledger rows inserted, together at the end. A migration's
        answer is the flow of the last step it reached."""
        batch.announce_to = self.cache.apply if self.cache is not None else None
        out: dict[str, Flow | KeyshiftError] = {}
        going: list[MigrationRecord] = []
        for migration_id in migration_ids:
            row = rows.get(migration_id)
            if row is None:
                out[migration_id] = MigrationNotFound(
                    f"no migration {migration_id}", field="migration_id"
                )
            else:
                going.append(row)
        touched = list(going)
        for step in steps:
            started = time.perf_counter()
            todo: list[MigrationRecord] = []
            for row in going:
                if step in batch.done[row.id]:
                    out[row.id] = Flow.NEXT
                elif row.state not in IN_FLIGHT:
                    out[row.id] = Flow.STOP
                else:
                    todo.append(row)
            await self._read_ahead(batch, step, [row.account_id for row in todo])
            handler = self._handlers[step]
            # The rows' changes are flushed together at the end (one executemany per shape
            # of change) instead of before each next account's first statement.
            with session.no_autoflush:
                for row in todo:
                    out[row.id] = await handler(session, actor, row, batch)
            going = [row for row in going if out[row.id] == Flow.NEXT]
            batch.timings[step] = batch.timings.get(step, 0.0) + time.perf_counter() - started
        await session.flush()
        # A row the lock step made in this transaction is inserted by ``batch.flush`` with
        # what the steps made of it; the others' changes are written back.
        pending = {values["id"]: values for values in batch.new_migrations}
        await repository.write_records(
            session, [row for row in touched if row.id not in pending], batch.now
        )
        for row in touched:
            if row.id in pending:
                pending[row.id].update(row.changes())
        await batch.flush()  # every effect is in the database, only the commit is left
        return out

    async def _read_ahead(self, batch: Batch, step: Step, accounts: list[str]) -> None:
        """What ``step`` reads of its accounts, in one query per table for the batch."""
        if not accounts:
            return
        session = batch.session
        if step == Step.SNAPSHOT and not batch.cut:
            # Lock what admin changes go through (the subscriptions and the licenses) before
            # reading, so each snapshot is a consistent cut: a concurrent admin change lands
            # before it or is refused after it (the account is held).
            await repository.lock_for_snapshot(session, accounts)
            await batch.read_states(accounts)
            batch.cut = True
        elif step == Step.VERIFY:
            await batch.read_states(accounts)
            batch.loaded = await validation.load_many(
                session,
                [lic["key_lookup"] for s in batch.states.values() for lic in s["licenses"]],
            )
        elif step == Step.CUTOVER:
            # In the order every seat change takes them: subscriptions, then licenses.
            batch.subscriptions = await repository.lock_subscriptions(session, accounts)
            batch.licenses = await repository.lock_licenses(session, accounts)
            batch.machines = await repository.read_machines(session, accounts)

    # -- batches -------------------------------------------------------------------------------

    @tracing.traced_lock
    async def request_many(
        self,
        actor: Actor,
        rules: MigrationRules,
        accounts: Sequence[tuple[str, str | None]],
        *,
        run_id: str | None = None,
        through: Step | None = None,
    ) -> dict[str, Migration | KeyshiftError]:
        """The lock step for many accounts — (account id, expected outcome digest) each — in
        ONE transaction: their states are read in one query per table, each is checked (one
        that is refused — not eligible, held by another migration, planned differently … —
        gets its error, having written nothing) and the others' rows written together. If a
        write fails (two lockers raced for an account), the transaction is rolled back and
        done again with each account in a savepoint of its own (``batching.isolated``, as
        every step over a batch). Audit events are appended together at the end.

        ``through``: go on in the same transaction with the steps of the first phase up to
        this one (``LOCK_PHASE``: snapshot, prepare — nothing the app reads changes). The
        subscriptions and licenses are then locked before the states are read, so the states
        the accounts were checked against are their snapshots, and their plans are kept. The
        migrations returned carry the state they reached."""
        if through is not None and through not in LOCK_PHASE:
            raise ValueError(f"the lock step takes on {LOCK_PHASE}, not {through}")
        fault_point("before:lock")
        started = time.perf_counter()
        timings: dict[Step, float] = {}
        taken: dict[str, TakenDocuments] = {}
        then = LOCK_PHASE[: LOCK_PHASE.index(through) + 1] if through is not None else ()
        now = self.clock()
        ordered = sorted(dict(accounts).items())
        ids = {account_id: str(uuid.uuid4()) for account_id, _ in ordered}

        async def lock(
            batch: Batch, account_id: str, expect: str | None
        ) -> Migration | KeyshiftError:
            try:
                plan, holder, queued = await self._check_lock(
                    batch, rules, account_id, ids[account_id], "refuse", run_id, expect
                )
            except KeyshiftError as error:
                if isinstance(error, Unavailable):
                    raise
                return error
            return await self._write_lock(
                batch, actor, rules, account_id, plan, holder, queued, ids[account_id], run_id,
                "refuse",
            )  # fmt: skip

        expects = dict(ordered)

        async def work(
            session: AsyncSession, keys: Sequence[str]
        ) -> dict[str, Migration | KeyshiftError]:
            batch = Batch(session, now, timings=timings, taken=taken)
            if then:  # the snapshot's locks, taken before the states are read
                await repository.lock_for_snapshot(session, keys)
                batch.cut = True
            await batch.read_states(keys)
            await batch.read_holders(keys)
            out = {a: await lock(batch, a, expects[a]) for a in keys}
            going = [r for r in out.values() if isinstance(r, Migration)]
            going = [r for r in going if r.state == MigrationState.LOCKED]
            records: dict[str, MigrationRecord] = {}
            try:
                await session.flush()
                if then and going:
                    # The new rows are inserted at the end of the steps, with what the steps
                    # made of them: one INSERT, no UPDATE of what was just inserted.
                    pending = {values["id"]: values for values in batch.new_migrations}
                    records = {r.id: _record_of(pending[r.id]) for r in going}
                    await self._steps_on(session, actor, list(records), records, then, batch)
                else:
                    await batch.flush()
            except IntegrityError as exc:
                if "lock_account_id" not in str(exc.orig):
                    raise
                # Another locker took one of them first: redone account by account, where
                # this is that account's answer.
                raise MigrationInProgress(
                    f"account {keys[0] if len(keys) == 1 else 'of the batch'} already has a"
                    " migration in progress",
                    field="account_id",
                ) from exc
            for row in going:  # the state each reached, for the caller
                if row.id in records:
                    record = records[row.id]
                    row.state, row.error = record.state, record.error
                    row.lock_account_id = record.lock_account_id
            return out

        result = await isolated(self.db, list(expects), work, fault=["inside:lock", *_inside(then)])
        self.documents.keep(taken, {m.id: m for m in result.values() if isinstance(m, Migration)})
        fault_point("after:lock")
        observe_steps((Step.LOCK, *then), len(expects), timings, time.perf_counter() - started)
        return result

    async def run_batch(
        self,
        actor: Actor,
        migration_ids: Sequence[str],
        *,
        until: Step | None = None,
        after: Step | None = None,
        outcome_only: bool = False,
    ) -> dict[str, Migration | KeyshiftError]:
        """Run (or resume) many migrations together: each phase (``PHASES``) is ONE
        transaction over the batch, while every migration keeps its own ledger row per step,
        its own snapshot hash and its own atomic cutover (its cutover's writes are all in that
        one transaction). Each migration's steps run in a savepoint: one that fails leaves its
        neighbours be (its error is returned; it is retried alone by the caller). Safe to
        call again after a crash at any point, as ``run``. ``after``: the caller knows every
        migration has done the steps up to this one (``request_many`` took them on): the
        phases before are not visited. ``outcome_only``: the rows returned carry their id,
        account, state and error only (what a run records of them), not their snapshot, plan
        and receipt — a batch's documents are most of what reading it back costs."""
        try:
            failed = await self._phases_of(actor, migration_ids, until, after)
        finally:
            self.forget(migration_ids)
        query = select(Migration)
        if outcome_only:
            query = query.options(
                load_only(Migration.id, Migration.account_id, Migration.state, Migration.error)
            )
        async with self.db.transaction() as session:
            rows = (
                (
                    await session.execute(
                        query.where(among(session, Migration.id, migration_ids)).execution_options(
                            populate_existing=True
                        )
                    )
                )
                .scalars()
                .all()
            )
        out: dict[str, Migration | KeyshiftError] = {r.id: r for r in rows}
        out.update(failed)
        return out

    def forget(self, migration_ids: Iterable[str]) -> None:
        """Drop the documents kept for these migrations (``Documents``): their batch is done
        with them."""
        self.documents.drop(migration_ids)

    async def _phases_of(
        self,
        actor: Actor,
        migration_ids: Sequence[str],
        until: Step | None,
        after: Step | None,
    ) -> dict[str, KeyshiftError]:
        """``run_batch``'s phases; the migrations that failed, with their errors."""
        failed: dict[str, KeyshiftError] = {}
        going = list(dict.fromkeys(migration_ids))
        for phase in _phases(until, after):
            if not going:
                break
            fault_point(f"before:{phase[0]}")
            flows = await self._batch_step(actor, going, phase)
            fault_point(f"after:{phase[-1]}")
            ahead, differ = [], []
            for migration_id in going:
                flow = flows[migration_id]
                if isinstance(flow, KeyshiftError):
                    failed[migration_id] = flow
                elif flow == Flow.VERIFY_FAILED:
                    differ.append(migration_id)
                elif flow == Flow.NEXT and phase[-1] != until:
                    ahead.append(migration_id)
            if differ:
                undone = await rollback_many(self, actor, differ, reason="verification failed")
                failed |= {m: e for m, e in undone.items() if isinstance(e, KeyshiftError)}
            going = ahead
        return failed

    @tracing.traced_batch_step
    async def _batch_step(
        self, actor: Actor, migration_ids: Sequence[str], steps: Sequence[Step]
    ) -> dict[str, Flow | KeyshiftError]:
        """One phase over the batch in ONE transaction, one migration's failure isolated from
        its neighbours' (``batching.isolated``). Each step's time is observed (the shared
        part — locks, ledger, write-back, commit — under the phase's first step)."""
        started = time.perf_counter()
        timings: dict[Step, float] = {}
        taken: dict[str, TakenDocuments] = {}

        async def work(
            session: AsyncSession, ids: Sequence[str]
        ) -> dict[str, Flow | KeyshiftError]:
            return await self._steps_in(session, actor, ids, steps, timings, taken)

        out = await isolated(self.db, migration_ids, work, fault=_inside(steps))
        self.documents.keep(taken, out)  # committed: the next phases may take them
        self.documents.drop(m for m, flow in out.items() if flow != Flow.NEXT)
        if steps[-1] == RUN_STEPS[-1]:
            self.documents.drop(out)
        observe_steps(steps, len(migration_ids), timings, time.perf_counter() - started)
        return out

    # -- the steps ---------------------------------------------------------------------------

    async def _snapshot(
        self, session: AsyncSession, actor: Actor, row: MigrationRecord, batch: Batch
    ) -> Flow:
        now = batch.now
        # The batch locked what admin changes go through (every account's subscription and
        # licenses) before it read the states: each snapshot is a consistent cut.
        planned = batch.plans.pop(row.id, None) if batch.cut else None
        if planned is not None:  # planned by the lock step, in this transaction
            plan, snapshot = planned, batch.states[row.account_id]
        else:
            rules = await batch.rules(row.rules_hash)
            plan, snapshot = await preview(
                session, rules, row.account_id, now=now, migration_id=row.id, batch=batch
            )
        snapshot_hash = content_hash_of(snapshot)
        if not plan.can_apply:
            row.state, row.lock_account_id, row.finished_at = MigrationState.REFUSED, None, now
            row.error = "; ".join(plan.reasons)
            batch.write_step(
                row,
                Step.SNAPSHOT,
                outcome=StepOutcome.REFUSED,
                details={"reasons": list(plan.reasons)},
            )
            await audit.record(
                session,
                actor,
                "migration.refused",
                "migration",
                row.id,
                account_id=row.account_id,
                details={"reasons": list(plan.reasons)},
            )
            return Flow.STOP
        row.snapshot = cast(dict[str, Any], snapshot)  # stored as JSON, read by as_snapshot
        row.snapshot_hash, row.plan = snapshot_hash, plan.to_dict()
        batch.taken[row.id] = (snapshot_hash, row.snapshot, row.plan)
        row.source_ref = plan.source_ref
        sub = snapshot["subscription"]
        row.source_hash = sub["plan_hash"] if sub else None
        row.state = MigrationState.SNAPSHOTTED
        batch.write_step(
            row,
            Step.SNAPSHOT,
            snapshot_hash=snapshot_hash,
            details={"taken_at": snapshot["taken_at"], "risks": list(plan.risks)},
        )
        return Flow.NEXT

    async def _prepare(
        self, session: AsyncSession, actor: Actor, row: MigrationRecord, batch: Batch
    ) -> Flow:
        """Stage archive copies beside the originals, each verified by hash. Nothing the app
        reads changes."""
        plan = row.plan or {}
        staged = []
        for object_id in plan.get("archive", []):
            original = await session.get(DataObject, object_id)
            if original is None:
                raise NotFound(f"object {object_id} vanished before prepare")
            copy_id = _derived(row.id, object_id)
            await session.execute(delete(DataObject).where(DataObject.id == copy_id))
            await session.execute(
                insert(DataObject).values(
                    id=copy_id,
                    account_id=original.account_id,
                    quota=original.quota,
                    name=original.name,
                    units=original.units,
                    tier="archive",
                    state="staged",
                    content=original.content,
                    content_hash=original.content_hash,
                    migration_id=row.id,
                    created_at=original.created_at,
                )
            )
            copied = (
                await session.execute(select(DataObject.content).where(DataObject.id == copy_id))
            ).scalar_one()
            if hashlib.sha256(copied).hexdigest() != original.content_hash:
                raise NotFound(f"the archive copy of {object_id} does not match its hash")
            staged.append(copy_id)
        row.state = MigrationState.PREPARED
        batch.write_step(row, Step.PREPARE, details={"staged": staged})
        return Flow.NEXT

    async def _cutover(
        self, session: AsyncSession, actor: Actor, row: MigrationRecord, batch: Batch
    ) -> Flow:
        """ONE transaction: the plan, overrides, activations, objects and counters flip."""
        now = batch.now
        plan = row.plan or {}
        expected: ExpectedState = plan["expected"]
        snapshot = as_snapshot(row.snapshot)
        if batch.subscriptions is None:
            sub = await repository.lock_subscription(session, row.account_id)
        else:
            sub = batch.subscriptions.get(row.account_id)
        before = snapshot.get("subscription")
        if sub is None or sub.plan_hash != (before["plan_hash"] if before else None):
            row.state, row.lock_account_id, row.finished_at = MigrationState.FAILED, None, now
            row.error = "the account's plan changed after the snapshot"
            batch.write_step(
                row, Step.CUTOVER, outcome=StepOutcome.FAILED, details={"error": row.error}
            )
            return Flow.STOP
        assert expected["subscription"] is not None  # a plan always puts the target plan
        repository.put_subscription(sub, expected["subscription"], now)
        license_changes = await repository.put_license_overrides(
            session,
            row.account_id,
            expected["licenses"],
            now,
            locked=batch.licenses.get(row.account_id),
        )
        removed = []
        if plan.get("deactivate"):
            by_id = {a["id"]: a for a in snapshot.get("activations", [])}
            await session.execute(delete(Activation).where(Activation.id.in_(plan["deactivate"])))
            removed = [by_id[i] for i in plan["deactivate"] if i in by_id]
        machines = batch.machines.get(row.account_id)
        if machines is not None:  # read before the deactivations above
            gone = set(plan.get("deactivate") or ())
            machines = [m for m in machines if m.id not in gone]
        converted = await _convert_machines(session, row.account_id, plan, now, machines, batch)
        archived = list(plan.get("archive", []))
        if archived:
            await session.execute(
                update(DataObject)
                .where(DataObject.id.in_(archived))
                .values(state="superseded", migration_id=row.id)
            )
            await session.execute(
                update(DataObject)
                .where(DataObject.migration_id == row.id, DataObject.state == "staged")
                .values(state="active")
            )
        moves = [CounterMove(**m) for m in plan.get("counter_moves", [])]
        counters = await _move_counters(session, row.account_id, moves)
        batch.changed.append(row.account_id)  # announced together, in ``Batch.flush``
        row.state, row.cutover_at = MigrationState.CUTOVER, now
        # keep_all over a lower cap: the pins were written with the license overrides above.
        grandfathered = list((plan.get("changes") or {}).get("activations_grandfathered", []))
        details = {
            "from": row.source_ref,
            "to": row.target_ref,
            "licenses_changed": license_changes,
            "activations_deactivated": removed,
            "activations_converted": converted,
            "activations_grandfathered": grandfathered,
            "objects_archived": archived,
            "counters": counters,
        }
        batch.write_step(row, Step.CUTOVER, details=details)
        grace = expected["subscription"]["overrides"].get("grace")
        if grace and (ending := notices.grace_ending(row, grace["until"], now)) is not None:
            batch.notices.append(ending)
        await audit.record(
            session,
            actor,
            "migration.cutover",
            "migration",
            row.id,
            account_id=row.account_id,
            details={
                "from": row.source_ref,
                "to": row.target_ref,
                "activations_deactivated": [a["id"] for a in removed],
                "activations_converted": [c["id"] for c in converted],
                "activations_grandfathered": grandfathered,
                "objects_archived": archived,
            },
        )
        return Flow.NEXT

    async def _verify(
        self, session: AsyncSession, actor: Actor, row: MigrationRecord, batch: Batch
    ) -> Flow:
        """Actual == expected (counters: nothing below what the plan expected; activations:
        every expected one present, new ones allowed, each machine holding a seat in the
        target's mode), and every active license validates under the new plan with its key
        and with the fingerprint of each machine kept that held a seat at the snapshot — and,
        unless it was already over its cap at the snapshot, is not over its cap now."""
        now = batch.now
        plan = row.plan or {}
        expected: ExpectedState = plan["expected"]
        snapshot = as_snapshot(row.snapshot)
        actual = batch.states.get(row.account_id)
        assert actual is not None
        problems = compare_after_cutover(expected, actual, snapshot)
        machines = kept_machines(expected, snapshot)
        converted = set(plan.get("convert", []))
        over_cap_before = set(plan.get("over_cap_before", []))
        for lic in actual["licenses"]:
            if batch.loaded is None:
                loaded = await validation.load(session, lic["key_lookup"])
            else:
                loaded = batch.loaded.get(lic["key_lookup"])
            if loaded is None:
                problems.append(f"license {lic['id']}: its key no longer finds it")
                continue
            if loaded.state.plan_ref != row.target_ref:
                problems.append(f"license {lic['id']}: validates under {loaded.state.plan_ref}")
            problems += _mode_problems(loaded, converted, now)
            if lic["status"] != "active":
                continue
            for fingerprint in [None, *machines.get(lic["id"], [])]:
                decision = policy.decide(
                    loaded.state,
                    loaded.entitlements,
                    fingerprint=fingerprint,
                    feature=None,
                    now=now,
                )
                lost = decision.code in _LOST_SEAT and not _ran_out(loaded, fingerprint, now)
                # keep_all pins the cap to the seats kept, so no migration makes a license
                # over its cap: one that is now is a regression, rolled back.
                over = (
                    decision.code is policy.Code.TOO_MANY_ACTIVATIONS
                    and lic["id"] not in over_cap_before
                )
                if lost or over:
                    who = "its key" if fingerprint is None else f"machine {fingerprint!r}"
                    problems.append(
                        f"license {lic['id']}: {who} validates as {decision.code.value}"
                    )
        if problems:
            batch.write_step(
                row, Step.VERIFY, outcome=StepOutcome.FAILED, details={"problems": problems}
            )
            row.error = "verification failed: " + "; ".join(problems[:5])
            return Flow.VERIFY_FAILED
        row.state = MigrationState.VERIFIED
        batch.write_step(row, Step.VERIFY, details={"checked": True})
        return Flow.NEXT

    async def _receipt(
        self, session: AsyncSession, actor: Actor, row: MigrationRecord, batch: Batch
    ) -> Flow:
        now = batch.now
        body = {
            "migration_id": row.id,
            "account_id": row.account_id,
            "from": row.source_ref,
            "from_hash": row.source_hash,
            "to": row.target_ref,
            "to_hash": row.target_hash,
            "rules": row.rules_ref,
            "rules_hash": row.rules_hash,
            # A blue-green run's cutoff moment is every account's effective time.
            "effective_at": iso(
                row.effective_at if row.run_id is not None and row.effective_at else row.cutover_at
            ),
            "snapshot_hash": row.snapshot_hash,
            "issued_at": iso(now),
        }
        kid, signature = self.signing.sign(canonical_json(body))
        import base64

        row.receipt = {
            "body": body,
            "signature": base64.b64encode(signature).decode(),
            "keyid": kid,
            "algorithm": "ed25519",
        }
        row.state, row.lock_account_id, row.finished_at = MigrationState.COMPLETED, None, now
        batch.write_step(row, Step.RECEIPT, details={"keyid": kid})
        batch.notices.append(notices.completed(row, row.receipt, now))
        await audit.record(
            session,
            actor,
            "migration.complete",
            "migration",
            row.id,
            account_id=row.account_id,
            details={
                "from": row.source_ref,
                "to": row.target_ref,
                "snapshot_hash": row.snapshot_hash,
            },
        )
        return Flow.NEXT


def _record_of(inserted: dict[str, Any]) -> MigrationRecord:
    """A migration row just inserted by the lock step (its values; the columns left out are
    NULL), as a batch step reads it."""
    return MigrationRecord.of({**dict.fromkeys(repository.MIGRATION_COLUMNS), **inserted})


def _phases(until: Step | None, after: Step | None) -> list[tuple[Step, ...]]:
    """The phases ``run_batch`` visits: from the step after ``after``, through ``until``."""
    order = list(RUN_STEPS)
    first = order.index(after) + 1 if after is not None and after in order else 0
    last = order.index(until) if until is not None and until in order else len(order) - 1
    out = []
    for phase in PHASES:
        steps = tuple(s for s in phase if first <= order.index(s) <= last)
        if steps:
            out.append(steps)
    return out


def _inside(steps: Sequence[Step]) -> list[str]:
    """The crash test's points inside a phase's transaction: each step's ``inside``, and the
    boundaries between steps that share it (``after:snapshot``, ``before:prepare``)."""
    points: list[str] = []
    for index, step in enumerate(steps):
        if index:
            points.append(f"before:{step}")
        points.append(f"inside:{step}")
        if index < len(steps) - 1:
            points.append(f"after:{step}")
    return points


#: The columns of a migration row a step does not read (``lock_records``): the snapshot
#: and the plan are most of a row.
_NOT_READ: dict[Step, tuple[str, ...]] = {
    Step.PREPARE: ("snapshot",),
    Step.RECEIPT: ("snapshot", "plan"),
}


#: Validation answers that mean the license, or a machine kept on it, lost its hold.
_LOST_SEAT = frozenset(
    {
        policy.Code.NOT_FOUND,
        policy.Code.NO_PLAN,
        policy.Code.NO_ACTIVATION,
        policy.Code.FINGERPRINT_MISMATCH,
    }
)


def kept_machines(expected: ExpectedState, snapshot: Snapshot) -> dict[str, list[str]]:
    """Per license, the fingerprints of the machines the plan keeps that held a seat at the
    snapshot (a lease already lapsed then was a free seat, not a machine the app runs on)."""
    taken_at = parse_iso(snapshot.get("taken_at"))
    live_then = set()
    for activation in snapshot.get("activations", []):
        lease = parse_iso(activation["lease_expires_at"])
        if lease is None or taken_at is None or lease > taken_at:
            live_then.add(activation["id"])
    out: dict[str, list[str]] = {}
    for activation in expected.get("activations", []):
        if activation["id"] in live_then:
            out.setdefault(activation["license_id"], []).append(activation["fingerprint"])
    return {k: sorted(v) for k, v in out.items()}


def _ran_out(loaded: license_cache.CachedLicense, fingerprint: str | None, now: datetime) -> bool:
    """The machine's floating lease, in the target's floating mode, has run out by the clock
    since the cutover (its machine stopped sending heartbeats): not the migration's doing."""
    if fingerprint is None or loaded.entitlements is None or not loaded.entitlements.is_floating:
        return False
    return any(
        a.fingerprint == fingerprint
        and a.mode == "floating"
        and a.lease_expires_at is not None
        and a.lease_expires_at <= now
        for a in loaded.state.activations
    )


def _mode_problems(
    loaded: license_cache.CachedLicense, converted: set[str], now: datetime
) -> list[str]:
    """Each machine holding a seat (and each the plan converted) is in the target's mode:
    node-locked without a lease, or floating with one."""
    if loaded.entitlements is None:
        return []
    mode = loaded.entitlements.machine_mode
    problems = []
    for activation in loaded.state.activations:
        if not (activation.is_live(now) or activation.id in converted):
            continue
        has_lease = activation.lease_expires_at is not None
        if activation.mode != mode or has_lease != loaded.entitlements.is_floating:
            lease = "a lease" if has_lease else "no lease"
            problems.append(
                f"activations[{activation.id}]: {activation.mode} with {lease} under"
                f" {loaded.state.plan_ref}, whose machines are {mode}"
            )
    return problems


async def _convert_machines(
    session: AsyncSession,
    account_id: str,
    plan: dict[str, Any],
    now: datetime,
    machines: list[Any] | None,
    batch: Batch,
) -> list[dict[str, Any]]:
    """Put every machine that holds a seat into the target's activation mode: the ones the plan
    converts, and any activated since the snapshot under the old plan's terms. A floating one
    gets a lease from now. The caller holds the account's license locks (every seat change
    takes them first). Returns each change with the values before, for rollback."""
    terms = plan.get("machine_terms")
    if not terms:
        return []  # a plan stored before activation modes were converted
    floating = terms["mode"] == "floating"
    lease = now + timedelta(seconds=int(terms["lease_seconds"])) if floating else None
    return await repository.convert_machines(
        session,
        account_id,
        terms["mode"],
        lease,
        now,
        also=set(plan.get("convert", [])),
        machines=machines,
        pending=batch.conversions,
    )


def _derived(migration_id: str, object_id: str) -> str:
    from keyshift.migration.state import derived_id

    return derived_id(migration_id, "archive", object_id)


def content_hash_of(state: ExpectedState) -> str:
    from keyshift.migration.state import state_hash

    return state_hash(state)


async def _move_counters(
    session: AsyncSession, account_id: str, moves: list[CounterMove]
) -> list[dict[str, Any]]:
    """Apply the counter moves as deltas under row locks, reading every source count before
    writing any target (locks taken in one sorted order: no deadlock with usage writers)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    wanted: dict[tuple[str, str], str] = {}
    for move in moves:
        wanted[(move.meter, move.period_start)] = move.period_end
        if move.source_meter and move.source_period_start:
            wanted.setdefault((move.source_meter, move.source_period_start), move.period_end)
    for (meter, start), end in sorted(wanted.items()):
        used, existed = await repository.lock_counter_row(session, account_id, meter, start, end)
        rows[(meter, start)] = {
            "meter": meter,
            "period_start": start,
            "period_end": end,
            "before": used,
            "existed": existed,
        }
    deltas: dict[tuple[str, str], int] = {}
    for move in moves:
        source = rows.get((move.source_meter or "", move.source_period_start or ""))
        count = source["before"] if source else 0
        value = move.value(count)
        key = (move.meter, move.period_start)
        if move.same_row:
            deltas[key] = deltas.get(key, 0) + value - count
        else:
            deltas[key] = deltas.get(key, 0) + value
    out = []
    for key, delta in sorted(deltas.items()):
        await repository.add_to_counter_row(session, account_id, key[0], key[1], delta)
        info = rows[key]
        out.append({**info, "delta": delta, "after": info["before"] + delta})
    return out


def compare_after_cutover(
    expected: ExpectedState, actual: Snapshot, snapshot: Snapshot
) -> list[str]:
    """Where ``actual`` falls short of ``expected``: exact on the account, subscription,
    licenses and objects; counters at least the expected count (usage keeps arriving);
    every expected activation present, extra ones only if created after the snapshot."""
    taken_at = snapshot.get("taken_at") or ""
    exp = {k: v for k, v in expected.items() if k not in ("counters", "activations")}
    act = {k: v for k, v in actual.items() if k not in ("counters", "activations")}
    problems = differences(
        {**exp, "activations": [], "counters": []}, {**act, "activations": [], "counters": []}
    )
    have = {a["id"]: a for a in actual["activations"]}
    for activation in expected["activations"]:
        if activation["id"] not in have:
            problems.append(f"activations[{activation['id']}]: missing")
    expected_ids = {a["id"] for a in expected["activations"]}
    for activation_id, activation in have.items():
        if activation_id not in expected_ids and (activation["created_at"] or "") <= taken_at:
            problems.append(f"activations[{activation_id}]: should have been deactivated")
    counts = {(c["meter"], c["period_start"]): c["used"] for c in actual["counters"]}
    for counter in expected["counters"]:
        key = (counter["meter"], counter["period_start"])
        if counts.get(key, 0) < counter["used"]:
            problems.append(
                f"counters[{key[0]}@{key[1]}]: {counts.get(key, 0)} < expected {counter['used']}"
            )
    return problems
