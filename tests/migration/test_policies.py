"""What the rules' policies do to a real account, seen through validation — on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.errors import MigrationInProgress
from keyshift.licensing import service as licensing
from keyshift.migration import repository
from keyshift.migration.errors import MigrationBlocked
from keyshift.migration.executor import Executor
from keyshift.migration.state import state_hash
from keyshift.security.secrets_store import Secrets
from keyshift.validation import service as validation
from tests.migration import helpers


@pytest.fixture
def executor(db: Database, secrets: Secrets) -> Executor:
    return Executor(db, secrets.signing)


async def _validate(db: Database, secrets: Secrets, key: str, **kw: object) -> dict:
    result = await validation.validate(
        db.transaction, secrets.keyring, secrets.signing, key=key, **kw
    )
    return result.payload


SEAT_TO_USAGE = helpers.RULES.replace('to = "new-seat@1"', 'to = "new-usage@1"').replace(
    '[seats]\nactivations = "trim_to_cap"',
    '[seats]\nconvert_to_meter = "units"\nunits_per_seat = 1000',
)


async def test_seat_to_usage_converts_seats_into_included_units(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)

    row = await executor.apply(SYSTEM, helpers.rules(SEAT_TO_USAGE), account_id)

    assert row.state == "completed", row.error
    body = await _validate(db, secrets, keys[0][1], meter="units")
    # Seats = the licenses' caps: 3 (the plan's) + 5 (a hand-set override) = 8, times 1000.
    assert body["code"] == "VALID"
    assert body["entitlements"]["model"] == "usage"
    assert body["meters"]["units"]["included"] == 8000
    # keep_all: no machine was deactivated.
    state = await helpers.state_of(db, account_id)
    assert len(state["activations"]) == 3


async def test_grace_keeps_the_old_features_until_grace_until(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    rules = helpers.rules(
        **{
            'projects = { on_conflict = "archive" }': 'projects = { on_conflict = "grace", grace_days = 30 }'
        }
    )

    row = await executor.apply(SYSTEM, rules, account_id)

    assert row.state == "completed", row.error
    during = await _validate(db, secrets, keys[0][1], feature="b")
    assert during["code"] == "VALID"  # b is disabled in the new edition, kept by the grace
    assert during["entitlements"]["quotas"]["projects"] == 10
    grace_until = during["entitlements"]["grace_until"]
    assert timedelta(days=29) < grace_until - datetime.now(UTC) <= timedelta(days=30)
    after = await _validate(
        db, secrets, keys[0][1], feature="b", now=grace_until + timedelta(seconds=1)
    )
    assert after["code"] == "FEATURE_NOT_ENTITLED"
    assert after["entitlements"]["quotas"]["projects"] == 3
    assert "grace_until" not in after["entitlements"]
    # Nothing was archived under grace.
    state = await helpers.state_of(db, account_id)
    assert all(o["tier"] == "standard" for o in state["objects"])


async def test_read_only_marks_the_quota_and_keeps_the_data(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    rules = helpers.rules(
        **{'projects = { on_conflict = "archive" }': 'projects = { on_conflict = "read_only" }'}
    )

    await executor.apply(SYSTEM, rules, account_id)

    body = await _validate(db, secrets, keys[0][1])
    assert body["entitlements"]["read_only"] == ["projects"]
    state = await helpers.state_of(db, account_id)
    assert sum(1 for o in state["objects"] if o["state"] == "active") == 5


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ('exports = "carry"', 7),
        ('exports = "reset"', 0),
        ('exports = { action = "convert", factor = 2.5 }', 18),
    ],
)
async def test_counters_move_as_the_rules_say(
    db: Database, secrets: Secrets, executor: Executor, rule: str, expected: int
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets, exports=7)

    row = await executor.apply(SYSTEM, helpers.rules(**{'exports = "carry"': rule}), account_id)

    assert row.state == "completed", row.error
    body = await _validate(db, secrets, keys[0][1], meter="exports")
    assert body["meters"]["exports"]["used"] == expected
    # And rollback puts the count back exactly.
    from keyshift.migration.rollback import rollback

    await rollback(executor, SYSTEM, row.id)
    body = await _validate(db, secrets, keys[0][1], meter="exports")
    assert body["meters"]["exports"]["used"] == 7


async def test_license_overrides_reset_and_dropped_as_the_rules_say(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    rules = helpers.rules(
        helpers.RULES + '\n[overrides]\nmax_activations = "reset"\nfeatures = "drop"\n'
    )

    row = await executor.apply(SYSTEM, rules, account_id)

    state = await helpers.state_of(db, account_id)
    second = next(lic for lic in state["licenses"] if lic["id"] == keys[1][0])
    assert second["max_activations_override"] is None and second["overrides"] == {}
    body = await _validate(db, secrets, keys[1][1], feature="b")
    assert body["code"] == "FEATURE_NOT_ENTITLED"
    # The change is recorded per license in the plan the ledger keeps.
    changed = row.plan["changes"]["licenses"]
    assert [c["license_id"] for c in changed] == [keys[1][0]]


async def test_an_add_on_without_a_rule_blocks_when_the_default_is_refuse(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    before = state_hash(await helpers.state_of(db, account_id))

    with pytest.raises(MigrationBlocked, match="add-on 'extra'"):
        await executor.apply(SYSTEM, helpers.rules(**{'extra = "carry"': ""}), account_id)

    assert state_hash(await helpers.state_of(db, account_id)) == before
    dropped = helpers.rules(**{'extra = "carry"': 'extra = "drop"'})
    row = await executor.apply(SYSTEM, dropped, account_id)
    assert row.state == "completed"
    body = await _validate(db, secrets, keys[0][1])
    assert "addons" not in body["entitlements"]


async def test_admin_changes_are_refused_while_the_account_migrates(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    row = await executor.request(SYSTEM, helpers.rules(), account_id)
    await executor._step(SYSTEM, row.id, "snapshot")

    async with db.transaction() as session:
        with pytest.raises(MigrationInProgress):
            await licensing.suspend_license(session, SYSTEM, keys[0][0])
    with pytest.raises(MigrationInProgress):
        await executor.request(SYSTEM, helpers.rules(), account_id)

    done = await executor.run(SYSTEM, row.id)
    assert done.state == "completed"
    async with db.transaction() as session:
        suspended = await licensing.suspend_license(session, SYSTEM, keys[0][0])
    assert suspended.status == "suspended"


async def test_a_failed_verification_rolls_back_by_itself(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    before = state_hash(await helpers.state_of(db, account_id))
    row = await executor.request(SYSTEM, helpers.rules(), account_id)
    for step in ("snapshot", "prepare", "cutover"):
        await executor._step(SYSTEM, row.id, step)
    # Something outside the migration breaks what it wrote (a bad manual edit, a bug).
    async with db.transaction() as session:
        await session.execute(
            text("UPDATE subscriptions SET overrides = :o WHERE account_id = :a"),
            {"o": "{}", "a": account_id},
        )

    done = await executor.run(SYSTEM, row.id)

    assert done.state == "rolled_back"
    assert "verification failed" in (done.error or "")
    assert state_hash(await helpers.state_of(db, account_id)) == before
    async with db.transaction() as session:
        steps = await repository.steps_done(session, row.id)
    assert steps["verify"].outcome == "failed"
    assert steps["rollback"].details["exact"] is True
