"""The pure counting core (no database): counters equal the sum of accepted events, a block
meter refuses the first event that would overshoot, each threshold is tried once, on the
event that crosses it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from keyshift.metering.meters import MeterSpec
from keyshift.metering.tally import Step, count

quantities = st.lists(st.integers(min_value=0, max_value=50), max_size=60)


def _spec(aggregation: str = "sum", overage: str = "block", included: int = 100) -> MeterSpec:
    notify = (50, 100) if overage != "block" else ()
    return MeterSpec("m", "unit", aggregation, "month", included, overage, notify)


@given(quantities, st.integers(min_value=0, max_value=120))
def test_a_block_sum_counts_everything_or_refuses_the_first_overshoot(
    values: list[int], before: int
) -> None:
    result = count(_spec(), before, [Step(i, q) for i, q in enumerate(values)], set())
    running = before
    for i, q in enumerate(values):
        if q and running + q > 100:
            assert result.refusal is not None and result.refusal.index == i
            assert result.refusal.used == running and result.refusal.needs == q
            return
        running += q
    assert result.refusal is None and result.used == before + sum(values)
    assert [s.used for s in result.steps][-1:] in ([], [result.used])


@given(quantities, st.integers(min_value=0, max_value=200))
def test_an_allow_sum_counts_everything_and_tries_each_notice_once(
    values: list[int], before: int
) -> None:
    result = count(
        _spec(overage="allow"), before, [Step(i, q) for i, q in enumerate(values)], set()
    )
    assert result.refusal is None and result.used == before + sum(values)
    assert sum(s.counted for s in result.steps) == sum(values)
    for notice in result.notices:
        step = next(s for s in result.steps if s.index == notice.index)
        assert notice.used == step.used
        if notice.kind == "threshold":
            units = 50 if notice.threshold == 50 else 100
            assert step.used - step.counted < units <= step.used
        else:  # the overage flag: the first event past what is included
            assert step is next(s for s in result.steps if s.used > 100)
    kinds = [(n.kind, n.threshold) for n in result.notices]
    assert len(kinds) == len(set(kinds))


@given(st.lists(st.sampled_from("abcdef"), max_size=40), st.sets(st.sampled_from("abcdef")))
def test_a_unique_meter_counts_each_new_member_once(members: list[str], new: set[str]) -> None:
    steps = [Step(i, 1, m) for i, m in enumerate(members)]
    result = count(_spec("unique", "allow", 3), 10, steps, new)
    assert result.used == 10 + len(new & set(members))
    assert sum(s.counted for s in result.steps) == len(new & set(members))


@given(quantities, st.integers(min_value=0, max_value=80))
def test_a_max_meter_keeps_the_peak(values: list[int], before: int) -> None:
    result = count(
        _spec("max", "notify", 60), before, [Step(i, q) for i, q in enumerate(values)], set()
    )
    assert result.used == max([before, *values])
    assert all(s.counted == 0 for s in result.steps)


def test_a_block_max_meter_refuses_a_new_peak_past_the_quota() -> None:
    spec = _spec("max", "block", 60)
    result = count(spec, 10, [Step(0, 40), Step(1, 61), Step(2, 5)], set())
    assert result.refusal is not None and result.refusal.index == 1
    assert result.refusal.used == 40 and result.refusal.needs == 21
