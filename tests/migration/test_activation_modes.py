"""Migrations between node-locked and floating plans, on both databases: each machine kept
takes the target plan's activation mode (a lease from the cutover for a floating target) and
keeps validating after its old lease would have lapsed; heartbeats extend the new lease;
rollback gives back each mode and lease with the snapshot's hash; verify validates every
kept machine's fingerprint, and a machine that does not validate rolls the migration back.
Also over HTTP against a real server."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Activation, AuditEvent
from keyshift.db.types import utcnow
from keyshift.licensing import activations
from keyshift.migration import repository
from keyshift.migration.executor import Executor
from keyshift.migration.rollback import rollback
from keyshift.migration.state import parse_iso, state_hash
from keyshift.security.secrets_store import Secrets
from keyshift.validation import service as validation
from tests.migration import helpers
from tests.support import LiveServer, mint_token

#: ``rich_account``'s three machines on its first license; the targets' cap is 2 and
#: ``trim_to_cap`` lets the least recently seen one, machine-0, go.
KEPT = ["machine-1", "machine-2"]
TO_NODE = (helpers.OLD_FLOAT, helpers.NEW)
TO_FLOATING = (helpers.OLD, helpers.NEW_FLOAT)


@pytest.fixture
def executor(db: Database, secrets: Secrets) -> Executor:
    return Executor(db, secrets.signing)


async def _code(
    db: Database, secrets: Secrets, key: str, fingerprint: str, *, at: datetime | None = None
) -> str:
    result = await validation.validate(
        db.transaction, secrets.keyring, secrets.signing, key=key, fingerprint=fingerprint, now=at
    )
    return str(result.payload["code"])


async def _heartbeat(db: Database, secrets: Secrets, key: str, fingerprint: str) -> Activation:
    async with db.transaction() as session:
        return await activations.heartbeat(session, SYSTEM, secrets.keyring, key, fingerprint)


def _machines(state: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    return {a["fingerprint"]: (a["mode"], a["lease_expires_at"]) for a in state["activations"]}


async def _account(db: Database, secrets: Secrets, plan: str) -> tuple[str, str]:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets, plan=plan)
    return account_id, keys[0][1]


async def test_floating_to_node_locked_kept_machines_validate_after_their_old_lease(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    account_id, key = await _account(db, secrets, helpers.OLD_FLOAT)
    before = await helpers.state_of(db, account_id)
    assert {mode for mode, _ in _machines(before).values()} == {"floating"}
    old_leases_end = max(parse_iso(a["lease_expires_at"]) for a in before["activations"])
    assert old_leases_end is not None

    row = await executor.apply(SYSTEM, helpers.rules(helpers.mode_rules_text(*TO_NODE)), account_id)

    assert row.state == "completed", row.error
    # An hour after the old leases would have lapsed, with no heartbeat, the machines validate.
    later = old_leases_end + timedelta(hours=1)
    for fingerprint in KEPT:
        assert await _code(db, secrets, key, fingerprint, at=later) == "VALID"
    # They are node-locked now; the plan said so for each, and the cutover did it.
    assert _machines(await helpers.state_of(db, account_id)) == {
        fingerprint: ("node", None) for fingerprint in KEPT
    }
    converted = row.plan["changes"]["activations_converted"]
    assert sorted(c["fingerprint"] for c in converted) == KEPT
    for change in converted:
        assert change["from"]["mode"] == "floating" and change["from"]["lease_expires_at"]
        assert change["to"] == {"mode": "node", "lease_seconds": None}
    # A heartbeat keeps a node-locked seat node-locked.
    beat = await _heartbeat(db, secrets, key, "machine-1")
    assert (beat.mode, beat.lease_expires_at) == ("node", None)
    assert await _code(db, secrets, key, "machine-1", at=later) == "VALID"


async def test_node_locked_to_floating_kept_machines_lease_from_the_cutover_and_heartbeat(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    account_id, key = await _account(db, secrets, helpers.OLD)

    row = await executor.apply(
        SYSTEM, helpers.rules(helpers.mode_rules_text(*TO_FLOATING)), account_id
    )

    assert row.state == "completed", row.error
    assert row.cutover_at is not None
    machines = _machines(await helpers.state_of(db, account_id))
    assert sorted(machines) == KEPT
    for mode, lease in machines.values():
        assert mode == "floating" and parse_iso(lease) == row.cutover_at + helpers.LEASE
    converted = row.plan["changes"]["activations_converted"]
    assert sorted(c["fingerprint"] for c in converted) == KEPT
    assert all(c["to"] == {"mode": "floating", "lease_seconds": 3600} for c in converted)
    # 50 minutes later machine-1 sends a heartbeat: its lease is extended by the new plan's
    # TTL; machine-2 sends none, so its seat lapses when the lease from the cutover ends.
    await helpers.leases_age(db, account_id, timedelta(minutes=50))
    beat = await _heartbeat(db, secrets, key, "machine-1")
    assert beat.mode == "floating" and beat.lease_expires_at is not None
    assert beat.lease_expires_at > row.cutover_at + helpers.LEASE
    soon = utcnow() + timedelta(minutes=15)
    assert await _code(db, secrets, key, "machine-1", at=soon) == "VALID"
    assert await _code(db, secrets, key, "machine-2", at=soon) == "FINGERPRINT_MISMATCH"
    # Once machine-2's lease has lapsed, its seat is reclaimed by a new machine.
    await helpers.leases_age(db, account_id, timedelta(minutes=15))
    async with db.transaction() as session:
        new = await activations.activate(session, SYSTEM, secrets.keyring, key, "machine-9")
    assert new.created and new.activation.mode == "floating"
    assert sorted(_machines(await helpers.state_of(db, account_id))) == ["machine-1", "machine-9"]


@pytest.mark.parametrize("pair", [TO_NODE, TO_FLOATING], ids=["to_node", "to_floating"])
async def test_rollback_gives_back_each_machines_mode_and_lease_and_the_snapshot_hash(
    db: Database, secrets: Secrets, executor: Executor, pair: tuple[str, str]
) -> None:
    account_id, _ = await _account(db, secrets, pair[0])
    before = await helpers.state_of(db, account_id)
    row = await executor.apply(SYSTEM, helpers.rules(helpers.mode_rules_text(*pair)), account_id)
    assert row.state == "completed", row.error
    target_mode = "node" if pair == TO_NODE else "floating"
    after = _machines(await helpers.state_of(db, account_id))
    assert {mode for mode, _ in after.values()} == {target_mode}

    rolled = await rollback(executor, SYSTEM, row.id)

    assert rolled.state == "rolled_back"
    restored = await helpers.state_of(db, account_id)
    # Every machine as it was, its lease (which the hash leaves out) included.
    assert restored["activations"] == before["activations"]
    assert state_hash(restored) == state_hash(before) == row.snapshot_hash
    async with db.transaction() as session:
        steps = await repository.steps_done(session, row.id)
    assert steps["rollback"].details["exact"] is True
    kept_ids = sorted(a["id"] for a in before["activations"] if a["fingerprint"] in KEPT)
    assert sorted(steps["rollback"].details["activations_reverted"]) == kept_ids


async def _cut_over(executor: Executor, rules_text: str, account_id: str) -> str:
    """Run a migration up to and including its cutover; its id."""
    row = await executor.request(SYSTEM, helpers.rules(rules_text), account_id)
    for step in ("snapshot", "prepare", "cutover"):
        await executor._step(SYSTEM, row.id, step)
    return row.id


@pytest.mark.parametrize("breakage", ["lapsed_floating_lease", "fingerprint_changed"])
async def test_verify_fails_and_rolls_back_when_a_kept_machine_does_not_validate(
    db: Database, secrets: Secrets, executor: Executor, breakage: str
) -> None:
    account_id, _ = await _account(db, secrets, helpers.OLD_FLOAT)
    before = state_hash(await helpers.state_of(db, account_id))
    migration_id = await _cut_over(executor, helpers.mode_rules_text(*TO_NODE), account_id)
    # After the cutover machine-2 is left unable to validate: as a floating lease that has run
    # out on a node-locked plan (what a cutover that kept the old mode left behind), or under
    # another fingerprint (a bad manual edit, a bug).
    if breakage == "lapsed_floating_lease":
        change: dict[str, Any] = {
            "mode": "floating",
            "lease_expires_at": utcnow() - timedelta(minutes=1),
        }
    else:
        change = {"fingerprint": "machine-2-elsewhere"}
    async with db.transaction() as session:
        await session.execute(
            update(Activation)
            .where(Activation.account_id == account_id, Activation.fingerprint == "machine-2")
            .values(**change)
        )

    done = await executor.run(SYSTEM, migration_id)

    assert done.state == "rolled_back"
    assert "verification failed" in (done.error or "")
    async with db.transaction() as session:
        steps = await repository.steps_done(session, migration_id)
    assert steps["verify"].outcome == "failed"
    problems = steps["verify"].details["problems"]
    assert any("machine 'machine-2' validates as" in p for p in problems), problems
    if breakage == "lapsed_floating_lease":
        # Rollback gave machine-2 its floating lease from before the cutover back.
        assert steps["rollback"].details["exact"] is True
        assert state_hash(await helpers.state_of(db, account_id)) == before


async def test_a_lease_lapsed_before_the_migration_stays_a_free_seat_and_verify_passes(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    account_id, key = await _account(db, secrets, helpers.OLD_FLOAT)
    async with db.transaction() as session:
        await session.execute(
            update(Activation)
            .where(Activation.account_id == account_id, Activation.fingerprint == "machine-0")
            .values(lease_expires_at=utcnow() - timedelta(minutes=1))
        )
    rules_text = helpers.mode_rules_text(*TO_NODE, activations="keep_all")

    row = await executor.apply(SYSTEM, helpers.rules(rules_text), account_id)

    assert row.state == "completed", row.error
    machines = _machines(await helpers.state_of(db, account_id))
    # machine-0's lapsed lease was not turned into a node-locked seat that never lapses.
    assert machines["machine-0"][0] == "floating"
    assert {machines[f] for f in KEPT} == {("node", None)}
    assert sorted(c["fingerprint"] for c in row.plan["changes"]["activations_converted"]) == KEPT
    assert await _code(db, secrets, key, "machine-1") == "VALID"
    assert await _code(db, secrets, key, "machine-0") == "FINGERPRINT_MISMATCH"


async def test_a_machine_activated_between_snapshot_and_cutover_takes_the_new_mode(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets, plan=helpers.OLD_FLOAT)
    other_key = keys[1][1]  # the second license: its hand-set cap of 5 keeps every machine
    row = await executor.request(
        SYSTEM, helpers.rules(helpers.mode_rules_text(*TO_NODE)), account_id
    )
    await executor._step(SYSTEM, row.id, "snapshot")
    async with db.transaction() as session:
        late = await activations.activate(session, SYSTEM, secrets.keyring, other_key, "laptop")
    assert late.activation.mode == "floating"

    done = await executor.run(SYSTEM, row.id)

    assert done.state == "completed", done.error
    machines = _machines(await helpers.state_of(db, account_id))
    assert machines["laptop"] == ("node", None)
    later = utcnow() + timedelta(hours=3)
    assert await _code(db, secrets, other_key, "laptop", at=later) == "VALID"


async def _second_license(db: Database, secrets: Secrets, plan: str) -> tuple[str, str]:
    """An account on ``plan`` and the key of its second license, whose hand-set cap of 5 has
    room for machines activated after the cutover."""
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets, plan=plan)
    return account_id, keys[1][1]


async def _rollback_event(db: Database, migration_id: str) -> dict[str, Any]:
    async with db.transaction() as session:
        event = (
            await session.execute(
                select(AuditEvent).where(
                    AuditEvent.action == "migration.rollback", AuditEvent.target_id == migration_id
                )
            )
        ).scalar_one()
    return event.details


async def test_rollback_converts_a_machine_activated_after_the_cutover_to_node_locked(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    """node → floating, a machine activated under the floating plan, rollback: the machine is
    node-locked again (no lease) and validates long after its floating lease would have
    lapsed, with no heartbeat."""
    account_id, key = await _second_license(db, secrets, helpers.OLD)
    row = await executor.apply(
        SYSTEM, helpers.rules(helpers.mode_rules_text(*TO_FLOATING)), account_id
    )
    assert row.state == "completed", row.error
    async with db.transaction() as session:
        late = await activations.activate(session, SYSTEM, secrets.keyring, key, "machine-d")
    assert late.activation.mode == "floating" and late.activation.lease_expires_at is not None

    rolled = await rollback(executor, SYSTEM, row.id)

    assert rolled.state == "rolled_back"
    machines = _machines(await helpers.state_of(db, account_id))
    assert machines["machine-d"] == ("node", None)
    later = utcnow() + helpers.LEASE * 3
    assert await _code(db, secrets, key, "machine-d", at=later) == "VALID"
    async with db.transaction() as session:
        steps = await repository.steps_done(session, row.id)
    details = steps["rollback"].details
    assert details["exact"] is True
    assert late.activation.id in details["activations_kept"]
    [back] = details["activations_converted_back"]
    assert back["id"] == late.activation.id and back["fingerprint"] == "machine-d"
    assert back["from"]["mode"] == "floating" and back["from"]["lease_expires_at"]
    assert back["to"] == {"mode": "node", "lease_expires_at": None}
    assert (await _rollback_event(db, row.id))["activations_converted_back"] == [back]


async def test_rollback_gives_a_machine_activated_after_the_cutover_a_floating_lease(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    """floating → node, a machine activated under the node-locked plan, rollback: the machine
    is floating again with a lease from the rollback, which a heartbeat extends and which
    lapses without one (never a node-locked seat that never lapses on a floating plan)."""
    account_id, key = await _second_license(db, secrets, helpers.OLD_FLOAT)
    row = await executor.apply(SYSTEM, helpers.rules(helpers.mode_rules_text(*TO_NODE)), account_id)
    assert row.state == "completed", row.error
    async with db.transaction() as session:
        late = await activations.activate(session, SYSTEM, secrets.keyring, key, "machine-d")
    assert (late.activation.mode, late.activation.lease_expires_at) == ("node", None)

    rolled = await rollback(executor, SYSTEM, row.id)

    assert rolled.state == "rolled_back" and rolled.finished_at is not None
    mode, lease = _machines(await helpers.state_of(db, account_id))["machine-d"]
    assert mode == "floating" and parse_iso(lease) == rolled.finished_at + helpers.LEASE
    async with db.transaction() as session:
        steps = await repository.steps_done(session, row.id)
    details = steps["rollback"].details
    assert details["exact"] is True
    [back] = details["activations_converted_back"]
    assert back["from"] == {"mode": "node", "lease_expires_at": None}
    assert back["to"] == {"mode": "floating", "lease_expires_at": lease}
    # 50 minutes on, a heartbeat extends the lease past the one from the rollback.
    await helpers.leases_age(db, account_id, timedelta(minutes=50))
    beat = await _heartbeat(db, secrets, key, "machine-d")
    assert beat.mode == "floating" and beat.lease_expires_at is not None
    assert beat.lease_expires_at > rolled.finished_at + helpers.LEASE
    assert await _code(db, secrets, key, "machine-d", at=utcnow() + timedelta(minutes=15)) == (
        "VALID"
    )
    # With no more heartbeats, the seat lapses when the lease ends (the license's only one).
    lapsed = await _code(db, secrets, key, "machine-d", at=beat.lease_expires_at)
    assert lapsed == "NO_ACTIVATION"


# -- a real server ------------------------------------------------------------------------------


@pytest.mark.server
async def test_mode_changing_migrations_over_http_keep_machines_validating(
    db: Database, secrets: Secrets, live_server: LiveServer
) -> None:
    await helpers.publish(db)
    floating_account, floating_keys = await helpers.rich_account(
        db, secrets, plan=helpers.OLD_FLOAT
    )
    node_account, node_keys = await helpers.rich_account(db, secrets, plan=helpers.OLD)
    headers = {"Authorization": f"Bearer {await mint_token(db, 'migrations:run')}"}

    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=30) as http:
        for account_id, pair in ((floating_account, TO_NODE), (node_account, TO_FLOATING)):
            body = {"rules": helpers.mode_rules_text(*pair), "account_id": account_id}
            applied = await http.post("/v1/migrations", json=body, headers=headers)
            assert applied.status_code == 201, applied.text
            assert applied.json()["state"] == "completed"
        # Two hours pass with no heartbeat: the floating leases the machines had are over.
        await helpers.leases_age(db, floating_account, timedelta(hours=2))
        for fingerprint in KEPT:
            machine = {"key": floating_keys[0][1], "fingerprint": fingerprint}
            checked = await http.post("/v1/licenses/validate", json=machine)
            assert checked.status_code == 200, checked.text
            assert checked.json()["code"] == "VALID", checked.json()
            assert checked.json()["activation"]["mode"] == "node"
            beat = await http.post("/v1/licenses/heartbeat", json=machine)
            assert beat.status_code == 200, beat.text
            assert (beat.json()["mode"], beat.json()["lease_expires_at"]) == ("node", None)
        # The node-locked machines now hold floating leases that a heartbeat extends.
        for fingerprint in KEPT:
            machine = {"key": node_keys[0][1], "fingerprint": fingerprint}
            beat = await http.post("/v1/licenses/heartbeat", json=machine)
            assert beat.status_code == 200, beat.text
            assert beat.json()["mode"] == "floating" and beat.json()["lease_expires_at"]
            checked = await http.post("/v1/licenses/validate", json=machine)
            assert checked.json()["code"] == "VALID", checked.json()
