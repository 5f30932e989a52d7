"""Property: for any account state and rules variant, between node-locked and floating plans
either way, apply → rollback gives back the snapshot's hash (and every machine's mode and
lease), and apply alone gives exactly the plan's expected state, in which every license
validates with its key and with each machine kept — ``keep_all`` over the target's lower cap
included (on both databases)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.migration.executor import Executor
from keyshift.migration.rollback import rollback
from keyshift.migration.state import differences, state_hash
from keyshift.security.secrets_store import Secrets
from keyshift.validation import service as validation
from tests.migration import helpers
from tests.support import reset

POLICIES = [
    '{ on_conflict = "archive" }',
    '{ on_conflict = "read_only" }',
    '{ on_conflict = "grace", grace_days = 5 }',
]
COUNTERS = ['"carry"', '"reset"', '{ action = "convert", factor = 0.5 }', '{ action = "prorate" }']
SEATS = ['"trim_to_cap"', '"keep_all"']
#: (source, target): node-locked or floating on either side.
PLAN_PAIRS = [
    (helpers.OLD, helpers.NEW),
    (helpers.OLD_FLOAT, helpers.NEW),
    (helpers.OLD, helpers.NEW_FLOAT),
    (helpers.OLD_FLOAT, helpers.NEW_FLOAT),
]


def _rules(policy: int, counter: int, seats: int, version: int, pair: int = 0) -> str:
    source, target = PLAN_PAIRS[pair]
    return (
        helpers.RULES.replace('version = "1"', f'version = "p{version}"', 1)
        .replace(f'from = ["{helpers.OLD}"]', f'from = ["{source}"]')
        .replace(f'to = "{helpers.NEW}"', f'to = "{target}"')
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
    pair=st.integers(min_value=0, max_value=len(PLAN_PAIRS) - 1),
)
async def test_apply_reaches_the_plan_and_rollback_restores_the_snapshot(
    db: Database,
    secrets: Secrets,
    objects: int,
    exports: int,
    policy: int,
    counter: int,
    seats: int,
    pair: int,
) -> None:
    await reset(db)
    await helpers.publish(db)
    source, target = PLAN_PAIRS[pair]
    account_id, keys = await helpers.rich_account(
        db, secrets, plan=source, objects=objects, exports=exports
    )
    state_before = await helpers.state_of(db, account_id)
    before = state_hash(state_before)
    executor = Executor(db, secrets.signing)
    rules = helpers.rules(_rules(policy, counter, seats, objects, pair))

    row = await executor.apply(SYSTEM, rules, account_id)

    assert row.state == "completed", row.error
    assert row.snapshot_hash == before
    after = await helpers.state_of(db, account_id)
    assert differences(row.plan["expected"], after) == []
    # Every machine (all hold a seat here) is in the target plan's activation mode.
    mode = "floating" if target == helpers.NEW_FLOAT else "node"
    assert {(a["mode"], a["lease_expires_at"] is not None) for a in after["activations"]} == {
        (mode, mode == "floating")
    }
    # The application's license check passes right after the migration, on every machine.
    for license_id, key in keys:
        machines = [a["fingerprint"] for a in after["activations"] if a["license_id"] == license_id]
        for fingerprint in [None, *machines]:
            checked = await validation.validate(
                db.transaction, secrets.keyring, secrets.signing, key=key, fingerprint=fingerprint
            )
            assert checked.payload["code"] == "VALID", (fingerprint, checked.payload["code"])
    rolled = await rollback(executor, SYSTEM, row.id)
    assert rolled.state == "rolled_back"
    restored = await helpers.state_of(db, account_id)
    assert state_hash(restored) == before
    assert restored["activations"] == state_before["activations"]
