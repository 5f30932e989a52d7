"""The checks of "no downtime" (``test_no_downtime.py``, and ``benchmarks/zero_downtime.py``
at scale): no request failed; every answer a validator got carries the old or the new
entitlements whole, never a mix; and every usage event acknowledged is in the counters exactly
once, once the counter moves the migrations recorded in their ledger are taken into account.
``Findings.problems`` says what failed, in words; none is the only passing outcome.

Imports nothing from pytest: the benchmark imports it as a script does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import select

from keyshift.canonical import content_hash
from keyshift.db.engine import Database
from keyshift.db.tables import MigrationStep, UsageCounter
from keyshift.states import Step, StepOutcome

K = TypeVar("K", bound=Hashable)

#: (account id, meter): what a usage balance is kept per.
CounterKey = tuple[str, str]
#: Account ids per query: far below asyncpg's 32,767 parameters.
_CHUNK = 5_000


def entitlements_digest(entitlements: Mapping[str, Any] | None) -> str:
    """One entitlement set as a hash of its canonical JSON: equal digests, equal sets."""
    return content_hash(entitlements)


# -- answers: old or new, whole ----------------------------------------------------------------


@dataclass(frozen=True)
class AnswerVerdict:
    """How the answers of a migration compare with each subject's old and new entitlements."""

    answers: int
    old: int  # equal to the old set (and the new one differs)
    new: int  # equal to the new set (or old and new are the same)
    mixed: int  # equal to neither: a reader saw a mix, or something else
    back_to_old: int  # old again after the same subject had answered new (two caches)
    subjects_seen_both: int  # subjects that answered both (they differ): a cutover observed
    mixed_examples: tuple[tuple[Any, str], ...] = ()


@dataclass
class AnswerLog(Generic[K]):
    """The entitlement digests each subject (a license and fingerprint …) answered with, in
    the order the answers arrived."""

    by_subject: dict[K, list[str]] = field(default_factory=dict)

    def record(self, subject: K, entitlements: Mapping[str, Any] | None) -> str:
        """File one answer's entitlements under its subject; returns their digest."""
        digest = entitlements_digest(entitlements)
        self.by_subject.setdefault(subject, []).append(digest)
        return digest

    def verdict(
        self, old: Mapping[K, str], new: Mapping[K, str], examples: int = 5
    ) -> AnswerVerdict:
        """Each answer against its subject's ``old`` and ``new`` digests (a subject missing
        from either counts every answer of it as mixed)."""
        counts: Counter[str] = Counter()
        shown: list[tuple[Any, str]] = []
        both = 0
        for subject, digests in self.by_subject.items():
            before, after = old.get(subject), new.get(subject)
            saw_new = False
            for digest in digests:
                if digest == after:
                    counts["new"] += 1
                    saw_new = True
                elif digest == before:
                    counts["old"] += 1
                    counts["back_to_old"] += saw_new
                else:
                    counts["mixed"] += 1
                    if len(shown) < examples:
                        shown.append((subject, digest))
            both += before != after and before in digests and after in digests
        return AnswerVerdict(
            answers=sum(len(d) for d in self.by_subject.values()),
            old=counts["old"],
            new=counts["new"],
            mixed=counts["mixed"],
            back_to_old=counts["back_to_old"],
            subjects_seen_both=both,
            mixed_examples=tuple(shown),
        )


# -- usage: acknowledged events against the counters -------------------------------------------


@dataclass(frozen=True)
class UsageBalance:
    """Counters after = counters before + units acknowledged + the migrations' counter moves,
    per (account, meter). ``lost``: units short; ``extra``: units over (counted twice, or
    counted without an acknowledgement)."""

    lost: int
    extra: int
    off: dict[CounterKey, int]  # after - expected, where not zero

    @property
    def balanced(self) -> bool:
        return not self.off


def usage_balance(
    before: Mapping[CounterKey, int],
    acknowledged: Mapping[CounterKey, int],
    moves: Mapping[CounterKey, int],
    after: Mapping[CounterKey, int],
) -> UsageBalance:
    off = {}
    for key in {*before, *acknowledged, *moves, *after}:
        expected = before.get(key, 0) + acknowledged.get(key, 0) + moves.get(key, 0)
        if (difference := after.get(key, 0) - expected) != 0:
            off[key] = difference
    return UsageBalance(
        lost=-sum(d for d in off.values() if d < 0),
        extra=sum(d for d in off.values() if d > 0),
        off=dict(sorted(off.items())),
    )


def _chunks(ids: Collection[str]) -> Iterable[list[str]]:
    ordered = sorted(ids)
    for start in range(0, len(ordered), _CHUNK):
        yield ordered[start : start + _CHUNK]


async def read_counters(db: Database, account_ids: Collection[str]) -> Counter[CounterKey]:
    """Every counter of these accounts, summed over its periods, per (account, meter)."""
    totals: Counter[CounterKey] = Counter()
    async with db.transaction() as session:
        for chunk in _chunks(account_ids):
            rows = await session.execute(
                select(UsageCounter.account_id, UsageCounter.meter, UsageCounter.used).where(
                    UsageCounter.account_id.in_(chunk)
                )
            )
            for account_id, meter, used in rows:
                totals[(account_id, meter)] += int(used)
    return totals


async def read_counter_moves(db: Database, account_ids: Collection[str]) -> Counter[CounterKey]:
    """What the migrations of these accounts did to their counters, per (account, meter), as
    their ledger says: each cutover's ``counters[].delta``, less each rollback's
    ``counters_restored[].delta``."""
    moves: Counter[CounterKey] = Counter()
    async with db.transaction() as session:
        for chunk in _chunks(account_ids):
            rows = await session.execute(
                select(MigrationStep.account_id, MigrationStep.step, MigrationStep.details).where(
                    MigrationStep.account_id.in_(chunk),
                    MigrationStep.step.in_([Step.CUTOVER, Step.ROLLBACK]),
                    MigrationStep.outcome.in_([StepOutcome.DONE, StepOutcome.INEXACT]),
                )
            )
            for account_id, step, details in rows:
                if step == Step.CUTOVER:
                    for entry in details.get("counters", []):
                        moves[(account_id, entry["meter"])] += int(entry["delta"])
                else:
                    for entry in details.get("counters_restored", []):
                        moves[(account_id, entry["meter"])] -= int(entry["delta"])
    return moves


# -- the verdict ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Findings:
    """What the checks found. Every number must be zero."""

    errors: Mapping[str, int]  # failed requests by kind: non-2xx, lost connection, not valid
    answers: AnswerVerdict
    usage: UsageBalance
    stale_after: int = 0  # old answers once the migrations were over (and settled)
    invalid_after: int = 0  # subjects valid before, not valid after
    events_lost: int = 0  # acknowledged, not stored
    events_unacknowledged: int = 0  # stored, never acknowledged

    def problems(self) -> list[str]:
        found = [f"{kind}: {count}" for kind, count in sorted(self.errors.items()) if count]
        if self.answers.mixed:
            found.append(f"{self.answers.mixed} answers with mixed entitlements")
        if self.stale_after:
            found.append(f"{self.stale_after} answers still old after the migrations settled")
        if self.invalid_after:
            found.append(f"{self.invalid_after} valid before the migrations, not valid after")
        if not self.usage.balanced:
            found.append(
                f"usage counters off: {self.usage.lost} units lost, {self.usage.extra} extra,"
                f" on {len(self.usage.off)} (account, meter)"
            )
        if self.events_lost or self.events_unacknowledged:
            found.append(
                f"usage events: {self.events_lost} acknowledged and not stored,"
                f" {self.events_unacknowledged} stored and never acknowledged"
            )
        return found
