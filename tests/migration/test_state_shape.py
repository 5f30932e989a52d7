"""The TypedDicts of ``keyshift.migration.state`` describe what the code really builds: a
snapshot read from the database, the state a plan expects, and both as stored with the
migration, each validated strictly (no coercion, no key the types do not name) — so the types
cannot drift from the data unnoticed. On both databases."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.migration.executor import Executor
from keyshift.migration.state import ExpectedState, Snapshot, state_hash
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers

SNAPSHOT = TypeAdapter(Snapshot)
EXPECTED = TypeAdapter(ExpectedState)

GRACE = helpers.RULES.replace(
    'projects = { on_conflict = "archive" }',
    'projects = { on_conflict = "grace", grace_days = 30 }',
)
READ_ONLY = helpers.RULES.replace(
    'projects = { on_conflict = "archive" }', 'projects = { on_conflict = "read_only" }'
)
SEAT_TO_USAGE = helpers.RULES.replace('to = "new-seat@1"', 'to = "new-usage@1"').replace(
    '[seats]\nactivations = "trim_to_cap"',
    '[seats]\nconvert_to_meter = "units"\nunits_per_seat = 1000',
)
KEEP_ALL = helpers.RULES.replace('activations = "trim_to_cap"', 'activations = "keep_all"')

#: (source plan, rules): together they put every optional part of a state into one of them —
#: archived objects, trimmed and grandfathered seats, floating leases, a grace with the
#: previous grant, read-only quotas, included units from converted seats.
CASES = {
    "archive-and-trim": (helpers.OLD, helpers.RULES),
    "grace": (helpers.OLD, GRACE),
    "read-only": (helpers.OLD, READ_ONLY),
    "seat-to-usage": (helpers.OLD, SEAT_TO_USAGE),
    "keep-all": (helpers.OLD, KEEP_ALL),
    "floating-to-node": (
        helpers.OLD_FLOAT,
        helpers.mode_rules_text(helpers.OLD_FLOAT, helpers.NEW),
    ),
    "node-to-floating": (helpers.OLD, helpers.mode_rules_text(helpers.OLD, helpers.NEW_FLOAT)),
}


def assert_shape(adapter: TypeAdapter[Any], value: Any) -> None:
    """``value`` validates strictly, and nothing in it is dropped or changed on the way."""
    assert adapter.validate_python(value, strict=True) == value


@pytest.mark.parametrize("case", sorted(CASES))
async def test_snapshots_and_expected_states_have_their_declared_shape(
    db: Database, secrets: Secrets, case: str
) -> None:
    source, rules_text = CASES[case]
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets, plan=source)
    before = await helpers.state_of(db, account_id)
    assert_shape(SNAPSHOT, before)

    row = await Executor(db, secrets.signing).apply(SYSTEM, helpers.rules(rules_text), account_id)

    assert row.state == "completed", row.error
    assert row.snapshot is not None and row.plan is not None
    assert_shape(SNAPSHOT, row.snapshot)
    assert state_hash(row.snapshot) == row.snapshot_hash
    assert_shape(EXPECTED, row.plan["expected"])
    after = await helpers.state_of(db, account_id)
    assert_shape(SNAPSHOT, after)


def test_a_key_the_types_do_not_name_fails_the_shape() -> None:
    state = {
        "account": {
            "id": "a",
            "name": "A",
            "status": "active",
            "external_ref": None,
            "attributes": {},
            "preferences": {},
        },
        "subscription": None,
        "licenses": [],
        "activations": [],
        "counters": [],
        "objects": [],
    }
    assert_shape(EXPECTED, state)
    with pytest.raises(ValueError, match="extra"):
        EXPECTED.validate_python({**state, "notes": []}, strict=True)
    with pytest.raises(ValueError, match="int"):
        EXPECTED.validate_python(
            {
                **state,
                "counters": [{"meter": "m", "period_start": "", "period_end": "", "used": "1"}],
            },
            strict=True,
        )
