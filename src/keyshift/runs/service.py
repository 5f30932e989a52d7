"""A run's lifecycle: create (select the cohort and hold it), report (a dry run over every
account, streamed), approve, start, pause, resume, abort, roll back and finalize as a whole.
Every transition is one transaction with its audit event; the per-account work is the
worker's (``keyshift.runs.worker``).
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit import service as audit
from keyshift.canonical import content_hash
from keyshift.catalog import service as catalog
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.db.sql import analyze
from keyshift.db.tables import Account, MigrationRun, RunAccount, Subscription
from keyshift.db.types import utcnow
from keyshift.errors import KeyshiftError, NotFound
from keyshift.migration import repository as migrations
from keyshift.migration.errors import RulesInvalid
from keyshift.migration.executor import check_rules, plan_pair, register_rules
from keyshift.migration.planner import plan_migration
from keyshift.migration.rules import MigrationRules, PlanPair
from keyshift.notices import outbox
from keyshift.notices.kinds import NoticeKind
from keyshift.runs.errors import (
    AccountsInAnotherRun,
    CohortInvalid,
    FourEyes,
    OptionsInvalid,
    RunChanged,
    RunNotFound,
)
from keyshift.runs.model import (
    ACTIVE,
    AccountState,
    Cohort,
    Phase,
    RunOptions,
    RunState,
    Strategy,
    check_move,
    priority_of,
    wave_after_canary,
)

#: Accounts read, planned or written per transaction while streaming a cohort.
CHUNK = 500
#: Account ids a report lists per risk (the counts are always whole).
LISTED = 20


# -- create ------------------------------------------------------------------------------------


async def _plan_refs_exist(session: AsyncSession, refs: list[str]) -> None:
    missing = []
    for ref in refs:
        try:
            await catalog.get_plan(session, ref)
        except NotFound:
            missing.append(ref)
    if missing:
        raise CohortInvalid(
            f"the cohort names unknown plan(s): {', '.join(missing)}", field="cohort.plans"
        )


async def _unknown_ids(session: AsyncSession, ids: list[str]) -> list[str]:
    unknown: list[str] = []
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        found = set(
            (await session.execute(select(Account.id).where(Account.id.in_(chunk)))).scalars()
        )
        unknown += [i for i in chunk if i not in found]
    return unknown


async def _candidates(
    session: AsyncSession, cohort: Cohort, plans: list[str] | None
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(account id, attributes) of every account the cohort's filters keep, in id order,
    read in chunks (constant memory)."""
    wanted = None
    if plans is not None:
        wanted = {tuple(ref.split("@", 1)) for ref in plans}
    statuses = set(cohort.statuses) if cohort.statuses else None
    predicates = cohort.predicates()
    ids = sorted(cohort.ids) if cohort.ids is not None else None
    after = ""
    while True:
        query = (
            select(
                Account.id,
                Account.status,
                Account.attributes,
                Subscription.plan_key,
                Subscription.plan_version,
            )
            .outerjoin(Subscription, Subscription.account_id == Account.id)
            .where(Account.id > after)
            .order_by(Account.id)
            .limit(CHUNK)
        )
        if ids is not None:
            chunk_ids = [i for i in ids if i > after][:CHUNK]
            if not chunk_ids:
                return
            query = query.where(Account.id.in_(chunk_ids))
        rows = (await session.execute(query)).all()
        if not rows:
            return
        for account_id, status, attributes, plan_key, plan_version in rows:
            if wanted is not None and (plan_key, plan_version) not in wanted:
                continue
            if statuses is not None and status not in statuses:
                continue
            attrs = attributes or {}
            if not all(p.holds(attrs) for p in predicates):
                continue
            yield account_id, attrs
        after = rows[-1][0]


def _sample_key(seed: int, account_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{account_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


async def _selected(
    session: AsyncSession, cohort: Cohort, plans: list[str] | None
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The cohort after its sample: by percent a stable hash test per account (streamed); by
    count the N accounts of smallest hash (a bounded heap: memory of N, not of the cohort)."""
    sample = cohort.sample
    if sample is None:
        async for item in _candidates(session, cohort, plans):
            yield item
        return
    if sample.percent is not None:
        bound = int(sample.percent / 100 * 2**64)
        async for account_id, attrs in _candidates(session, cohort, plans):
            if _sample_key(sample.seed, account_id) < bound:
                yield account_id, attrs
        return
    import heapq

    assert sample.count is not None
    heap: list[tuple[int, str, dict[str, Any]]] = []
    async for account_id, attrs in _candidates(session, cohort, plans):
        key = -_sample_key(sample.seed, account_id)
        if len(heap) < sample.count:
            heapq.heappush(heap, (key, account_id, attrs))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, account_id, attrs))
    for _, account_id, attrs in sorted(heap, key=lambda item: item[1]):
        yield account_id, attrs


async def create(
    db: Database,
    actor: Actor,
    rules: MigrationRules,
    cohort: Cohort,
    options: RunOptions,
    *,
    name: str | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> MigrationRun:
    """A draft run holding every account of the cohort. Refused, with nothing written, if the
    rules do not fit the catalog, the cohort names unknown plans or ids or selects nothing,
    or another active run holds some of its accounts."""
    for found, error in ((cohort.problems(), CohortInvalid), (options.problems(), OptionsInvalid)):
        if found:
            where = "cohort" if error is CohortInvalid else "options"
            raise error(
                "; ".join(f"{where}.{field}: {reason}" for field, reason in found),
                field=f"{where}.{found[0][0]}",
            )
    now = clock()
    run_id = str(uuid.uuid4())
    async with db.transaction() as session:
        problems = await check_rules(session, rules)
        if problems:
            raise RulesInvalid(problems)
        plans = cohort.plans
        if plans is not None:
            await _plan_refs_exist(session, plans)
        elif cohort.ids is None:
            plans = list(rules.rules.from_plans)
        if cohort.ids is not None:
            unknown = await _unknown_ids(session, cohort.ids)
            if unknown:
                shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
                raise CohortInvalid(
                    f"{len(unknown)} unknown account id(s): {shown}",
                    field="cohort.ids",
                    unknown=unknown[:100],
                )
        run = MigrationRun(
            id=run_id,
            name=name or f"{rules.ref} {now:%Y-%m-%d %H:%M}",
            state=RunState.DRAFT,
            strategy=options.strategy,
            phase=Phase.PREPARE if options.strategy is Strategy.BLUE_GREEN else Phase.MIGRATE,
            rules_ref=rules.ref,
            rules_hash=rules.content_hash(),
            cohort=cohort.model_dump(mode="json", exclude_none=True),
            options=options.model_dump(mode="json", exclude_none=True),
            total=0,
            created_by=actor.id,
            created_at=now,
            updated_at=now,
        )
        session.add(run)
        await session.flush()
        registered = await register_rules(session, actor, rules)
        total = await _hold(session, run, cohort, plans, options, now)
        if total == 0:
            raise CohortInvalid("the cohort selects no account", field="cohort")
        run.total = total
        await _assign_waves(session, run, options)
        events = [registered] if registered is not None else []
        events.append(
            audit.EventIn(
                "run.create",
                "run",
                run.id,
                None,
                {
                    "rules": rules.ref,
                    "rules_hash": run.rules_hash,
                    "cohort": run.cohort,
                    "options": run.options,
                    "total": total,
                },
            )
        )
        await audit.record_many(session, actor, events)
    return run


async def _hold(
    session: AsyncSession,
    run: MigrationRun,
    cohort: Cohort,
    plans: list[str] | None,
    options: RunOptions,
    now: datetime,
) -> int:
    """Insert the cohort's queue rows, each holding its account (wave set later)."""
    total = 0
    batch: list[dict[str, Any]] = []

    async def flush() -> None:
        ids = [row["account_id"] for row in batch]
        held = (
            await session.execute(
                select(RunAccount.account_id, RunAccount.run_id).where(
                    RunAccount.hold_account_id.in_(ids)
                )
            )
        ).all()
        if held:
            shown = ", ".join(f"{a} (run {r})" for a, r in held[:5])
            raise AccountsInAnotherRun(
                f"{len(held)}+ account(s) are in another active run: {shown}",
                field="cohort",
            )
        try:
            await session.execute(insert(RunAccount), batch)
        except IntegrityError as exc:
            raise AccountsInAnotherRun(
                "some accounts were taken by another run meanwhile", field="cohort"
            ) from exc
        batch.clear()

    async for account_id, attributes in _selected(session, cohort, plans):
        batch.append(
            {
                "run_id": run.id,
                "account_id": account_id,
                "hold_account_id": account_id,
                "position": total,
                "priority": priority_of(attributes, account_id, options.priority),
                "wave": 0,
                "state": AccountState.PENDING,
                "attempts": 0,
                "updated_at": now,
            }
        )
        total += 1
        if len(batch) >= CHUNK:
            await flush()
    if batch:
        await flush()
    return total


async def _assign_waves(session: AsyncSession, run: MigrationRun, options: RunOptions) -> None:
    """The canary is a seeded sample of the cohort (the accounts whose hash of run id and
    account id is smallest), not its highest lane, so it is representative; the rest go in
    waves in claim order (priority, then cohort order)."""
    canary = options.canary_size(run.total)
    canary_ids: set[str] = set()
    if canary:
        import heapq

        heap: list[tuple[int, str]] = []
        async for chunk in _queue_ids(session, run.id):
            for account_id in chunk:
                key = -_sample_key(0, f"{run.id}:{account_id}")
                if len(heap) < canary:
                    heapq.heappush(heap, (key, account_id))
                elif key > heap[0][0]:
                    heapq.heapreplace(heap, (key, account_id))
        canary_ids = {a for _, a in heap}
    if not canary_ids and options.wave_size is None:
        return  # every account is in wave 0 already
    index = 0
    updates: list[dict[str, Any]] = []
    async for chunk in _queue_ids(session, run.id, by_priority=True):
        for account_id in chunk:
            if account_id in canary_ids:
                wave = 0
            else:
                wave = wave_after_canary(index, len(canary_ids), options)
                index += 1
            updates.append({"run_id": run.id, "account_id": account_id, "wave": wave})
        await _set_waves(session, updates)
        updates.clear()


async def _set_waves(session: AsyncSession, updates: list[dict[str, Any]]) -> None:
    """Bulk UPDATE by primary key (one executemany)."""
    await session.execute(update(RunAccount), updates)


async def _queue_ids(
    session: AsyncSession, run_id: str, *, by_priority: bool = False
) -> AsyncIterator[list[str]]:
    """The run's account ids in chunks: by position, or in claim order."""
    last: tuple[int, int] | None = None
    while True:
        query = select(RunAccount.account_id, RunAccount.priority, RunAccount.position).where(
            RunAccount.run_id == run_id
        )
        if by_priority:
            query = query.order_by(RunAccount.priority.desc(), RunAccount.position)
            if last is not None:
                p, pos = last
                query = query.where(
                    (RunAccount.priority < p)
                    | ((RunAccount.priority == p) & (RunAccount.position > pos))
                )
        else:
            query = query.order_by(RunAccount.position)
            if last is not None:
                query = query.where(RunAccount.position > last[1])
        rows = (await session.execute(query.limit(CHUNK))).all()
        if not rows:
            return
        yield [r[0] for r in rows]
        last = (rows[-1][1], rows[-1][2])


# -- reading -----------------------------------------------------------------------------------


async def get(session: AsyncSession, run_id: str, *, lock: bool = False) -> MigrationRun:
    query = select(MigrationRun).where(MigrationRun.id == run_id)
    if lock:
        query = query.with_for_update()
    run = (
        await session.execute(query.execution_options(populate_existing=True))
    ).scalar_one_or_none()
    if run is None:
        raise RunNotFound(f"no run {run_id}", field="run_id")
    return run


@dataclass(frozen=True)
class Progress:
    """A run's numbers, as ``runs status`` and ``GET /v1/runs/{id}`` show them."""

    total: int
    by_state: dict[str, int]
    done: int  # settled in the current phase
    failed_attempts: int
    rate: float | None  # accounts per second over the last minute of work
    eta_seconds: float | None
    waves: dict[int, dict[str, int]] = field(default_factory=dict)


async def progress(session: AsyncSession, run: MigrationRun, now: datetime) -> Progress:
    rows = (
        await session.execute(
            select(RunAccount.wave, RunAccount.state, func.count())
            .where(RunAccount.run_id == run.id)
            .group_by(RunAccount.wave, RunAccount.state)
        )
    ).all()
    by_state: Counter[str] = Counter()
    waves: dict[int, Counter[str]] = {}
    for wave, state, count in rows:
        by_state[state] += count
        waves.setdefault(wave, Counter())[state] += count
    failed = (
        await session.execute(
            select(func.count()).where(RunAccount.run_id == run.id, RunAccount.error.is_not(None))
        )
    ).scalar_one()
    from datetime import timedelta

    recent = (
        await session.execute(
            select(func.count(), func.min(RunAccount.done_at)).where(
                RunAccount.run_id == run.id,
                RunAccount.done_at.is_not(None),
                RunAccount.done_at > now - timedelta(seconds=60),
            )
        )
    ).one()
    waiting = by_state[AccountState.PENDING] + by_state[AccountState.CLAIMED]
    done = run.total - waiting
    rate = None
    if recent[0] and recent[1] is not None:
        first = recent[1] if recent[1].tzinfo else recent[1].replace(tzinfo=now.tzinfo)
        span = max((now - first).total_seconds(), 1.0)
        rate = recent[0] / span
    eta = waiting / rate if rate else None
    return Progress(
        total=run.total,
        by_state=dict(sorted(by_state.items())),
        done=done,
        failed_attempts=int(failed),
        rate=rate,
        eta_seconds=eta,
        waves={w: dict(sorted(c.items())) for w, c in sorted(waves.items())},
    )


async def list_runs(session: AsyncSession, *, limit: int = 50) -> list[MigrationRun]:
    return list(
        (
            await session.execute(
                select(MigrationRun).order_by(MigrationRun.created_at.desc()).limit(limit)
            )
        ).scalars()
    )


async def accounts(
    session: AsyncSession,
    run_id: str,
    *,
    state: str | None = None,
    after: int = -1,
    limit: int = 100,
) -> list[RunAccount]:
    """One page of the run's accounts in cohort order, after position ``after``."""
    query = (
        select(RunAccount)
        .where(RunAccount.run_id == run_id, RunAccount.position > after)
        .order_by(RunAccount.position)
        .limit(limit)
    )
    if state is not None:
        query = query.where(RunAccount.state == state)
    return list((await session.execute(query)).scalars())


# -- report ------------------------------------------------------------------------------------


async def pinned_hash(session: AsyncSession, rules: MigrationRules) -> str:
    """What a report is computed against: the rules and every plan they name, by content
    hash. Approval pins it; a start whose hash differs now is refused."""
    plans: dict[str, str | None] = {}
    for ref in [*rules.rules.from_plans, rules.rules.to]:
        try:
            _, digest = await catalog.get_plan(session, ref)
        except NotFound:
            digest = None
        plans[ref] = digest
    return content_hash({"rules": rules.content_hash(), "plans": plans})


async def rules_of(session: AsyncSession, run: MigrationRun) -> MigrationRules:
    from keyshift.migration.executor import rules_by_hash

    return await rules_by_hash(session, run.rules_hash)


class Planner:
    """Plans accounts against one run's rules, looking each catalog plan up once."""

    def __init__(self, rules: MigrationRules) -> None:
        self.rules = rules
        self._pairs: dict[str, PlanPair | None] = {}

    async def pair(self, session: AsyncSession, ref: str) -> PlanPair | None:
        if ref not in self._pairs:
            self._pairs[ref] = await plan_pair(session, ref)
        return self._pairs[ref]

    async def plans(
        self, session: AsyncSession, account_ids: Sequence[str], now: datetime
    ) -> dict[str, Any]:
        """Each account's plan (None for an account that is gone), from states read in one
        query per table."""
        states = {
            s["account"]["id"]: s for s in await migrations.read_states(session, account_ids, now)
        }
        target = await self.pair(session, self.rules.rules.to)
        if target is None:
            raise RunChanged(f"the target plan {self.rules.rules.to} is not published")
        out: dict[str, Any] = {}
        for account_id in account_ids:
            snapshot = states.get(account_id)
            if snapshot is None:
                out[account_id] = None
                continue
            sub = snapshot.get("subscription")
            source = await self.pair(session, sub["plan"]) if sub is not None else None
            out[account_id] = plan_migration(
                snapshot, self.rules, source, target, migration_id="run", now=now
            )
        return out


def verdict_of(plan: Any) -> str:
    if plan is None:
        return "gone"
    if not plan.eligible:
        return "ineligible"
    if plan.blocked:
        return "blocked"
    return "migrate"


#: The risks a report lists accounts for, by the planner's risk prefix.
RISKS = {
    "loses_feature": "would lose a feature",
    "over_quota": "would be over a quota",
    "data_to_archive": "would archive data",
    "activations_trimmed": "would lose activations",
    "drops_addon": "would lose an add-on",
}


async def report(
    db: Database,
    actor: Actor,
    run_id: str,
    *,
    clock: Callable[[], datetime] = utcnow,
    throughput: float | None = None,
) -> MigrationRun:
    """Plan every account of the run (reads only) and record the counts, the accounts at
    risk and each account's verdict and outcome digest, which a worker compares when it
    claims the account. Streamed: one chunk of accounts per transaction."""
    async with db.transaction() as session:
        run = await get(session, run_id)
        check_move("report", run.state, run.id)
        rules = await rules_of(session, run)
        digest = await pinned_hash(session, rules)
    planner = Planner(rules)
    verdicts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    policies: Counter[str] = Counter()
    risks: dict[str, dict[str, Any]] = {k: {"count": 0, "accounts": []} for k in RISKS}
    after = -1
    now = clock()
    while True:
        async with db.transaction() as session:
            rows = (
                await session.execute(
                    select(RunAccount.account_id, RunAccount.position)
                    .where(RunAccount.run_id == run_id, RunAccount.position > after)
                    .order_by(RunAccount.position)
                    .limit(CHUNK)
                )
            ).all()
            if not rows:
                break
            updates = []
            plans = await planner.plans(session, [account_id for account_id, _ in rows], now)
            for account_id, _ in rows:
                plan = plans[account_id]
                verdict = verdict_of(plan)
                verdicts[verdict] += 1
                if plan is not None:
                    if verdict != "migrate":
                        for reason in plan.reasons:
                            if len(reasons) < 100 or reason in reasons:
                                reasons[reason] += 1
                    for conflict in plan.conflicts:
                        policies[conflict.policy] += 1
                    seen = {risk.split(":", 1)[0] for risk in plan.risks}
                    for kind in seen & risks.keys():
                        risks[kind]["count"] += 1
                        if len(risks[kind]["accounts"]) < LISTED:
                            risks[kind]["accounts"].append(account_id)
                updates.append(
                    {
                        "run_id": run_id,
                        "account_id": account_id,
                        "verdict": verdict,
                        "expected_digest": plan.outcome_digest() if plan is not None else None,
                    }
                )
            await session.execute(update(RunAccount), updates)
            after = rows[-1][1]
    migrating = verdicts["migrate"]
    body = {
        "generated_at": now.isoformat().replace("+00:00", "Z"),
        "total": sum(verdicts.values()),
        "outcomes": dict(sorted(verdicts.items())),
        "ineligible_reasons": dict(reasons.most_common()),
        "conflict_policies": dict(sorted(policies.items())),
        "risks": {k: v for k, v in risks.items() if v["count"]},
        "estimate": {
            "accounts_per_second": throughput,
            "seconds": round(migrating / throughput, 1) if throughput else None,
        },
        "hash": digest,
    }
    async with db.transaction() as session:
        run = await get(session, run_id, lock=True)
        check_move("report", run.state, run.id)
        run.report, run.report_hash, run.state = body, digest, RunState.REPORTED
        run.updated_at = clock()
        await audit.record(
            session,
            actor,
            "run.report",
            "run",
            run.id,
            details={"outcomes": body["outcomes"], "hash": digest},
        )
    return run


async def measured_throughput(session: AsyncSession) -> float | None:
    """Accounts per second of the most recent completed run, for a report's estimate."""
    run = (
        await session.execute(
            select(MigrationRun)
            .where(
                MigrationRun.state.in_([RunState.COMPLETED, RunState.FINALIZED]),
                MigrationRun.started_at.is_not(None),
                MigrationRun.finished_at.is_not(None),
            )
            .order_by(MigrationRun.finished_at.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    if run is None or run.started_at is None or run.finished_at is None:
        return None
    seconds = (run.finished_at - run.started_at).total_seconds()
    return round(run.total / seconds, 1) if seconds > 0 else None


# -- transitions -------------------------------------------------------------------------------


async def _transition(
    db: Database,
    actor: Actor,
    run_id: str,
    move: str,
    apply: Callable[[AsyncSession, MigrationRun], Any],
    *,
    clock: Callable[[], datetime] = utcnow,
    details: dict[str, Any] | None = None,
) -> MigrationRun:
    async with db.transaction() as session:
        run = await get(session, run_id, lock=True)
        check_move(move, run.state, run.id)
        before = run.state
        result = apply(session, run)
        if hasattr(result, "__await__"):
            await result
        run.updated_at = clock()
        await audit.record(
            session,
            actor,
            f"run.{move}",
            "run",
            run.id,
            details={"from": before, "to": run.state, **(details or {})},
        )
    return run


async def approve(
    db: Database,
    actor: Actor,
    run_id: str,
    *,
    four_eyes: bool = False,
    clock: Callable[[], datetime] = utcnow,
) -> MigrationRun:
    def apply(session: AsyncSession, run: MigrationRun) -> None:
        if four_eyes and actor.id == run.created_by:
            raise FourEyes(
                f"run {run.id} was created by {actor.id}; four eyes are required, so another"
                " person approves it",
                field="actor",
            )
        run.state, run.approved_hash = RunState.APPROVED, run.report_hash
        run.approved_by, run.approved_at = actor.id, clock()

    return await _transition(db, actor, run_id, "approve", apply, clock=clock)


async def start(
    db: Database, actor: Actor, run_id: str, *, clock: Callable[[], datetime] = utcnow
) -> MigrationRun:
    async def apply(session: AsyncSession, run: MigrationRun) -> None:
        now_hash = await pinned_hash(session, await rules_of(session, run))
        if now_hash != run.approved_hash:
            raise RunChanged(
                f"run {run.id}: its rules or catalog plans changed since the report it was"
                " approved on; report and approve it again",
                field="run_id",
            )
        run.state, run.started_at = RunState.RUNNING, clock()
        # The run's accounts were written in bulk (create, report): the workers' claims and
        # settles need the planner's statistics of them, not autovacuum's schedule.
        await analyze(session, "run_accounts")

    return await _transition(db, actor, run_id, "start", apply, clock=clock)


async def pause(
    db: Database, actor: Actor, run_id: str, *, clock: Callable[[], datetime] = utcnow
) -> MigrationRun:
    def apply(session: AsyncSession, run: MigrationRun) -> None:
        run.state = RunState.PAUSED

    return await _transition(db, actor, run_id, "pause", apply, clock=clock)


async def resume(
    db: Database, actor: Actor, run_id: str, *, clock: Callable[[], datetime] = utcnow
) -> MigrationRun:
    def apply(session: AsyncSession, run: MigrationRun) -> None:
        run.state, run.halted_reason = RunState.RUNNING, None

    return await _transition(db, actor, run_id, "resume", apply, clock=clock)


async def _release(session: AsyncSession, run_id: str) -> None:
    """The run no longer holds its accounts; unclaimed ones will not be migrated by it."""
    await session.execute(
        update(RunAccount).where(RunAccount.run_id == run_id).values(hold_account_id=None)
    )


async def abort(
    db: Database, actor: Actor, run_id: str, *, clock: Callable[[], datetime] = utcnow
) -> MigrationRun:
    """Stop for good: nothing new starts, the accounts are released. Accounts already
    migrated stay migrated (``rollback`` undoes them)."""

    async def apply(session: AsyncSession, run: MigrationRun) -> None:
        run.state, run.finished_at = RunState.ABORTED, clock()
        await _release(session, run.id)
        await outbox.cancel(
            session, kinds=[NoticeKind.SCHEDULED], run_id=run.id, reason="the run was aborted"
        )

    return await _transition(db, actor, run_id, "abort", apply, clock=clock)


async def complete_if_done(db: Database, actor: Actor, run_id: str, now: datetime) -> bool:
    """Complete a running run whose accounts are all settled (a blue-green run's prepare
    phase becomes ``ready`` instead); a rollback ends as ``rolled_back``. Returns whether
    the run moved."""
    async with db.transaction() as session:
        run = await get(session, run_id, lock=True)
        if run.state not in (RunState.RUNNING, RunState.ROLLING_BACK):
            return False
        if run.state == RunState.RUNNING:
            waiting = (
                await session.execute(
                    select(func.count()).where(
                        RunAccount.run_id == run.id,
                        RunAccount.state.in_([AccountState.PENDING, AccountState.CLAIMED]),
                    )
                )
            ).scalar_one()
            if waiting:
                return False
            before = run.state
            if run.phase == Phase.PREPARE:
                run.state = RunState.READY
            else:
                run.state, run.finished_at = RunState.COMPLETED, now
        else:
            left = (
                await session.execute(
                    select(func.count()).where(
                        RunAccount.run_id == run.id,
                        RunAccount.state.in_(
                            [AccountState.MIGRATED, AccountState.PREPARED, AccountState.CLAIMED]
                        ),
                    )
                )
            ).scalar_one()
            if left:
                return False
            before = run.state
            run.state, run.finished_at = RunState.ROLLED_BACK, now
            await _release(session, run.id)
        run.updated_at = now
        await audit.record(
            session,
            actor,
            f"run.{run.state}",
            "run",
            run.id,
            details={"from": before, "to": run.state},
        )
        return True


def is_active(state: str) -> bool:
    return state in ACTIVE


def new_worker_id() -> str:
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}:{random.randrange(16**6):06x}"


async def rollback(
    db: Database, actor: Actor, run_id: str, *, clock: Callable[[], datetime] = utcnow
) -> MigrationRun:
    """Start rolling the whole run back: nothing new starts (accounts not yet started are
    skipped), and workers roll every account the run moved back, newest first. Calling it
    again on a run already rolling back changes nothing (the workers resume the work)."""

    async def apply(session: AsyncSession, run: MigrationRun) -> None:
        if run.state == RunState.ROLLING_BACK:
            return
        run.state, run.phase = RunState.ROLLING_BACK, Phase.ROLLBACK
        await outbox.cancel(
            session, kinds=[NoticeKind.SCHEDULED], run_id=run.id, reason="the run was rolled back"
        )
        await session.execute(
            update(RunAccount)
            .where(RunAccount.run_id == run.id, RunAccount.state == AccountState.PENDING)
            .values(state=AccountState.SKIPPED, error="not started: the run was rolled back")
        )

    return await _transition(db, actor, run_id, "rollback", apply, clock=clock)


async def cutover(
    db: Database,
    actor: Actor,
    run_id: str,
    *,
    at: datetime | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> MigrationRun:
    """Blue-green: the cutoff. Every prepared account is queued to flip; ``at`` (default
    now) is the effective time on every account's receipt."""
    cutoff = at or clock()

    async def apply(session: AsyncSession, run: MigrationRun) -> None:
        run.state, run.phase, run.cutoff_at = RunState.RUNNING, Phase.FLIP, cutoff
        await session.execute(
            update(RunAccount)
            .where(RunAccount.run_id == run.id, RunAccount.state == AccountState.PREPARED)
            .values(state=AccountState.PENDING)
        )

    return await _transition(
        db,
        actor,
        run_id,
        "cutover",
        apply,
        clock=clock,
        details={"cutoff_at": cutoff.isoformat().replace("+00:00", "Z")},
    )


async def finalize(
    db: Database,
    actor: Actor,
    run_id: str,
    finalize_many: Callable[[list[str]], Awaitable[Mapping[str, object]]],
    *,
    clock: Callable[[], datetime] = utcnow,
) -> MigrationRun:
    """Finalize every migration the run completed (old copies released, snapshots retired:
    no rollback after), ``CHUNK`` of them in each call of ``finalize_many`` (one set-based
    transaction: ``rollback.finalize_many``), then the run. Resumable and idempotent: a
    finalized migration is left as it is. A migration that cannot be finalized stops it with
    its error; the run stays completed."""
    async with db.transaction() as session:
        run = await get(session, run_id)
        check_move("finalize", run.state, run.id)
    async for chunk in migrated_accounts(db, run_id):
        ids = [migration_id for _, migration_id in chunk if migration_id is not None]
        results = await finalize_many(ids) if ids else {}
        for migration_id in ids:
            if isinstance(error := results.get(migration_id), KeyshiftError):
                raise error

    async def apply(session: AsyncSession, run: MigrationRun) -> None:
        run.state = RunState.FINALIZED
        await _release(session, run.id)

    return await _transition(db, actor, run_id, "finalize", apply, clock=clock)


@dataclass(frozen=True)
class Verified:
    account_id: str
    migration_id: str
    problems: list[str]


async def verify_sample(
    db: Database, run_id: str, size: int, *, seed: int = 0, clock: Callable[[], datetime] = utcnow
) -> list[Verified]:
    """Check a seeded random sample of the run's migrated accounts against the state their
    migration expected (``compare_after_cutover``: exact plan, licenses and objects; counters
    at least what was expected; every kept machine present). Reads only."""
    import heapq

    from keyshift.db.tables import Migration
    from keyshift.migration.executor import compare_after_cutover
    from keyshift.migration.state import Snapshot

    chosen: list[tuple[int, str, str | None]] = []
    async with db.transaction() as session:
        await get(session, run_id)
    async for chunk in migrated_accounts(db, run_id):
        for account_id, migration_id in chunk:
            item = (-_sample_key(seed, f"{run_id}:{account_id}"), account_id, migration_id)
            if len(chosen) < size:
                heapq.heappush(chosen, item)
            elif item[0] > chosen[0][0]:
                heapq.heapreplace(chosen, item)
    out = []
    now = clock()
    picked = sorted(chosen, key=lambda c: c[1])
    for start in range(0, len(picked), CHUNK):
        part = picked[start : start + CHUNK]
        async with db.transaction() as session:
            ids = [m for _, _, m in part if m]
            rows = {
                r.id: r
                for r in (await session.execute(select(Migration).where(Migration.id.in_(ids))))
                .scalars()
                .all()
            }
            states = {
                s["account"]["id"]: s
                for s in await migrations.read_states(session, [a for _, a, _ in part], now)
            }
        for _, account_id, migration_id in part:
            row = rows.get(migration_id) if migration_id else None
            actual = states.get(account_id)
            if row is None or actual is None or row.plan is None:
                out.append(
                    Verified(account_id, migration_id or "", ["the migration or account is gone"])
                )
                continue
            expected = row.plan["expected"]
            # A finalized migration has retired its snapshot; only its time was wanted here.
            snapshot = cast(Snapshot, row.snapshot or {"taken_at": ""})
            problems = compare_after_cutover(expected, actual, snapshot)
            out.append(Verified(account_id, row.id, problems))
    return out


async def migrated_accounts(
    db: Database, run_id: str
) -> AsyncIterator[list[tuple[str, str | None]]]:
    """The run's migrated accounts — (account id, migration id) — in chunks of ``CHUNK``, in
    the run's order, one transaction per chunk (constant memory over any cohort)."""
    after = -1
    while True:
        async with db.transaction() as session:
            rows = (
                await session.execute(
                    select(RunAccount.position, RunAccount.account_id, RunAccount.migration_id)
                    .where(
                        RunAccount.run_id == run_id,
                        RunAccount.state == AccountState.MIGRATED,
                        RunAccount.position > after,
                    )
                    .order_by(RunAccount.position)
                    .limit(CHUNK)
                )
            ).all()
        if not rows:
            return
        yield [(account_id, migration_id) for _, account_id, migration_id in rows]
        after = rows[-1][0]
