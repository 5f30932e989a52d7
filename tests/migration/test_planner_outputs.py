"""The planner and the state reader give, byte for byte, what they gave before they were made
faster: every account of a seeded synthetic dataset (400 accounts, on each database) read with
``repository.read_states`` and planned under eight rules files, compared by hash with
``data/planner_outputs.json``.

The fixture was written by ``tests/migration/planner_reference.py`` (run as a script) at commit
3c084ce, before any of the planner's or the state reader's speed-ups, from a scratch SQLite
file, with a scratch PostgreSQL database checked to give the same. Each entry hashes a state's
canonical JSON (every field), its ``state_hash``, or a plan's canonical ``to_dict()`` (which
holds ``outcome_digest()``); the outcome digests are also hashed per rules file.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyshift.canonical import canonical_json
from keyshift.db.engine import Database
from keyshift.migration import repository
from keyshift.migration import state as state_module
from keyshift.migration.planner import MigrationPlan
from keyshift.migration.state import derived_id
from tests.migration import planner_reference as ref

#: What the dataset must reach, at the least, for the comparison to prove anything.
REQUIRED_COVERAGE = {
    "eligible",
    "ineligible",
    "blocked",
    "conflict:archive",
    "conflict:block",
    "conflict:grace",
    "conflict:read_only",
    "counter:carry",
    "counter:convert",
    "counter:prorate",
    "counter:reset",
    "deactivate",
    "changes:activations_converted",
    "changes:activations_grandfathered",
    "changes:licenses",
    "effective:at",
    "effective:immediately",
    "effective:period_end",
    "overrides:addons",
    "overrides:grace",
    "overrides:meters",
    "overrides:read_only",
    "risk:drops_addon",
    "risk:loses_feature",
}


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(ref.FIXTURE.read_bytes())
    return data


def _mismatches(name: str, got: list[Any], want: list[Any]) -> list[str]:
    assert len(got) == len(want), f"{name}: {len(got)} entries, the fixture has {len(want)}"
    ids = ref.account_ids()
    return [
        f"{name}: account {i} ({ids[i]})"
        for i, (g, w) in enumerate(zip(got, want, strict=True))
        if g != w
    ]


def _check_plans(plans: dict[str, list[MigrationPlan]], expected: dict[str, Any]) -> None:
    assert sorted(plans) == sorted(expected["plans"])
    wrong: list[str] = []
    for rules_ref, plan_list in plans.items():
        wrong += _mismatches(
            rules_ref, [ref.plan_output(p) for p in plan_list], expected["plans"][rules_ref]
        )
    digests = {
        r: ref.short(ref.content_hash([p.outcome_digest() for p in plan_list]))
        for r, plan_list in plans.items()
    }
    assert not wrong, f"{len(wrong)} plan(s) differ from the reference, first: {wrong[:5]}"
    assert digests == expected["outcome_digests"]


async def test_states_and_plans_are_byte_identical_to_the_reference(
    db: Database, expected: dict[str, Any]
) -> None:
    await ref.seed_dataset(db)
    states = await ref.read(db)
    wrong = _mismatches("state", [ref.state_output(s) for s in states], expected["states"])
    assert not wrong, f"{len(wrong)} state(s) differ from the reference, first: {wrong[:5]}"

    # One account's read (ORM rows, by name) gives what the batch read (rows by position) does.
    async with db.transaction() as session:
        for state in states[::8]:
            single = await repository.read_state(session, state["account"]["id"], ref.NOW)
            assert single == state

    rules = ref.load_all_rules()
    assert {r.ref: r.content_hash() for r in rules} == expected["rules_hashes"]
    pairs = await ref.plan_pairs(db, rules)
    before = [canonical_json(s) for s in states]
    plans = ref.plan_all(states, rules, pairs)
    # Planning reads the snapshot and changes none of it.
    assert [canonical_json(s) for s in states] == before
    _check_plans(plans, expected)
    coverage = ref.coverage(plans)
    assert coverage == expected["coverage"]
    assert set(coverage) >= REQUIRED_COVERAGE

    # Each plan's data is its own: scribbling over every plan made so far (as a caller that
    # edits a plan's dicts in place might) leaves the next plans as they were.
    for plan_list in plans.values():
        for plan in plan_list:
            _scribble(plan.to_dict())
            _scribble(plan.expected)
            _scribble(plan.changes)
    # ... and shares nothing with the snapshots it was made from.
    assert [canonical_json(s) for s in states] == before
    _check_plans(ref.plan_all(states, rules, pairs), expected)


def _scribble(value: Any) -> None:
    """Overwrite every dict and list inside ``value``, in place."""
    if isinstance(value, dict):
        for key in list(value):
            _scribble(value[key])
            value[key] = "scribbled"
        value["scribbled"] = True
    elif isinstance(value, list):
        for item in value:
            _scribble(item)
        value[:] = ["scribbled"]


@given(migration_id=st.text(), kind=st.text(), source_id=st.text())
def test_a_derived_id_is_the_uuid5_of_its_parts(
    migration_id: str, kind: str, source_id: str
) -> None:
    # derived_id hashes on from the namespace's SHA-1 instead of calling uuid.uuid5.
    name = f"{migration_id}:{kind}:{source_id}"
    assert derived_id(migration_id, kind, source_id) == str(
        uuid.uuid5(state_module._NAMESPACE, name)
    )
