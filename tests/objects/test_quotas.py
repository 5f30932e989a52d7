"""Data objects within the account's quotas, over the API on both databases: a write past the
effective limit is a 409 naming the quota, its limit and the use, unless the plan allows
overage on it; a read-only quota takes nothing new; an unknown quota is a 422; a refusal writes
nothing; parallel writers never overshoot; and the same against a real server process."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from keyshift.api.state import AppState
from keyshift.catalog import service as catalog
from keyshift.catalog.entitlements import Entitlements
from keyshift.catalog.manifests import Plan
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent, DataObject
from keyshift.objects import service as storage
from keyshift.objects.errors import ObjectQuotaExceeded, QuotaReadOnly, UnknownQuota
from keyshift.security.secrets_store import Secrets
from tests import factories
from tests.migration import helpers
from tests.support import LiveServer, mint_token

Headers = dict[str, str]

#: Over the sample edition (projects 10, storage_gb 5): storage past 5 GB is billed, not refused.
STORAGE_OVERAGE = "storage-overage@1"


def _overage_plan(overage: str) -> Plan:
    key = STORAGE_OVERAGE.split("@")[0] if overage == "allow" else f"storage-{overage}"
    return Plan.model_validate(
        {
            "plan": {"key": key, "version": "1", "name": key, "edition": "sample@1"},
            "licensing": {"model": "usage"},
            "meters": [{"key": "storage_gb", "unit": "GB", "included": 5, "overage": overage}],
        }
    )


async def publish(db: Database) -> None:
    await factories.publish_sample_catalog(db)
    manifests = [catalog.Manifest("plan", _overage_plan(o)) for o in ("allow", "block")]
    async with db.transaction() as session:
        await catalog.publish(session, SYSTEM, manifests)


def body(quota: str, units: int, name: str = "thing") -> dict[str, Any]:
    return {
        "quota": quota,
        "name": name,
        "units": units,
        "content_base64": base64.b64encode(name.encode()).decode(),
    }


async def counts(db: Database) -> tuple[int, int]:
    """(data objects, audit events): unchanged by a refused write."""
    async with db.transaction() as session:
        objects = await session.scalar(select(func.count()).select_from(DataObject))
        events = await session.scalar(select(func.count()).select_from(AuditEvent))
    return int(objects or 0), int(events or 0)


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


# -- the decision, pure -------------------------------------------------------------------------


def entitlements(**kw: Any) -> Entitlements:
    return Entitlements(
        plan_ref="p@1", plan_hash="h", edition_ref="e@1", model="usage", quotas={"q": 10}, **kw
    )


def test_admit_object_fits_refuses_or_admits_as_overage() -> None:
    assert storage.admit_object(entitlements(), "q", 9, 1) is False
    assert storage.admit_object(entitlements(), "q", 12, 0) is False  # 0 units never grow it
    with pytest.raises(ObjectQuotaExceeded) as refused:
        storage.admit_object(entitlements(), "q", 10, 1)
    assert refused.value.details == {"quota": "q", "limit": 10, "used": 10, "requested": 1}
    for overage, admitted in (("allow", True), ("notify", True), ("block", False)):
        meters = {"q": {"overage": overage}}
        if admitted:
            assert storage.admit_object(entitlements(meters=meters), "q", 10, 5) is True
        else:
            with pytest.raises(ObjectQuotaExceeded):
                storage.admit_object(entitlements(meters=meters), "q", 10, 5)
    with pytest.raises(UnknownQuota):
        storage.admit_object(entitlements(), "other", 0, 1)
    # Read-only wins over room left and over an overage policy alike.
    read_only = entitlements(read_only=("q",), meters={"q": {"overage": "allow"}})
    with pytest.raises(QuotaReadOnly):
        storage.admit_object(read_only, "q", 0, 0)


# -- over the API, both databases -----------------------------------------------------------------


async def test_the_eleventh_project_is_refused_naming_quota_limit_and_use(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    await publish(db)
    account = await factories.create_account(db)  # seat-node@1 over sample@1: projects 10
    path = f"/v1/accounts/{account.id}/objects"
    for index in range(10):
        made = await client.post(path, json=body("projects", 1, f"p{index}"), headers=admin_headers)
        assert made.status_code == 201, made.text
    before = await counts(db)

    refused = await client.post(path, json=body("projects", 1, "p10"), headers=admin_headers)

    error = error_of(refused, 409, "quota_exceeded")
    assert error["details"] == {"quota": "projects", "limit": 10, "used": 10, "requested": 1}
    assert "projects" in error["message"] and error["field"] == "units"
    assert await counts(db) == before
    listed = await client.get(path, headers=admin_headers)
    assert len(listed.json()["items"]) == 10


async def test_a_million_gb_on_a_5_gb_quota_is_refused_and_what_fits_is_not(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    await publish(db)
    account = await factories.create_account(db)
    path = f"/v1/accounts/{account.id}/objects"
    before = await counts(db)
    refused = await client.post(path, json=body("storage_gb", 1_000_000), headers=admin_headers)
    error = error_of(refused, 409, "quota_exceeded")
    assert error["details"] == {
        "quota": "storage_gb",
        "limit": 5,
        "used": 0,
        "requested": 1_000_000,
    }
    assert await counts(db) == before

    assert (await client.post(path, json=body("storage_gb", 3), headers=admin_headers)).is_success
    assert (await client.post(path, json=body("storage_gb", 2), headers=admin_headers)).is_success
    full = await client.post(path, json=body("storage_gb", 1), headers=admin_headers)
    assert error_of(full, 409, "quota_exceeded")["details"]["used"] == 5
    # An empty object takes no room; another quota's room is its own.
    assert (await client.post(path, json=body("storage_gb", 0), headers=admin_headers)).is_success
    assert (await client.post(path, json=body("projects", 10), headers=admin_headers)).is_success


async def test_a_quota_the_edition_does_not_have_is_422_naming_the_field(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    await publish(db)
    account = await factories.create_account(db)
    before = await counts(db)
    response = await client.post(
        f"/v1/accounts/{account.id}/objects", json=body("no_such_quota", 1), headers=admin_headers
    )
    error = error_of(response, 422, "unknown_quota")
    assert error["field"] == "quota" and "no_such_quota" in error["message"]
    assert await counts(db) == before


async def test_an_account_without_a_plan_has_no_quotas_to_file_under(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    await publish(db)
    account = await factories.create_account(db, None)
    before = await counts(db)
    response = await client.post(
        f"/v1/accounts/{account.id}/objects", json=body("projects", 1), headers=admin_headers
    )
    assert error_of(response, 409, "conflict")["field"] == "account_id"
    assert await counts(db) == before


async def test_a_plan_that_allows_overage_accepts_past_the_limit_and_audits_it(
    db: Database, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    await publish(db)
    allowing = await factories.create_account(db, STORAGE_OVERAGE, name="Allowing")
    blocking = await factories.create_account(db, "storage-block@1", name="Blocking")

    accepted = await client.post(
        f"/v1/accounts/{allowing.id}/objects",
        json=body("storage_gb", 1_000_000),
        headers=admin_headers,
    )
    assert accepted.status_code == 201, accepted.text
    async with db.transaction() as session:
        event = await session.scalar(
            select(AuditEvent).where(
                AuditEvent.action == "object.put", AuditEvent.target_id == accepted.json()["id"]
            )
        )
    assert event is not None
    assert event.details["over_quota"] == {"limit": 5, "used": 0}
    # Overage is the plan's word for that quota only; a block meter of the name holds the line.
    projects = await client.post(
        f"/v1/accounts/{allowing.id}/objects", json=body("projects", 11), headers=admin_headers
    )
    error_of(projects, 409, "quota_exceeded")
    blocked = await client.post(
        f"/v1/accounts/{blocking.id}/objects", json=body("storage_gb", 6), headers=admin_headers
    )
    error_of(blocked, 409, "quota_exceeded")


async def test_add_ons_and_a_grace_raise_the_limit(
    db: Database, secrets: Secrets, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    """The effective entitlements decide, as validation reports them: old@1 gives storage 100
    and the account's ``extra`` add-on 50 more; a migration's grace keeps old@1's 10 projects
    where new@1 has 3; a migration's read_only resolution freezes the quota."""
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)  # 5 projects, storage add-on +50
    path = f"/v1/accounts/{account_id}/objects"
    assert (await client.post(path, json=body("storage", 150), headers=admin_headers)).is_success
    over = await client.post(path, json=body("storage", 1), headers=admin_headers)
    assert error_of(over, 409, "quota_exceeded")["details"]["limit"] == 150

    grace = _rules_with('projects = { on_conflict = "grace", grace_days = 30 }')
    migrated = await client.post(
        "/v1/migrations", json={"rules": grace, "account_id": account_id}, headers=admin_headers
    )
    assert migrated.json()["state"] == "completed", migrated.text
    for index in range(5):  # 5 + 5 = the old 10, though new@1 allows 3
        made = await client.post(path, json=body("projects", 1, f"g{index}"), headers=admin_headers)
        assert made.status_code == 201, made.text
    over = await client.post(path, json=body("projects", 1), headers=admin_headers)
    assert error_of(over, 409, "quota_exceeded")["details"] == {
        "quota": "projects",
        "limit": 10,
        "used": 10,
        "requested": 1,
    }


async def test_a_read_only_quota_after_a_migration_refuses_new_objects(
    db: Database, secrets: Secrets, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)  # 5 projects; new@1 allows 3
    read_only = _rules_with('projects = { on_conflict = "read_only" }')
    migrated = await client.post(
        "/v1/migrations", json={"rules": read_only, "account_id": account_id}, headers=admin_headers
    )
    assert migrated.json()["state"] == "completed", migrated.text
    path = f"/v1/accounts/{account_id}/objects"
    before = await counts(db)

    for units in (1, 0):
        refused = await client.post(path, json=body("projects", units), headers=admin_headers)
        error = error_of(refused, 409, "quota_read_only")
        assert error["field"] == "quota" and error["details"] == {"quota": "projects"}
    assert await counts(db) == before
    # The other quotas are as they were.
    assert (await client.post(path, json=body("storage", 1), headers=admin_headers)).is_success


async def test_parallel_writers_never_take_a_quota_past_its_limit(
    db: Database, app_state: AppState, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    """Each request its own transaction on its own connection: on PostgreSQL they really run
    at once and the subscription's row lock orders them; on SQLite BEGIN IMMEDIATE does."""
    await publish(db)
    account = await factories.create_account(db)  # projects 10
    path = f"/v1/accounts/{account.id}/objects"
    async with db.transaction() as session:  # 4 of 10 taken before the race
        await storage.put_object(
            session, SYSTEM, account.id, quota="projects", name="old", units=4, content=b""
        )

    async def one(index: int) -> int:
        response = await client.post(
            path, json=body("projects", 1, f"p{index}"), headers=admin_headers
        )
        assert response.status_code in (201, 409), response.text
        return response.status_code

    statuses = await asyncio.gather(*(one(i) for i in range(16)))

    assert statuses.count(201) == 6 and statuses.count(409) == 10
    async with db.transaction() as session:
        assert await storage.quota_used(session, account.id, "projects") == 10


# -- a real server --------------------------------------------------------------------------------


@pytest.mark.server
async def test_quotas_hold_against_a_live_server(db: Database, live_server: LiveServer) -> None:
    await publish(db)
    account = await factories.create_account(db)
    headers = {"Authorization": f"Bearer {await mint_token(db, 'accounts:write')}"}
    path = f"/v1/accounts/{account.id}/objects"
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=30) as http:
        made = await http.post(path, json=body("projects", 10), headers=headers)
        assert made.status_code == 201, made.text
        before = await counts(db)
        eleventh = await http.post(path, json=body("projects", 1), headers=headers)
        assert error_of(eleventh, 409, "quota_exceeded")["details"] == {
            "quota": "projects",
            "limit": 10,
            "used": 10,
            "requested": 1,
        }
        unknown = await http.post(path, json=body("seats_gb", 1), headers=headers)
        assert error_of(unknown, 422, "unknown_quota")["field"] == "quota"
        assert await counts(db) == before


def _rules_with(projects_rule: str) -> str:
    """The helpers' rules with another resolution for the projects quota (new@1 allows 3)."""
    old = 'projects = { on_conflict = "archive" }'
    assert old in helpers.RULES
    return helpers.RULES.replace(old, projects_rule)
