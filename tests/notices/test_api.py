"""The notices API: scopes, the endpoint (its secret shown once, never read back), templates
refused with the variable named, an account's history, the dead-letter list and replay, a
run announced — in-process on both databases, and end to end against a real `keyshift serve`
with a real `keyshift notices deliver` and a real receiver on loopback."""

from __future__ import annotations

import asyncio
import signal
import sys
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select, update

from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent, Notice, NoticeEndpoint
from keyshift.notices.kinds import NoticeState
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers as migration
from tests.notices.receiver import fail_first, receiving
from tests.runs import helpers as run_helpers
from tests.support import LiveServer, cli_env, mint_token

Headers = dict[str, str]


async def _bearer(db: Database, *scopes: str) -> Headers:
    return {"Authorization": f"Bearer {await mint_token(db, *scopes, name='-'.join(scopes))}"}


async def test_configuring_needs_notices_write_and_reading_notices_read(
    db: Database, client: httpx.AsyncClient
) -> None:
    reader = await _bearer(db, "notices:read")
    writer = await _bearer(db, "notices:write")
    body = {"url": "http://127.0.0.1:9/hook"}
    assert (await client.put("/v1/notices/endpoint", json=body, headers=reader)).status_code == 403
    assert (await client.get("/v1/notices/dead", headers=writer)).status_code == 403
    assert (await client.get("/v1/notices/endpoint", headers=reader)).status_code == 404

    made = await client.put("/v1/notices/endpoint", json=body, headers=writer)
    assert made.status_code == 200, made.text
    secret = made.json()["secret"]
    assert secret.startswith("whsec_")
    shown = await client.get("/v1/notices/endpoint", headers=reader)
    assert shown.json()["url"] == body["url"] and shown.json()["secret"] is None
    async with db.transaction() as session:
        row = (await session.execute(select(NoticeEndpoint))).scalar_one()
    assert secret.encode() not in row.secret_ciphertext  # sealed at rest
    given = await client.put(
        "/v1/notices/endpoint", json={**body, "secret": secret}, headers=writer
    )
    assert given.json()["secret"] is None  # a secret given is never echoed


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"url": "ftp://example.com/x"}, "url", "http:// or https://"),
        ({"url": "http://user:pw@example.com/x"}, "url", "credentials"),
        ({"url": "http://"}, "url", "no host"),
        ({"url": "http://example.com", "secret": "abc"}, "secret", "whsec_"),
        ({"url": "http://example.com", "secret": "whsec_!!!"}, "secret", "base64"),
        ({"url": "http://example.com", "secret": "whsec_AAAA"}, "secret", "24 to 64"),
    ],
)
async def test_a_bad_endpoint_is_refused_naming_the_field_and_audited(
    db: Database, client: httpx.AsyncClient, body: dict[str, str], field: str, says: str
) -> None:
    refused = await client.put(
        "/v1/notices/endpoint", json=body, headers=await _bearer(db, "notices:write")
    )
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_endpoint", field)
    assert says in error["message"]
    async with db.transaction() as session:
        assert (await session.execute(select(NoticeEndpoint))).scalars().all() == []
        actions = (await session.execute(select(AuditEvent.action))).scalars().all()
    assert [a for a in actions if a.startswith("notice.")] == ["notice.endpoint.refused"]


async def test_a_template_with_an_unknown_variable_is_a_422_naming_it(
    db: Database, client: httpx.AsyncClient
) -> None:
    writer = await _bearer(db, "notices:write", "notices:read")
    refused = await client.put(
        "/v1/notices/templates/completed",
        json={"subject": "Done", "body": "Hello $account_name, you owe $balance"},
        headers=writer,
    )
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_template" and error["field"] == "body"
    assert error["details"]["variable"] == "balance"
    stored = await client.put(
        "/v1/notices/templates/completed",
        json={"subject": "Done", "body": "Hello $account_name"},
        headers=writer,
    )
    assert stored.status_code == 200 and stored.json()["custom"] is True
    listed = (await client.get("/v1/notices/templates", headers=writer)).json()
    assert {t["kind"]: t["custom"] for t in listed}["completed"] is True
    assert len(listed) == 5
    reset = await client.delete("/v1/notices/templates/completed", headers=writer)
    assert reset.json()["custom"] is False
    unknown = await client.put(
        "/v1/notices/templates/invoice", json={"subject": "s", "body": "b"}, headers=writer
    )
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "path.notice_kind"


async def test_history_dead_letters_and_replay(
    db: Database, secrets: Secrets, client: httpx.AsyncClient
) -> None:
    await migration.publish(db)
    account_id, _ = await migration.rich_account(db, secrets)
    runner = await _bearer(db, "migrations:run")
    body = {"rules": migration.RULES, "account_id": account_id}
    assert (await client.post("/v1/migrations", json=body, headers=runner)).status_code == 201
    reader = await _bearer(db, "notices:read", "notices:write")

    history = (await client.get(f"/v1/accounts/{account_id}/notices", headers=reader)).json()
    assert [n["kind"] for n in history] == ["completed", "started"]  # newest first
    assert history[0]["payload"]["receipt"]["body"]["account_id"] == account_id
    assert (await client.get("/v1/notices/dead", headers=reader)).json() == []

    async with db.transaction() as session:
        await session.execute(
            update(Notice).where(Notice.id == history[0]["id"]).values(state=NoticeState.DEAD)
        )
    assert [n["id"] for n in (await client.get("/v1/notices/dead", headers=reader)).json()] == [
        history[0]["id"]
    ]
    replayed = await client.post(f"/v1/notices/{history[0]['id']}/replay", headers=reader)
    assert replayed.status_code == 200 and replayed.json()["state"] == "pending"
    again = await client.post(f"/v1/notices/{history[0]['id']}/replay", headers=reader)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "notice_not_replayable"
    missing = await client.post("/v1/notices/nope/replay", headers=reader)
    assert missing.status_code == 404


async def test_announcing_a_run_over_the_api(
    db: Database, secrets: Secrets, client: httpx.AsyncClient
) -> None:
    await run_helpers.cohort(db, secrets, 2)
    run = await run_helpers.approved_run(db)
    runner = await _bearer(db, "migrations:run")
    on = (datetime.now(UTC) + timedelta(days=20)).replace(microsecond=0)
    body = {"on": on.isoformat().replace("+00:00", "Z"), "lead_days": 5}
    made = await client.post(f"/v1/runs/{run.id}/announce", json=body, headers=runner)
    assert made.status_code == 200, made.text
    assert made.json()["notices"] == 2
    assert made.json()["send_at"] == (on - timedelta(days=5)).isoformat().replace("+00:00", "Z")
    reader = await _bearer(db, "notices:read")
    assert (
        await client.post(f"/v1/runs/{run.id}/announce", json=body, headers=reader)
    ).status_code == 403
    past = await client.post(
        f"/v1/runs/{run.id}/announce", json={"on": "2001-01-01T00:00:00Z"}, headers=runner
    )
    assert past.status_code == 422 and past.json()["error"]["field"] == "on"


@pytest.mark.server
@pytest.mark.server_env(KEYSHIFT_WEBHOOK_BACKOFF_SECONDS="0.05")
async def test_a_live_server_and_a_live_deliverer_reach_a_receiver_once_per_notice(
    db: Database, secrets: Secrets, settings: Settings, live_server: LiveServer
) -> None:
    await migration.publish(db)
    account_id, _ = await migration.rich_account(db, secrets)
    headers = await _bearer(db, "notices:write", "notices:read", "migrations:run")
    with receiving(fail_first(2)) as receiver:
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=30) as http:
            made = await http.put(
                "/v1/notices/endpoint", json={"url": receiver.url}, headers=headers
            )
            secret = made.json()["secret"]
            body = {"rules": migration.RULES, "account_id": account_id}
            applied = await http.post("/v1/migrations", json=body, headers=headers)
            assert applied.status_code == 201, applied.text
            rolled = await http.post(
                f"/v1/migrations/{applied.json()['id']}/rollback", headers=headers
            )
            assert rolled.status_code == 200, rolled.text

            env = {
                **cli_env(settings),
                "KEYSHIFT_WEBHOOK_BACKOFF_SECONDS": "0.05",
                "KEYSHIFT_WEBHOOK_BACKOFF_MAX_SECONDS": "0.1",
            }
            deliverer = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "keyshift.cli", "notices", "deliver", "--loop",
                "--interval", "0.05",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                for _ in range(600):  # a minute at most
                    if len(receiver.accepted()) >= 3:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)  # a double send would arrive in this time
            finally:
                deliverer.send_signal(signal.SIGTERM)
                out, err = await asyncio.wait_for(deliverer.communicate(), timeout=30)
            assert deliverer.returncode == 0, err.decode()
            history = (await http.get(f"/v1/accounts/{account_id}/notices", headers=headers)).json()
        bodies = receiver.verified(secret)
    assert sorted(b["type"] for b in bodies) == [
        "migration.completed",
        "migration.rolled_back",
        "migration.started",
    ]
    assert sorted(r.webhook_id for r in receiver.accepted()) == sorted(n["id"] for n in history)
    assert {(n["state"], n["attempts"]) for n in history} == {("delivered", 3)}
    assert b'"delivered":3' in out.replace(b" ", b"")
