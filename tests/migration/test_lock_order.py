"""First uses of new migration rules racing admin writes: one lock order everywhere (the
account's rows, then the audit head), so PostgreSQL finds no deadlock and no client sees a
5xx; parallel first uses of one new rules version all go ahead (no false 409); and a deadlock
that still happens is retried whole, then answered 503 with ``Retry-After``."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import func, select, text

from keyshift.accounts import service as accounts
from keyshift.context import SYSTEM
from keyshift.db import failures
from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent, Migration, MigrationRulesVersion
from keyshift.licensing import service as licensing
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers

Headers = dict[str, str]


async def accounts_on_old_plan(db: Database, secrets: Secrets, count: int) -> list[tuple[str, str]]:
    """``count`` accounts on the old plan with one license each: [(account id, license id)]."""
    await helpers.publish(db)
    made = []
    async with db.transaction() as session:
        for index in range(count):
            account = await accounts.create_account(session, SYSTEM, name=f"Racer {index}")
            await accounts.subscribe(session, SYSTEM, account.id, helpers.OLD)
            issued = await licensing.issue_license(
                session, SYSTEM, secrets.keyring, account_id=account.id
            )
            made.append((account.id, issued.license.id))
    return made


def rules_version(version: str) -> str:
    return helpers.RULES.replace('version = "1"', f'version = "{version}"')


async def pg_deadlocks(db: Database) -> int:
    """How many deadlocks PostgreSQL has detected in this test database. The pools are closed
    first: a backend reports its statistics when it exits, not at once."""
    await db.dispose()
    url = db.url.replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(url)
    try:
        count = -1
        for _ in range(20):  # until the exiting backends' reports have landed
            await asyncio.sleep(0.1)
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            now = await conn.fetchval(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
            )
            if now == count:
                break
            count = now
        return int(count)
    finally:
        await conn.close()


async def test_first_use_applies_racing_admin_writes_deadlock_nothing_and_give_no_5xx(
    db: Database, secrets: Secrets, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    accounts = await accounts_on_old_plan(db, secrets, 24)
    before = await pg_deadlocks(db) if db.dialect == "postgresql" else 0

    async def apply(index: int, account_id: str) -> httpx.Response:
        # Each apply is the first use of its own rules version: it registers the rules.
        body = {"rules": rules_version(f"race-{index}"), "account_id": account_id}
        return await client.post("/v1/migrations", json=body, headers=admin_headers)

    async def preferences(account_id: str, n: int) -> httpx.Response:
        return await client.put(
            f"/v1/accounts/{account_id}/preferences", json={"n": n}, headers=admin_headers
        )

    async def renew(license_id: str) -> httpx.Response:
        return await client.post(f"/v1/licenses/{license_id}/renew", headers=admin_headers)

    calls: list[Any] = []
    for index, (account_id, license_id) in enumerate(accounts):
        calls += [preferences(account_id, 0), apply(index, account_id), renew(license_id)]
        calls += [preferences(account_id, 1), renew(license_id), preferences(account_id, 2)]
    responses = await asyncio.gather(*calls)

    statuses = Counter(r.status_code for r in responses)
    assert not [r.text for r in responses if r.status_code >= 500], statuses
    # An admin write that lands while the account is being migrated is refused (409); every
    # apply completes.
    assert set(statuses) <= {200, 201, 409}, statuses
    applied = [r for r in responses if r.request.url.path == "/v1/migrations"]
    assert [r.status_code for r in applied] == [201] * len(accounts), [r.text for r in applied]
    assert {r.json()["state"] for r in applied} == {"completed"}
    if db.dialect == "postgresql":
        assert await pg_deadlocks(db) == before, "PostgreSQL detected a deadlock"


async def test_parallel_first_use_of_one_new_rules_version_all_succeed(
    db: Database, secrets: Secrets, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    *accounts, (spare, _) = await accounts_on_old_plan(db, secrets, 13)
    text_ = rules_version("shared-1")
    responses = await asyncio.gather(
        *(
            client.post(
                "/v1/migrations", json={"rules": text_, "account_id": a}, headers=admin_headers
            )
            for a, _ in accounts
        )
    )

    assert [r.status_code for r in responses] == [201] * len(accounts), [r.text for r in responses]
    async with db.transaction() as session:
        registered = await session.scalar(select(func.count()).select_from(MigrationRulesVersion))
        registrations = await session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "migration.rules.register")
        )
    assert (registered, registrations) == (1, 1)

    # The same key@version with other content is still refused.
    other = text_.replace('name = "Old to new"', 'name = "Something else"')
    refused = await client.post(
        "/v1/migrations",
        json={"rules": other, "account_id": spare},
        headers=admin_headers,
    )
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["field"] == "rules.version"


# -- a deadlock that still happens ----------------------------------------------------------------


async def deadlock_on_update(db: Database, table: str, times: int) -> None:
    """Make PostgreSQL itself report a deadlock (SQLSTATE 40P01) on the next ``times`` updates
    of ``table``, from a trigger: a real rolled-back transaction, as a deadlock victim's."""
    async with db.transaction() as session:
        await session.execute(text("DROP SEQUENCE IF EXISTS deadlock_budget"))
        await session.execute(text("CREATE SEQUENCE deadlock_budget"))
        await session.execute(
            text(
                "CREATE OR REPLACE FUNCTION fake_deadlock() RETURNS trigger AS $$ BEGIN"
                f" IF nextval('deadlock_budget') <= {times} THEN"
                "   RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01';"
                " END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        await session.execute(
            text(
                f"CREATE TRIGGER fake_deadlock BEFORE INSERT OR UPDATE ON {table}"
                " FOR EACH ROW EXECUTE FUNCTION fake_deadlock()"
            )
        )


async def no_deadlocks(db: Database, table: str) -> None:
    async with db.transaction() as session:
        await session.execute(text(f"DROP TRIGGER IF EXISTS fake_deadlock ON {table}"))
        await session.execute(text("DROP SEQUENCE IF EXISTS deadlock_budget"))


@pytest.fixture
async def pg(db: Database) -> Database:
    if db.dialect != "postgresql":
        pytest.skip("the deadlock comes from a PostgreSQL trigger")
    return db


async def test_a_deadlock_victim_request_is_run_again_whole(
    pg: Database, secrets: Secrets, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    [(account_id, _)] = await accounts_on_old_plan(pg, secrets, 1)
    await deadlock_on_update(pg, "accounts", failures.TRANSACTION_ATTEMPTS - 1)
    try:
        response = await client.put(
            f"/v1/accounts/{account_id}/preferences", json={"x": 1}, headers=admin_headers
        )
    finally:
        await no_deadlocks(pg, "accounts")

    assert response.status_code == 200, response.text
    assert response.json()["preferences"] == {"x": 1}
    async with pg.transaction() as session:
        audited = await session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "account.preferences")
        )
    assert audited == 1  # the rolled-back tries left nothing


async def test_a_deadlock_that_persists_is_503_with_retry_after_and_changes_nothing(
    pg: Database, secrets: Secrets, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    [(account_id, _)] = await accounts_on_old_plan(pg, secrets, 1)
    await deadlock_on_update(pg, "accounts", failures.TRANSACTION_ATTEMPTS)
    try:
        response = await client.put(
            f"/v1/accounts/{account_id}/preferences", json={"x": 1}, headers=admin_headers
        )
    finally:
        await no_deadlocks(pg, "accounts")

    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == str(failures.RETRY_AFTER_SECONDS)
    error = response.json()["error"]
    assert error["code"] == "database_busy" and error["message"]
    shown = await client.get(f"/v1/accounts/{account_id}", headers=admin_headers)
    assert shown.json()["preferences"] == {}


async def test_a_migration_step_rolled_back_by_a_deadlock_runs_again_whole(
    pg: Database, secrets: Secrets, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    """The engine's units (the lock step, each later step) retry themselves: the request
    never re-runs a step whose predecessor committed."""
    [(account_id, _)] = await accounts_on_old_plan(pg, secrets, 1)
    # The lock step inserts the migration row; every later step updates it.
    await deadlock_on_update(pg, "migrations", failures.TRANSACTION_ATTEMPTS - 1)
    try:
        response = await client.post(
            "/v1/migrations",
            json={"rules": helpers.RULES, "account_id": account_id},
            headers=admin_headers,
        )
    finally:
        await no_deadlocks(pg, "migrations")

    assert response.status_code == 201, response.text
    assert response.json()["state"] == "completed"
    async with pg.transaction() as session:
        rows = await session.scalar(select(func.count()).select_from(Migration))
    assert rows == 1
