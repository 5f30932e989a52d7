"""Property: for any account state and rules variant, apply → rollback gives back the snapshot's
hash, and apply alone gives exactly the plan's expected state (on both databases)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.migration.executor import Executor
from keyshift.migration.rollback import rollback
from keyshift.migration.state import differences, state_hash
from keyshift.security.secrets_store import Secrets
from tests.conftest import reset
from tests.migration import helpers

POLICIES = [
    '{ on_conflict = "archive" }',
    '{ on_conflict = "read_only" }',
    '{ on_conflict = "grace", grace_days = 5 }',
]
COUNTERS = ['"carry"', '"reset"', '{ action = "convert", factor = 0.5 }', '{ action = "prorate" }']
SEATS = ['"trim_to_cap"', '"keep_all"']


def _rules(policy: int, counter: int, seats: int, version: int) -> str:
    return (
        helpers.RULES.replace('version = "1"', f'version = "p{version}"', 1)
        .replace('projects = { on_conflict = "archive" }', f"projects = {POLICIES[policy]}")
        .replace('exports = "carry"', f"exports = {COUNTERS[counter]}")
        .replace('activations = "trim_to_cap"', f"activations = {SEATS[seats]}")
    )


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    objects=st.integers(min_value=0, max_value=6),
    exports=st.integers(min_value=0, max_value=500),
    policy=st.integers(min_value=0, max_value=len(POLICIES) - 1),
    counter=st.integers(min_value=0, max_value=len(COUNTERS) - 1),
    seats=st.integers(min_value=0, max_value=len(SEATS) - 1),
)
async def test_apply_reaches_the_plan_and_rollback_restores_the_snapshot(
    db: Database,
    secrets: Secrets,
    objects: int,
    exports: int,
    policy: int,
    counter: int,
    seats: int,
) -> None:
    await reset(db)
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets, objects=objects, exports=exports)
    before = state_hash(await helpers.state_of(db, account_id))
    executor = Executor(db, secrets.signing)
    rules = helpers.rules(_rules(policy, counter, seats, objects))

    row = await executor.apply(SYSTEM, rules, account_id)

    assert row.state == "completed", row.error
    assert row.snapshot_hash == before
    after = await helpers.state_of(db, account_id)
    assert differences(row.plan["expected"], after) == []
    rolled = await rollback(executor, SYSTEM, row.id)
    assert rolled.state == "rolled_back"
    assert state_hash(await helpers.state_of(db, account_id)) == before
