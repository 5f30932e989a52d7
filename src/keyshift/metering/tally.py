"""Counting new events into one counter: pure, no I/O. Given the counter's value read under
its lock and the new events of a request in lock order, decide what each event adds, the
running value after each, the first event a ``block`` meter must refuse, and which
thresholds and overage flags to try (each fires once per period; the table decides)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from keyshift.metering.meters import MeterSpec


@dataclass(frozen=True, slots=True)
class Step:
    """One new event for this counter; ``index`` is its place in the request."""

    index: int
    quantity: int
    member_hash: str | None = None


@dataclass(frozen=True, slots=True)
class Counted:
    index: int
    counted: int  # what the event added (0 for a member already seen, or a non-block max)
    used: int  # the counter after the event


@dataclass(frozen=True, slots=True)
class Refusal:
    """A ``block`` meter has no room for the event at ``index``; ``used`` is before it."""

    index: int
    used: int
    needs: int


@dataclass(frozen=True, slots=True)
class NoticeTry:
    """A threshold (``kind`` "threshold", percent) or the overage flag ("overage", 0) crossed
    first by the event at ``index``, with the counter's value after that event."""

    index: int
    kind: str
    threshold: int
    used: int


@dataclass(frozen=True)
class Tally:
    steps: list[Counted]
    used: int  # the counter after the last event
    refusal: Refusal | None = None
    notices: tuple[NoticeTry, ...] = ()


def count(spec: MeterSpec, used: int, steps: Sequence[Step], new_members: set[str]) -> Tally:
    """Apply ``steps`` in order to a counter at ``used``. ``new_members`` are the member hashes
    of a ``unique`` meter not seen before this request (the first event carrying one counts
    it). Stops at the first event a ``block`` meter refuses: the request is all or nothing."""
    fresh = set(new_members)
    counted: list[Counted] = []
    for step in steps:
        if spec.aggregation == "unique":
            is_new = step.member_hash in fresh
            fresh.discard(step.member_hash or "")
            proposed = used + (1 if is_new else 0)
        elif spec.aggregation == "max":
            proposed = max(used, step.quantity)
        else:
            proposed = used + step.quantity
        if spec.is_blocking:
            if proposed > used and proposed > spec.included:
                return Tally(counted, used, Refusal(step.index, used, proposed - used))
            delta = proposed - used
        else:
            delta = 0 if spec.aggregation == "max" else proposed - used
        used = proposed
        counted.append(Counted(step.index, delta, used))
    return Tally(counted, used, None, notice_tries(spec, counted))


def notice_tries(spec: MeterSpec, counted: Sequence[Counted]) -> tuple[NoticeTry, ...]:
    """The first event crossing each threshold (exact for sums and distinct counts, whose
    counter is locked; a max meter may jump, so any value at or past it counts), and for
    ``allow``/``notify`` meters the first event past ``included``."""
    tries: list[NoticeTry] = []
    for percent in spec.notify_at:
        units = spec.threshold_units(percent)
        for step in counted:
            before = step.used - step.counted
            if before < units <= step.used or (spec.aggregation == "max" and step.used >= units):
                tries.append(NoticeTry(step.index, "threshold", percent, step.used))
                break
    if not spec.is_blocking:
        over = next((s for s in counted if s.used > spec.included), None)
        if over is not None:
            tries.append(NoticeTry(over.index, "overage", 0, over.used))
    return tuple(tries)
