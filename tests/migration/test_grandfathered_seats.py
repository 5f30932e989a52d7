"""``keep_all`` onto a plan with a lower activation cap, on both databases: every machine is
kept and the license's cap is pinned to the seats kept, so the license keeps validating — with
its key and with each kept machine's fingerprint — while a new machine is refused; the ledger
and the audit log say why; rollback restores the cap and the snapshot's hash; and verify rolls
back a migration that leaves a license over its cap. Also over HTTP against a real server."""

from __future__ import annotations

import httpx
import pytest

from keyshift.audit import service as audit
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Activation, License
from keyshift.db.types import utcnow
from keyshift.errors import ActivationLimitReached
from keyshift.licensing import activations
from keyshift.migration import repository
from keyshift.migration.executor import Executor
from keyshift.migration.rollback import rollback
from keyshift.migration.state import state_hash
from keyshift.security.secrets_store import Secrets
from keyshift.validation import service as validation
from tests.migration import helpers
from tests.support import LiveServer, mint_token

#: ``RULES`` (old-seat@1, cap 3 → new-seat@1, cap 2) keeping every machine.
KEEP_ALL = helpers.RULES.replace('activations = "trim_to_cap"', 'activations = "keep_all"').replace(
    'version = "1"', 'version = "keep-all"'
)
#: ``rich_account``'s three machines, all on its first license.
MACHINES = ["machine-0", "machine-1", "machine-2"]


@pytest.fixture
def executor(db: Database, secrets: Secrets) -> Executor:
    return Executor(db, secrets.signing)


async def _code(db: Database, secrets: Secrets, key: str, fingerprint: str | None) -> str:
    result = await validation.validate(
        db.transaction, secrets.keyring, secrets.signing, key=key, fingerprint=fingerprint
    )
    return str(result.payload["code"])


async def _caps(db: Database, account_id: str) -> dict[str, int | None]:
    state = await helpers.state_of(db, account_id)
    return {lic["id"]: lic["max_activations_override"] for lic in state["licenses"]}


async def test_keep_all_to_a_lower_cap_keeps_the_license_and_every_machine_validating(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    (first, key), (second, _) = keys
    before = await helpers.state_of(db, account_id)

    row = await executor.apply(SYSTEM, helpers.rules(KEEP_ALL), account_id)

    assert row.state == "completed", row.error
    # Three machines kept on a plan whose cap is 2: the license's cap is pinned to 3; the
    # second license's own cap of 5 already covers its seats and is left alone.
    assert await _caps(db, account_id) == {first: 3, second: 5}
    assert await _code(db, secrets, key, None) == "VALID"
    for fingerprint in MACHINES:
        assert await _code(db, secrets, key, fingerprint) == "VALID"
    # A new machine is refused: the license is at its pin.
    with pytest.raises(ActivationLimitReached):
        async with db.transaction() as session:
            await activations.activate(session, SYSTEM, secrets.keyring, key, "machine-9")
    # The plan, the cutover's ledger row and its audit event each name the pin and why.
    [pin] = row.plan["changes"]["activations_grandfathered"]
    assert (pin["license_id"], pin["kept"], pin["target_cap"], pin["pinned_cap"]) == (
        first,
        3,
        2,
        3,
    )
    assert "activations_grandfathered:1" in row.plan["risks"]
    async with db.transaction() as session:
        steps = await repository.steps_done(session, row.id)
        events = await audit.list_events(session, account_id=account_id, limit=1000)
    cutover = steps["cutover"].details
    assert cutover["activations_grandfathered"] == [pin] and "keep_all" in pin["reason"]
    assert first in cutover["licenses_changed"]
    [event] = [e for e in events if e.action == "migration.cutover"]
    assert event.details["activations_grandfathered"] == [pin]

    # Rollback: the hand-set cap as it was (none: the old plan's 3), the snapshot's hash.
    rolled = await rollback(executor, SYSTEM, row.id)

    assert rolled.state == "rolled_back"
    restored = await helpers.state_of(db, account_id)
    assert await _caps(db, account_id) == {first: None, second: 5}
    assert restored["licenses"] == before["licenses"]
    assert state_hash(restored) == state_hash(before) == row.snapshot_hash
    async with db.transaction() as session:
        steps = await repository.steps_done(session, row.id)
    assert steps["rollback"].details["exact"] is True
    assert await _code(db, secrets, key, "machine-0") == "VALID"


async def test_keep_all_leaves_a_license_over_its_cap_before_the_migration_as_it_was(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    (first, key), _ = keys
    # An admin lowered the cap by hand under the three machines: the license answers
    # TOO_MANY_ACTIVATIONS, and a migration neither causes that nor cures it.
    async with db.transaction() as session:
        row = await session.get(License, first)
        assert row is not None
        row.max_activations_override = 1
    assert await _code(db, secrets, key, None) == "TOO_MANY_ACTIVATIONS"

    migrated = await executor.apply(SYSTEM, helpers.rules(KEEP_ALL), account_id)

    assert migrated.state == "completed", migrated.error
    assert migrated.plan["over_cap_before"] == [first]
    assert migrated.plan["changes"]["activations_grandfathered"] == []
    assert (await _caps(db, account_id))[first] == 1
    assert await _code(db, secrets, key, None) == "TOO_MANY_ACTIVATIONS"


async def test_verify_fails_and_rolls_back_when_a_license_ends_over_its_cap(
    db: Database, secrets: Secrets, executor: Executor
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    (first, key), _ = keys
    before = state_hash(await helpers.state_of(db, account_id))
    row = await executor.request(SYSTEM, helpers.rules(KEEP_ALL), account_id)
    for step in ("snapshot", "prepare", "cutover"):
        await executor._step(SYSTEM, row.id, step)
    # After the cutover a fourth machine lands on the license past its pinned cap of 3 (a
    # bug, a bad manual edit): the license answers TOO_MANY_ACTIVATIONS, with the key and
    # with every machine. A machine added after the snapshot is otherwise allowed by verify.
    async with db.transaction() as session:
        session.add(
            Activation(
                id="extra-machine",
                account_id=account_id,
                license_id=first,
                fingerprint="machine-extra",
                mode="node",
                lease_expires_at=None,
                last_seen_at=utcnow(),
                created_at=utcnow(),
            )
        )
    assert await _code(db, secrets, key, "machine-1") == "TOO_MANY_ACTIVATIONS"

    done = await executor.run(SYSTEM, row.id)

    assert done.state == "rolled_back"
    assert "verification failed" in (done.error or "")
    async with db.transaction() as session:
        steps = await repository.steps_done(session, row.id)
    problems = steps["verify"].details["problems"]
    assert f"license {first}: its key validates as TOO_MANY_ACTIVATIONS" in problems, problems
    assert steps["rollback"].details["activations_kept"]
    async with db.transaction() as session:
        extra = await session.get(Activation, "extra-machine")
        assert extra is not None
        await session.delete(extra)
    assert state_hash(await helpers.state_of(db, account_id)) == before


# -- a real server ------------------------------------------------------------------------------


@pytest.mark.server
async def test_a_keep_all_downgrade_over_http_keeps_the_machines_validating(
    db: Database, secrets: Secrets, live_server: LiveServer
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    (first, key), _ = keys
    headers = {"Authorization": f"Bearer {await mint_token(db, 'migrations:run')}"}

    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=30) as http:
        body = {"rules": KEEP_ALL, "account_id": account_id}
        applied = await http.post("/v1/migrations", json=body, headers=headers)
        assert applied.status_code == 201, applied.text
        migration = applied.json()
        assert migration["state"] == "completed", migration["error"]
        [pin] = migration["plan"]["changes"]["activations_grandfathered"]
        assert (pin["license_id"], pin["pinned_cap"]) == (first, 3)
        [cutover] = [s for s in migration["ledger"] if s["step"] == "cutover"]
        assert cutover["details"]["activations_grandfathered"] == [pin]
        for fingerprint in [None, *MACHINES]:
            machine = (
                {"key": key} if fingerprint is None else {"key": key, "fingerprint": fingerprint}
            )
            checked = await http.post("/v1/licenses/validate", json=machine)
            assert checked.status_code == 200, checked.text
            assert checked.json()["code"] == "VALID", checked.json()
        assert checked.json()["activation"]["max_activations"] == 3
        refused = await http.post(
            "/v1/licenses/activate", json={"key": key, "fingerprint": "machine-9"}
        )
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "activation_limit_reached"
        # Under the pin again (a machine let go), a new machine takes the free seat.
        gone = await http.post(
            "/v1/licenses/deactivate", json={"key": key, "fingerprint": "machine-0"}
        )
        assert gone.status_code == 200, gone.text
        taken = await http.post(
            "/v1/licenses/activate", json={"key": key, "fingerprint": "machine-9"}
        )
        assert taken.status_code == 201, taken.text
        checked = await http.post(
            "/v1/licenses/validate", json={"key": key, "fingerprint": "machine-9"}
        )
        assert checked.json()["code"] == "VALID", checked.json()
