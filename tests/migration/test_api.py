"""The migration engine over HTTP, on both databases: plan (writes nothing) → apply → show →
roll back to the snapshot's hash; every class of bad input refused with nothing changed;
pending changes visible on the account; the endpoints that set what a migration carries
(license overrides, add-ons, preferences, data objects); and one run against a real server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from keyshift.api.app import create_app
from keyshift.api.state import AppState
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Base
from keyshift.db.types import utcnow
from keyshift.migration import repository
from keyshift.migration.executor import Executor
from keyshift.migration.state import Snapshot, state_hash
from keyshift.security import tokens
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers
from tests.support import LiveServer, mint_token

Headers = dict[str, str]

# Line numbers in ``helpers.RULES`` (its text starts with a newline: ``[rules]`` is line 2).
TO_LINE = 7
FEATURE_B_LINE = 11


# -- helpers ------------------------------------------------------------------------------------


async def all_rows(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in a stable order: two equal dumps = nothing was written."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with db.transaction() as session:
        for table in Base.metadata.sorted_tables:
            rows = (await session.execute(select(table))).all()
            out[table.name] = sorted((tuple(row) for row in rows), key=repr)
    return out


async def state_of(db: Database, account_id: str) -> Snapshot:
    async with db.transaction() as session:
        state = await repository.read_state(session, account_id, utcnow())
    assert state is not None
    return state


async def actor_id(db: Database, token: str) -> str:
    async with db.transaction() as session:
        return (await tokens.authenticate(session, token)).id


def bearer(token: str) -> Headers:
    return {"Authorization": f"Bearer {token}"}


def error_of(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    if code is not None:
        assert error["code"] == code, error
    assert error["message"]
    return error


def rules_text(**replace_: str) -> str:
    text = helpers.RULES
    for old, new in replace_.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def scheduled_rules(at: datetime, version: str = "later-1") -> str:
    stamp = at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return rules_text(**{'version = "1"': f'version = "{version}"'}) + (
        f'\n[schedule]\neffective = "at"\nat = {stamp}\n'
    )


@pytest.fixture
async def account(db: Database, secrets: Secrets) -> tuple[str, list[tuple[str, str]]]:
    await helpers.publish(db)
    return await helpers.rich_account(db, secrets)


async def apply(client: httpx.AsyncClient, headers: Headers, account_id: str, **extra: Any) -> Any:
    body = {"rules": extra.pop("rules", helpers.RULES), "account_id": account_id, **extra}
    return await client.post("/v1/migrations", json=body, headers=headers)


# -- the happy path -------------------------------------------------------------------------------


async def test_plan_apply_show_and_rollback_restore_the_snapshot_hash(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    before = await state_of(db, account_id)

    planned = await client.post(
        "/v1/migrations/plan",
        json={"rules": helpers.RULES, "account_id": account_id},
        headers=admin_headers,
    )
    assert planned.status_code == 200, planned.text
    plan = planned.json()
    assert (plan["from"], plan["to"], plan["can_apply"]) == (helpers.OLD, helpers.NEW, True)
    assert len(plan["archive"]) == 2 and len(plan["deactivate"]) == 1

    applied = await apply(client, admin_headers, account_id)
    assert applied.status_code == 201, applied.text
    migration = applied.json()
    assert migration["state"] == "completed", migration["error"]
    assert migration["snapshot_hash"] == state_hash(before)
    assert migration["plan"]["expected"]["subscription"]["plan"] == helpers.NEW
    assert [s["step"] for s in migration["ledger"]] == [
        "lock",
        "snapshot",
        "prepare",
        "cutover",
        "verify",
        "receipt",
    ]
    assert [s["seq"] for s in migration["ledger"]] == [1, 2, 3, 4, 5, 6]
    assert (await state_of(db, account_id))["subscription"]["plan"] == helpers.NEW

    shown = await client.get(f"/v1/migrations/{migration['id']}", headers=admin_headers)
    assert shown.status_code == 200
    assert shown.json()["ledger"] == migration["ledger"]
    assert shown.json()["receipt"]["body"]["snapshot_hash"] == migration["snapshot_hash"]
    listed = await client.get(f"/v1/accounts/{account_id}/migrations", headers=admin_headers)
    assert [m["id"] for m in listed.json()["items"]] == [migration["id"]]

    rolled = await client.post(
        f"/v1/migrations/{migration['id']}/rollback",
        json={"reason": "customer asked"},
        headers=admin_headers,
    )
    assert rolled.status_code == 200, rolled.text
    body = rolled.json()
    assert body["state"] == "rolled_back"
    assert body["rollback"]["exact"] is True
    assert body["rollback"]["restored_hash"] == migration["snapshot_hash"]
    assert body["ledger"][-1]["step"] == "rollback"
    assert state_hash(await state_of(db, account_id)) == migration["snapshot_hash"]

    # Idempotent: again is 200 and changes nothing.
    rows = await all_rows(db)
    again = await client.post(f"/v1/migrations/{migration['id']}/rollback", headers=admin_headers)
    assert again.status_code == 200 and again.json()["state"] == "rolled_back"
    assert await all_rows(db) == rows


async def test_plan_and_validate_write_nothing(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    before = await all_rows(db)

    planned = await client.post(
        "/v1/migrations/plan",
        json={"rules": helpers.RULES, "account_id": account_id},
        headers=admin_headers,
    )
    checked = await client.post(
        "/v1/rules/validate", json={"rules": helpers.RULES}, headers=admin_headers
    )

    assert planned.status_code == 200, planned.text
    assert checked.status_code == 200, checked.text
    assert checked.json() == {
        "valid": True,
        "rules": "old-to-new@1",
        "hash": helpers.rules().content_hash(),
        "from": [helpers.OLD],
        "to": helpers.NEW,
    }
    assert await all_rows(db) == before
    # The plan did not even register the rules: that happens on apply.
    assert before["migration_rules"] == []


async def test_audit_names_the_token_for_apply_and_rollback(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    token = await mint_token(db, "migrations:run", name="migrator")
    actor = await actor_id(db, token)

    applied = await apply(client, bearer(token), account_id)
    assert applied.status_code == 201, applied.text
    migration_id = applied.json()["id"]
    rolled = await client.post(f"/v1/migrations/{migration_id}/rollback", headers=bearer(token))
    assert rolled.status_code == 200, rolled.text

    events = await client.get(
        "/v1/audit/events", params={"account_id": account_id, "limit": 1000}, headers=admin_headers
    )
    mine = {e["action"]: e for e in events.json() if e["target_id"] == migration_id}
    for action in ("migration.start", "migration.cutover", "migration.complete"):
        assert mine[action]["actor"] == actor
        assert mine[action]["request_id"] == applied.headers["x-request-id"]
    assert mine["migration.rollback"]["actor"] == actor
    assert mine["migration.rollback"]["request_id"] == rolled.headers["x-request-id"]
    assert mine["migration.rollback"]["details"]["exact"] is True
    assert applied.json()["created_by"] == actor
    verified = await client.get("/v1/audit/verify", headers=admin_headers)
    assert verified.json()["ok"] is True


async def test_finalize_then_rollback_is_409_and_changes_nothing(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    migration_id = (await apply(client, admin_headers, account_id)).json()["id"]
    finalized = await client.post(f"/v1/migrations/{migration_id}/finalize", headers=admin_headers)
    assert finalized.status_code == 200 and finalized.json()["state"] == "finalized"
    assert finalized.json()["ledger"][-1]["step"] == "finalize"
    rows = await all_rows(db)

    refused = await client.post(f"/v1/migrations/{migration_id}/rollback", headers=admin_headers)
    by_account = await client.post(
        f"/v1/accounts/{account_id}/migrations/rollback", headers=admin_headers
    )

    assert error_of(refused, 409, "migration_finalized")["field"] == "migration_id"
    error_of(by_account, 409, "migration_finalized")
    assert await all_rows(db) == rows


async def test_rollback_of_what_never_ran_is_refused_and_changes_nothing(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    rows = await all_rows(db)

    never = await client.post(
        f"/v1/accounts/{account_id}/migrations/rollback", headers=admin_headers
    )
    missing = await client.post(f"/v1/migrations/{uuid.uuid4()}/rollback", headers=admin_headers)
    no_account = await client.post(
        f"/v1/accounts/{uuid.uuid4()}/migrations/rollback", headers=admin_headers
    )
    resume_missing = await client.post(
        f"/v1/migrations/{uuid.uuid4()}/resume", headers=admin_headers
    )

    assert error_of(never, 409, "nothing_to_roll_back")["field"] == "account_id"
    assert error_of(missing, 404, "migration_not_found")["field"] == "migration_id"
    error_of(no_account, 404, "account_not_found")
    error_of(resume_missing, 404, "migration_not_found")
    assert await all_rows(db) == rows

    # A scheduled change has not run either: cancel it, do not roll it back.
    at = datetime.now(UTC) + timedelta(days=3)
    scheduled = await apply(client, admin_headers, account_id, rules=scheduled_rules(at))
    assert scheduled.status_code == 201, scheduled.text
    rows = await all_rows(db)
    refused = await client.post(
        f"/v1/migrations/{scheduled.json()['id']}/rollback", headers=admin_headers
    )
    assert "cancel" in error_of(refused, 409, "wrong_state")["message"]
    assert await all_rows(db) == rows


# -- bad rules --------------------------------------------------------------------------------


BAD_RULES = [
    pytest.param(
        {'to = "new-seat@1"': 'to = "nowhere@1"'},
        "rules.to",
        TO_LINE,
        "no published plan",
        id="unknown-plan",
    ),
    pytest.param(
        {'from = ["old-seat@1"]': 'from = ["old-seat@1", "gone@2"]'},
        "rules.from.1",
        TO_LINE - 1,
        "no published plan",
        id="unknown-source-plan",
    ),
    pytest.param(
        {'to = "new-seat@1"': 'to = "old-seat@1"'}, "rules.to", TO_LINE, "cycle", id="cycle"
    ),
    pytest.param(
        {'b = "keep"': 'b = { action = "rename", to = "a" }'},
        "features.b",
        FEATURE_B_LINE,
        "contradictory",
        id="contradictory-mapping",
    ),
    pytest.param(
        {'b = "keep"': 'b = "keep"\nb = "drop"'}, "", FEATURE_B_LINE + 1, "TOML", id="toml-syntax"
    ),
    pytest.param(
        # tomllib notices the missing "]" on the next line; the mistake is on this one.
        {'from = ["old-seat@1"]': 'from = ["old-seat@1"'},
        "",
        TO_LINE - 1,
        "Unclosed array",
        id="toml-unclosed-array",
    ),
]


@pytest.mark.parametrize(("change", "field", "line", "reason"), BAD_RULES)
async def test_bad_rules_are_422_naming_field_and_line_and_change_nothing(
    db: Database,
    client: httpx.AsyncClient,
    admin_headers: Headers,
    account: Any,
    change: dict[str, str],
    field: str,
    line: int,
    reason: str,
) -> None:
    account_id, _ = account
    text = rules_text(**change)
    rows = await all_rows(db)

    responses = [
        await client.post("/v1/rules/validate", json={"rules": text}, headers=admin_headers),
        await client.post(
            "/v1/migrations/plan",
            json={"rules": text, "account_id": account_id},
            headers=admin_headers,
        ),
        await apply(client, admin_headers, account_id, rules=text),
    ]

    for response in responses:
        error = error_of(response, 422, "invalid_rules")
        assert error["field"] == "rules"
        hits = [
            p for p in error["problems"] if p["field"].startswith(field) and reason in p["reason"]
        ]
        assert hits, error["problems"]
        assert hits[0]["line"] == line, hits
        assert hits[0]["file"] == "rules"  # the request field the lines are in
    assert await all_rows(db) == rows


async def test_validate_names_the_file_as_asked(
    client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    response = await client.post(
        "/v1/rules/validate",
        json={"rules": rules_text(**{'to = "new-seat@1"': 'to = "x@1"'}), "name": "pro.toml"},
        headers=admin_headers,
    )
    assert error_of(response, 422, "invalid_rules")["problems"][0]["file"] == "pro.toml"


async def test_blocked_and_ineligible_are_409_and_change_nothing(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    rows = await all_rows(db)
    blocked = await apply(
        client,
        admin_headers,
        account_id,
        rules=rules_text(
            **{'projects = { on_conflict = "archive" }': 'projects = { on_conflict = "block" }'}
        ),
    )
    ineligible = await apply(
        client,
        admin_headers,
        account_id,
        rules=rules_text(
            **{"[features]": '[eligibility]\naccount_status = ["suspended"]\n\n[features]'}
        ),
    )
    error_of(blocked, 409, "migration_blocked")
    error_of(ineligible, 409, "not_eligible")
    assert await all_rows(db) == rows


# -- an account already migrating; pending changes ---------------------------------------------


async def test_a_scheduled_change_is_pending_and_holds_the_account(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    at = datetime.now(UTC) + timedelta(days=3)
    scheduled = await apply(client, admin_headers, account_id, rules=scheduled_rules(at))
    assert scheduled.status_code == 201, scheduled.text
    first = scheduled.json()
    assert first["state"] == "scheduled" and first["holds_account"] is True
    assert first["plan"]["effective"] == "at"
    # Nothing about the account changed yet.
    assert (await state_of(db, account_id))["subscription"]["plan"] == helpers.OLD

    pending = await client.get(
        f"/v1/accounts/{account_id}/migrations", params={"state": "pending"}, headers=admin_headers
    )
    assert pending.status_code == 200
    [item] = pending.json()["items"]
    assert item["id"] == first["id"] and item["state"] == "scheduled"
    assert datetime.fromisoformat(item["effective_at"]) == at

    rows = await all_rows(db)
    second = await apply(client, admin_headers, account_id)
    error = error_of(second, 409, "migration_in_progress")
    assert error["field"] == "account_id"
    assert error["details"]["migration_id"] == first["id"]
    assert await all_rows(db) == rows

    queued = await apply(
        client, admin_headers, account_id, rules=scheduled_rules(at, "later-2"), on_pending="queue"
    )
    assert queued.status_code == 201, queued.text
    assert queued.json()["state"] == "queued" and queued.json()["holds_account"] is False
    pending = await client.get(
        f"/v1/accounts/{account_id}/migrations?state=pending", headers=admin_headers
    )
    assert [m["state"] for m in pending.json()["items"]] == ["scheduled", "queued"]

    cancelled = await client.post(f"/v1/migrations/{first['id']}/cancel", headers=admin_headers)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    pending = await client.get(
        f"/v1/accounts/{account_id}/migrations?state=pending", headers=admin_headers
    )
    assert [m["id"] for m in pending.json()["items"]] == [queued.json()["id"]]
    everything = await client.get(
        f"/v1/accounts/{account_id}/migrations?state=all", headers=admin_headers
    )
    assert len(everything.json()["items"]) == 2
    bad_state = await client.get(
        f"/v1/accounts/{account_id}/migrations?state=soon", headers=admin_headers
    )
    assert error_of(bad_state, 422, "invalid_request")["field"] == "query.state"


async def test_replace_cancels_the_pending_change(
    client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    at = datetime.now(UTC) + timedelta(days=3)
    first = (await apply(client, admin_headers, account_id, rules=scheduled_rules(at))).json()
    replaced = await apply(client, admin_headers, account_id, on_pending="replace")
    assert replaced.status_code == 201, replaced.text
    assert replaced.json()["state"] == "completed"
    old = await client.get(f"/v1/migrations/{first['id']}", headers=admin_headers)
    assert old.json()["state"] == "cancelled"
    assert replaced.json()["id"] in old.json()["error"]


async def test_two_concurrent_applies_one_wins_the_other_is_409(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    responses = await asyncio.gather(
        apply(client, admin_headers, account_id), apply(client, admin_headers, account_id)
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201, 409], [r.text for r in responses]
    loser = next(r for r in responses if r.status_code == 409)
    assert loser.json()["error"]["code"] in ("migration_in_progress", "not_eligible")
    listed = await client.get(f"/v1/accounts/{account_id}/migrations", headers=admin_headers)
    assert [m["state"] for m in listed.json()["items"]] == ["completed"]


@pytest.fixture
def clock() -> list[datetime]:
    return [datetime.now(UTC)]


@pytest.fixture
async def clocked_client(
    app_state: AppState, clock: list[datetime]
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with an executor whose clock the test moves."""
    executor = Executor(app_state.db, app_state.secrets.signing, clock=lambda: clock[0])
    app = create_app(state=replace(app_state, executor=executor))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://keyshift.test") as c:
        yield c


async def test_run_due_applies_a_scheduled_change_when_its_time_comes(
    db: Database,
    clocked_client: httpx.AsyncClient,
    admin_headers: Headers,
    account: Any,
    clock: list[datetime],
) -> None:
    account_id, _ = account
    at = clock[0] + timedelta(minutes=1)
    scheduled = await apply(clocked_client, admin_headers, account_id, rules=scheduled_rules(at))
    assert scheduled.json()["state"] == "scheduled"
    early = await clocked_client.post("/v1/migrations/run-due", headers=admin_headers)
    assert early.status_code == 200 and early.json() == {"items": []}

    clock[0] = at + timedelta(minutes=1)
    due = await clocked_client.post(
        "/v1/migrations/run-due", json={"limit": 10}, headers=admin_headers
    )

    assert due.status_code == 200, due.text
    [done] = due.json()["items"]
    assert (done["id"], done["state"]) == (scheduled.json()["id"], "completed")
    assert (await state_of(db, account_id))["subscription"]["plan"] == helpers.NEW
    bad = await clocked_client.post(
        "/v1/migrations/run-due", json={"limit": 0}, headers=admin_headers
    )
    assert error_of(bad, 422, "invalid_request")["field"] == "limit"


async def test_approve_needs_its_own_scope_and_a_held_change(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    at = datetime.now(UTC) + timedelta(days=3)
    migration_id = (
        await apply(client, admin_headers, account_id, rules=scheduled_rules(at))
    ).json()["id"]
    runner = bearer(await mint_token(db, "migrations:run"))
    approver = bearer(await mint_token(db, "migrations:approve"))
    rows = await all_rows(db)

    forbidden = await client.post(f"/v1/migrations/{migration_id}/approve", headers=runner)
    not_held = await client.post(f"/v1/migrations/{migration_id}/approve", headers=approver)

    error_of(forbidden, 403, "forbidden")
    error_of(not_held, 409, "wrong_state")
    assert await all_rows(db) == rows


async def test_a_running_migration_refuses_changes_to_what_it_carries(
    db: Database,
    client: httpx.AsyncClient,
    admin_headers: Headers,
    account: Any,
    app_state: AppState,
) -> None:
    """Locked but not yet run (as after a crash): overrides, add-ons, preferences and objects
    are refused with 409 until it is resumed."""
    account_id, keys = account
    row = await app_state.executor.request(SYSTEM, helpers.rules(), account_id)
    assert row.state == "locked"
    rows = await all_rows(db)

    refused = [
        await client.patch(
            f"/v1/licenses/{keys[0][0]}",
            json={"max_activations_override": 9},
            headers=admin_headers,
        ),
        await client.put(
            f"/v1/accounts/{account_id}/addons/extra2", json={}, headers=admin_headers
        ),
        await client.delete(f"/v1/accounts/{account_id}/addons/extra", headers=admin_headers),
        await client.put(
            f"/v1/accounts/{account_id}/preferences", json={"x": 1}, headers=admin_headers
        ),
        await client.post(
            f"/v1/accounts/{account_id}/objects",
            json={"quota": "projects", "name": "p", "units": 1, "content_base64": ""},
            headers=admin_headers,
        ),
        await apply(client, admin_headers, account_id),
    ]

    for response in refused:
        assert error_of(response, 409, "migration_in_progress")["field"] == "account_id"
    assert await all_rows(db) == rows
    resumed = await client.post(f"/v1/migrations/{row.id}/resume", headers=admin_headers)
    assert resumed.status_code == 200 and resumed.json()["state"] == "completed"


# -- bad requests -------------------------------------------------------------------------------


async def test_malformed_requests_are_4xx_naming_the_field_and_change_nothing(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    good = {"rules": helpers.RULES, "account_id": account_id}
    rows = await all_rows(db)
    json_headers = {**admin_headers, "content-type": "application/json"}

    cases: list[tuple[str, dict[str, Any] | bytes, str]] = [
        ("/v1/migrations", b'{"rules": "x", "account_id": ', "body"),
        ("/v1/migrations", {**good, "force": True}, "force"),
        ("/v1/migrations", {**good, "account_id": 5}, "account_id"),
        ("/v1/migrations", {**good, "on_pending": "sometimes"}, "on_pending"),
        ("/v1/migrations", {"account_id": account_id}, "rules"),
        ("/v1/migrations", {**good, "rules": 123}, "rules"),
        ("/v1/migrations", {**good, "rules": ""}, "rules"),
        ("/v1/migrations", {**good, "account_id": "x" * 37}, "account_id"),
        ("/v1/migrations/plan", {**good, "on_pending": "queue"}, "on_pending"),
        ("/v1/migrations/plan", [good], "body"),
        ("/v1/rules/validate", {"rules": helpers.RULES, "name": "../\n"}, "name"),
        ("/v1/rules/validate", {"text": helpers.RULES}, "rules"),
        ("/v1/migrations/run-due", {"limit": "all"}, "limit"),
    ]
    for path, body, field in cases:
        if isinstance(body, bytes):
            response = await client.post(path, content=body, headers=json_headers)
        else:
            response = await client.post(path, json=body, headers=admin_headers)
        assert error_of(response, 422)["field"] == field, (path, body, response.text)

    unknown_account = await apply(client, admin_headers, str(uuid.uuid4()))
    error_of(unknown_account, 404, "account_not_found")
    not_toml = await apply(client, admin_headers, account_id, rules="[rules\nkey = 1")
    assert error_of(not_toml, 422, "invalid_rules")["problems"][0]["line"] == 1
    assert await all_rows(db) == rows


async def test_oversized_rules_are_413_by_body_limit_or_422_naming_rules(
    db: Database,
    client: httpx.AsyncClient,
    admin_headers: Headers,
    account: Any,
    app_state: AppState,
) -> None:
    account_id, _ = account
    rows = await all_rows(db)
    padding = "\n# " + "x" * 100
    big = helpers.RULES + padding * (app_state.settings.max_body_bytes // len(padding) + 1)
    too_big_body = await apply(client, admin_headers, account_id, rules=big)
    assert error_of(too_big_body, 413, "body_too_large")["field"] == "body"

    settings = app_state.settings.model_copy(update={"max_body_bytes": 1 << 20})
    roomy = replace(app_state, settings=settings)
    app = create_app(state=roomy)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://keyshift.test"
    ) as c:
        huge = helpers.RULES + padding * (300 * 1024 // len(padding))
        for path in ("/v1/migrations", "/v1/migrations/plan", "/v1/rules/validate"):
            response = await c.post(
                path, json={"rules": huge, "account_id": account_id}, headers=admin_headers
            )
            error = error_of(response, 422, "invalid_request")
            assert error["field"] in ("rules", "account_id"), error
            assert any(p["field"] == "rules" for p in error["problems"])
    assert await all_rows(db) == rows


SCOPED: list[tuple[str, str, str]] = [
    ("POST", "/v1/rules/validate", "migrations:run"),
    ("POST", "/v1/migrations/plan", "migrations:run"),
    ("POST", "/v1/migrations", "migrations:run"),
    ("POST", "/v1/migrations/run-due", "migrations:run"),
    ("POST", "/v1/migrations/{m}/rollback", "migrations:run"),
    ("POST", "/v1/migrations/{m}/resume", "migrations:run"),
    ("POST", "/v1/migrations/{m}/finalize", "migrations:run"),
    ("POST", "/v1/migrations/{m}/cancel", "migrations:run"),
    ("POST", "/v1/migrations/{m}/approve", "migrations:approve"),
    ("POST", "/v1/accounts/{a}/migrations/rollback", "migrations:run"),
    ("GET", "/v1/migrations/{m}", "migrations:read"),
    ("GET", "/v1/accounts/{a}/migrations", "migrations:read"),
]


async def test_every_route_needs_a_token_with_its_scope(
    db: Database, client: httpx.AsyncClient, account: Any
) -> None:
    account_id, _ = account
    migration_id = str(uuid.uuid4())
    unrelated = bearer(await mint_token(db, "accounts:write", "licenses:write", "audit:read"))
    reader = bearer(await mint_token(db, "migrations:read"))
    rows = await all_rows(db)
    body = {"rules": helpers.RULES, "account_id": account_id}
    for method, template, scope in SCOPED:
        path = template.format(m=migration_id, a=account_id)
        kwargs: dict[str, Any] = (
            {"json": body}
            if template
            in (
                "/v1/migrations/plan",
                "/v1/migrations",
            )
            else {}
        )
        if template == "/v1/rules/validate":
            kwargs = {"json": {"rules": helpers.RULES}}
        anonymous = await client.request(method, path, **kwargs)
        assert error_of(anonymous, 401, "unauthenticated"), path
        assert anonymous.headers["www-authenticate"] == "Bearer"
        error = error_of(await client.request(method, path, headers=unrelated, **kwargs), 403)
        assert scope in error["message"], (path, error)
        as_reader = await client.request(method, path, headers=reader, **kwargs)
        if scope == "migrations:read":
            assert as_reader.status_code in (200, 404), (path, as_reader.text)
        else:
            error_of(as_reader, 403, "forbidden")
    assert await all_rows(db) == rows


async def test_migrations_read_and_run_tokens_can_read(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    migration_id = (await apply(client, admin_headers, account_id)).json()["id"]
    for scope in ("migrations:read", "migrations:run"):
        headers = bearer(await mint_token(db, scope))
        shown = await client.get(f"/v1/migrations/{migration_id}", headers=headers)
        listed = await client.get(f"/v1/accounts/{account_id}/migrations", headers=headers)
        assert shown.status_code == 200 and listed.status_code == 200
    gone = await client.get(f"/v1/accounts/{uuid.uuid4()}/migrations", headers=admin_headers)
    error_of(gone, 404, "account_not_found")


# -- what migrations carry: overrides, add-ons, preferences, objects ---------------------------


async def validate_key(client: httpx.AsyncClient, key: str, **extra: Any) -> dict[str, Any]:
    response = await client.post("/v1/licenses/validate", json={"key": key, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_license_overrides_take_effect_at_once_and_migrate(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, keys = account
    license_id, key = keys[0]
    assert (await validate_key(client, key, feature="b"))["code"] == "VALID"  # now cached

    patched = await client.patch(
        f"/v1/licenses/{license_id}",
        json={
            "max_activations_override": 4,
            "overrides": {"features": {"b": "disabled", "d": "enabled"}, "quotas": {"storage": 5}},
        },
        headers=admin_headers,
    )

    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["max_activations_override"] == 4
    assert body["overrides"] == {
        "features": {"b": "disabled", "d": "enabled"},
        "quotas": {"storage": 5},
    }
    shown = await client.get(f"/v1/licenses/{license_id}", headers=admin_headers)
    assert shown.json()["overrides"] == body["overrides"]
    # The cached answer was dropped at commit: the very next validation sees the override.
    answer = await validate_key(client, key, feature="b")
    assert answer["code"] == "FEATURE_NOT_ENTITLED"
    assert answer["entitlements"]["quotas"]["storage"] == 100 + 50 + 5
    # Only the fields given change: clearing the cap keeps the overrides.
    cleared = await client.patch(
        f"/v1/licenses/{license_id}", json={"max_activations_override": None}, headers=admin_headers
    )
    assert cleared.json()["max_activations_override"] is None
    assert cleared.json()["overrides"] == body["overrides"]
    events = (
        await client.get(
            "/v1/audit/events",
            params={"account_id": account_id, "limit": 1000},
            headers=admin_headers,
        )
    ).json()
    changes = [e for e in events if e["action"] == "license.overrides"]
    assert len(changes) == 2 and changes[0]["details"]["after"]["max_activations_override"] == 4

    # A migration carries them (the rules say overrides.features = "carry", the default).
    applied = await apply(client, admin_headers, account_id)
    assert applied.json()["state"] == "completed", applied.text
    after = await state_of(db, account_id)
    carried = next(lic for lic in after["licenses"] if lic["id"] == license_id)
    assert carried["overrides"]["features"] == {"b": "disabled", "d": "enabled"}


async def test_license_patch_bad_input_is_422_or_404_and_changes_nothing(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    _, keys = account
    license_id = keys[0][0]
    reader = bearer(await mint_token(db, "licenses:read"))
    rows = await all_rows(db)
    cases: list[tuple[Any, str]] = [
        ({}, "body"),
        ({"max_activations_override": 0}, "max_activations_override"),
        ({"max_activations_override": "3"}, "max_activations_override"),
        ({"max_activations_override": 100_001}, "max_activations_override"),
        ({"status": "active"}, "status"),
        ({"overrides": {"features": {"a": "maybe"}}}, "overrides.features.a"),
        ({"overrides": {"features": {"Bad Name": "enabled"}}}, "overrides.features.Bad Name"),
        ({"overrides": {"quotas": {"storage": -1}}}, "overrides.quotas.storage"),
        ({"overrides": {"quotas": {"storage": "5"}}}, "overrides.quotas.storage"),
        ({"overrides": {"quotas": {"storage": 1.5}}}, "overrides.quotas.storage"),
        ({"overrides": {"seats": 3}}, "overrides.seats"),
        (
            {"overrides": {"features": {f"f{i}": "enabled" for i in range(101)}}},
            "overrides.features",
        ),
    ]
    for body, field in cases:
        response = await client.patch(
            f"/v1/licenses/{license_id}", json=body, headers=admin_headers
        )
        assert error_of(response, 422)["field"].startswith(field), (body, response.text)
    missing = await client.patch(
        f"/v1/licenses/{uuid.uuid4()}", json={"overrides": None}, headers=admin_headers
    )
    error_of(missing, 404, "license_not_found")
    forbidden = await client.patch(
        f"/v1/licenses/{license_id}", json={"overrides": None}, headers=reader
    )
    error_of(forbidden, 403, "forbidden")
    assert await all_rows(db) == rows


async def test_addons_put_and_delete_change_entitlements_at_once(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, keys = account
    key = keys[0][1]
    assert (await validate_key(client, key))["entitlements"]["addons"] == ["extra"]

    put = await client.put(
        f"/v1/accounts/{account_id}/addons/reports",
        json={"features": {"d": "enabled"}, "quotas": {"storage": 10}},
        headers=admin_headers,
    )

    assert put.status_code == 200, put.text
    addons = put.json()["subscription"]["overrides"]["addons"]
    assert addons["reports"] == {"features": {"d": "enabled"}, "quotas": {"storage": 10}}
    assert addons["extra"] == {"quotas": {"storage": 50}, "features": {}}
    answer = await validate_key(client, key, feature="d")
    assert answer["code"] == "VALID"
    assert answer["entitlements"]["addons"] == ["extra", "reports"]
    assert answer["entitlements"]["quotas"]["storage"] == 100 + 50 + 10
    shown = await client.get(f"/v1/accounts/{account_id}", headers=admin_headers)
    assert shown.json()["subscription"]["overrides"]["addons"] == addons

    removed = await client.delete(
        f"/v1/accounts/{account_id}/addons/reports", headers=admin_headers
    )
    assert removed.status_code == 200
    assert set(removed.json()["subscription"]["overrides"]["addons"]) == {"extra"}
    assert (await validate_key(client, key))["entitlements"]["quotas"]["storage"] == 150
    events = (
        await client.get(
            "/v1/audit/events",
            params={"account_id": account_id, "limit": 1000},
            headers=admin_headers,
        )
    ).json()
    assert [e["details"]["addon"] for e in events if e["action"].startswith("account.addon")] == [
        "reports",
        "reports",
    ]

    reader = bearer(await mint_token(db, "accounts:read"))
    rows = await all_rows(db)
    again = await client.delete(f"/v1/accounts/{account_id}/addons/reports", headers=admin_headers)
    assert error_of(again, 404)["field"] == "name"
    bad_name = await client.put(
        f"/v1/accounts/{account_id}/addons/Bad!", json={}, headers=admin_headers
    )
    assert error_of(bad_name, 422)["field"] == "path.name"
    bad_grant = await client.put(
        f"/v1/accounts/{account_id}/addons/x",
        json={"quotas": {"storage": -5}},
        headers=admin_headers,
    )
    assert error_of(bad_grant, 422)["field"] == "quotas.storage"
    unknown = await client.put(
        f"/v1/accounts/{account_id}/addons/x", json={"seats": 1}, headers=admin_headers
    )
    assert error_of(unknown, 422)["field"] == "seats"
    no_account = await client.put(
        f"/v1/accounts/{uuid.uuid4()}/addons/x", json={}, headers=admin_headers
    )
    error_of(no_account, 404, "account_not_found")
    forbidden = await client.put(f"/v1/accounts/{account_id}/addons/x", json={}, headers=reader)
    error_of(forbidden, 403, "forbidden")
    assert await all_rows(db) == rows


async def test_addon_on_an_account_without_a_plan_is_409(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    created = await client.post("/v1/accounts", json={"name": "Planless"}, headers=admin_headers)
    account_id = created.json()["id"]
    response = await client.put(
        f"/v1/accounts/{account_id}/addons/x", json={}, headers=admin_headers
    )
    assert error_of(response, 409)["field"] == "account_id"


async def test_preferences_are_stored_shown_and_carried(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    wanted = {"theme": "light", "layout": {"panels": [1, 2, {"pinned": None}]}, "zoom": 1.25}
    put = await client.put(
        f"/v1/accounts/{account_id}/preferences", json=wanted, headers=admin_headers
    )
    assert put.status_code == 200, put.text
    assert put.json()["preferences"] == wanted
    shown = await client.get(f"/v1/accounts/{account_id}", headers=admin_headers)
    assert shown.json()["preferences"] == wanted
    events = (
        await client.get(
            "/v1/audit/events",
            params={"account_id": account_id, "limit": 1000},
            headers=admin_headers,
        )
    ).json()
    assert [e["details"]["keys"] for e in events if e["action"] == "account.preferences"] == [
        ["layout", "theme", "zoom"]
    ]
    applied = await apply(client, admin_headers, account_id)
    assert applied.json()["state"] == "completed"
    assert (await state_of(db, account_id))["account"]["preferences"] == wanted


async def test_preferences_bad_input_is_422_and_changes_nothing(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    rows = await all_rows(db)
    deep: Any = "bottom"
    for _ in range(12):
        deep = {"d": deep}
    path = f"/v1/accounts/{account_id}/preferences"
    json_headers = {**admin_headers, "content-type": "application/json"}
    raw_cases: list[tuple[bytes, str]] = [
        (b"[1, 2]", "body"),
        (b'"dark"', "body"),
        (b'{"theme": ', "body"),
        (b'{"ratio": NaN}', "ratio"),
        (b'{"name": "a\\u0000b"}', "name"),
        (b'{"d": ' * 5000 + b"1" + b"}" * 5000, "body"),
    ]
    for raw, field in raw_cases:
        response = await client.put(path, content=raw, headers=json_headers)
        assert response.status_code == 422, (raw[:40], response.text)
        assert response.json()["error"]["field"].startswith(field), (raw[:40], response.text)
    json_cases: list[tuple[Any, str]] = [
        ({"x" * 65: 1}, "x"),
        (deep, "d.d.d"),
        ({"blob": "x" * (17 * 1024)}, "preferences"),
    ]
    for body, field in json_cases:
        response = await client.put(path, json=body, headers=admin_headers)
        assert error_of(response, 422)["field"].startswith(field), response.text
    missing = await client.put(
        f"/v1/accounts/{uuid.uuid4()}/preferences", json={}, headers=admin_headers
    )
    error_of(missing, 404, "account_not_found")
    assert await all_rows(db) == rows


async def test_objects_put_list_and_bad_input(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    content = b"\x00\x01 binary report"
    created = await client.post(
        f"/v1/accounts/{account_id}/objects",
        json={
            "quota": "storage",
            "name": "report.bin",
            "units": 3,
            "content_base64": base64.b64encode(content).decode(),
        },
        headers=admin_headers,
    )
    assert created.status_code == 201, created.text
    made = created.json()
    assert (made["quota"], made["units"], made["tier"], made["state"]) == (
        "storage",
        3,
        "standard",
        "active",
    )
    assert made["content_hash"] == hashlib.sha256(content).hexdigest()
    listed = await client.get(f"/v1/accounts/{account_id}/objects", headers=admin_headers)
    assert listed.status_code == 200
    assert made["id"] in [o["id"] for o in listed.json()["items"]]
    assert len(listed.json()["items"]) == 6  # the five projects and this

    reader = bearer(await mint_token(db, "accounts:read"))
    rows = await all_rows(db)
    good = {"quota": "storage", "name": "n", "units": 1, "content_base64": "aGVsbG8="}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**good, "content_base64": "not base64!!"}, "content_base64"),
        ({**good, "content_base64": "aGVsbG8"}, "content_base64"),
        ({**good, "quota": "Storage Space"}, "quota"),
        ({**good, "units": -1}, "units"),
        ({**good, "units": "1"}, "units"),
        ({**good, "name": ""}, "name"),
        ({**good, "tier": "archive"}, "tier"),
        ({k: v for k, v in good.items() if k != "quota"}, "quota"),
    ]
    for body, field in cases:
        response = await client.post(
            f"/v1/accounts/{account_id}/objects", json=body, headers=admin_headers
        )
        assert error_of(response, 422)["field"] == field, (body, response.text)
    missing = await client.post(
        f"/v1/accounts/{uuid.uuid4()}/objects", json=good, headers=admin_headers
    )
    error_of(missing, 404, "account_not_found")
    gone = await client.get(f"/v1/accounts/{uuid.uuid4()}/objects", headers=admin_headers)
    error_of(gone, 404, "account_not_found")
    forbidden = await client.post(f"/v1/accounts/{account_id}/objects", json=good, headers=reader)
    error_of(forbidden, 403, "forbidden")
    assert (
        await client.get(f"/v1/accounts/{account_id}/objects", headers=reader)
    ).status_code == 200
    assert await all_rows(db) == rows


async def test_superseded_objects_are_listed_on_request(
    client: httpx.AsyncClient, admin_headers: Headers, account: Any
) -> None:
    account_id, _ = account
    await apply(client, admin_headers, account_id)
    live = await client.get(f"/v1/accounts/{account_id}/objects", headers=admin_headers)
    every = await client.get(
        f"/v1/accounts/{account_id}/objects?include_superseded=true", headers=admin_headers
    )
    assert [o["state"] for o in live.json()["items"]].count("superseded") == 0
    assert [o["state"] for o in every.json()["items"]].count("superseded") == 2


# -- a real server ------------------------------------------------------------------------------


@pytest.mark.server
async def test_plan_apply_rollback_against_a_live_server(
    db: Database, secrets: Secrets, live_server: LiveServer
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    before = await state_of(db, account_id)
    headers = bearer(await mint_token(db, "migrations:run"))
    body = {"rules": helpers.RULES, "account_id": account_id}

    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=30) as http:
        planned = await http.post("/v1/migrations/plan", json=body, headers=headers)
        assert planned.status_code == 200, planned.text
        assert planned.json()["to"] == helpers.NEW
        applied = await http.post("/v1/migrations", json=body, headers=headers)
        assert applied.status_code == 201, applied.text
        assert applied.json()["state"] == "completed"
        assert (await state_of(db, account_id))["subscription"]["plan"] == helpers.NEW
        rolled = await http.post(f"/v1/migrations/{applied.json()['id']}/rollback", headers=headers)
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["rollback"]["exact"] is True

    assert state_hash(await state_of(db, account_id)) == state_hash(before)
    assert applied.json()["snapshot_hash"] == state_hash(before)


async def test_account_attributes_postgres_cannot_store_are_422_not_500(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    """Attributes feed migration eligibility; NUL and NaN used to be a 500 on PostgreSQL."""
    rows = await all_rows(db)
    json_headers = {**admin_headers, "content-type": "application/json"}
    for raw, field in (
        (b'{"name": "n", "attributes": {"x": "a\\u0000b"}}', "attributes.x"),
        (b'{"name": "n", "attributes": {"x": NaN}}', "attributes"),
        (b'{"name": "n", "attributes": {"x": [Infinity]}}', "attributes"),
    ):
        response = await client.post("/v1/accounts", content=raw, headers=json_headers)
        assert error_of(response, 422, "invalid_request")["field"] == field, response.text
    assert await all_rows(db) == rows


@pytest.mark.server
async def test_rules_problems_from_a_live_server_name_the_request_field_and_its_line(
    db: Database, live_server: LiveServer
) -> None:
    headers = bearer(await mint_token(db, "migrations:run"))
    text = rules_text(**{'from = ["old-seat@1"]': 'from = ["old-seat@1"'})
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=30) as http:
        response = await http.post("/v1/rules/validate", json={"rules": text}, headers=headers)
    error = error_of(response, 422, "invalid_rules")
    assert error["field"] == "rules"
    assert error["problems"] == [
        {"file": "rules", "field": "", "reason": "TOML syntax: Unclosed array", "line": TO_LINE - 1}
    ]
    assert "rules.toml" not in response.text
