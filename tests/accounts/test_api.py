"""Accounts over HTTP: create, list, show and resubscribe; unknown plans and accounts; bad
input named by field and writing nothing. On both databases."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from keyshift.db.engine import Database
from keyshift.db.tables import Account, AuditEvent
from tests import factories


async def _count(db: Database, table: type) -> int:
    async with db.transaction() as session:
        return int((await session.execute(select(func.count()).select_from(table))).scalar_one())


async def _account(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> dict:
    response = await client.post(
        "/v1/accounts", json={"name": "Acme", "plan": factories.SEAT_NODE, **body}, headers=headers
    )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
async def catalog(db: Database) -> None:
    await factories.publish_sample_catalog(db)


# -- accounts ---------------------------------------------------------------------------------


async def test_create_list_show_and_resubscribe_an_account(
    client: httpx.AsyncClient, admin_headers: dict[str, str], catalog: None
) -> None:
    created = await _account(client, admin_headers, external_ref="crm-1")
    assert created["subscription"]["plan"] == factories.SEAT_NODE
    shown = (await client.get(f"/v1/accounts/{created['id']}", headers=admin_headers)).json()
    assert shown["subscription"]["entitlements_version"] == 1
    assert len(shown["subscription"]["plan_hash"]) == 64
    changed = await client.put(
        f"/v1/accounts/{created['id']}/subscription",
        json={"plan": factories.SEAT_FLOATING},
        headers=admin_headers,
    )
    assert changed.status_code == 200
    assert changed.json()["plan"] == factories.SEAT_FLOATING
    assert changed.json()["entitlements_version"] == 2
    for n in range(3):
        await _account(client, admin_headers, name=f"n{n}")
    page = (await client.get("/v1/accounts?limit=3", headers=admin_headers)).json()
    rest = (
        await client.get(f"/v1/accounts?limit=3&after={page['next']}", headers=admin_headers)
    ).json()
    assert len(page["items"]) == 3 and len(rest["items"]) == 1 and rest["next"] is None
    duplicate = await client.post(
        "/v1/accounts", json={"name": "again", "external_ref": "crm-1"}, headers=admin_headers
    )
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["field"] == "external_ref"


async def test_an_unknown_plan_creates_no_account(
    client: httpx.AsyncClient, admin_headers: dict[str, str], db: Database, catalog: None
) -> None:
    events = await _count(db, AuditEvent)
    unknown = await client.post(
        "/v1/accounts", json={"name": "x", "plan": "gold@9"}, headers=admin_headers
    )
    malformed = await client.post(
        "/v1/accounts", json={"name": "x", "plan": "Gold Plan"}, headers=admin_headers
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "plan"
    assert malformed.status_code == 422 and malformed.json()["error"]["field"] == "plan"
    assert await _count(db, Account) == 0
    assert await _count(db, AuditEvent) == events


async def test_unknown_account_is_404(
    client: httpx.AsyncClient, admin_headers: dict[str, str], catalog: None
) -> None:
    for response in (
        await client.get("/v1/accounts/nope", headers=admin_headers),
        await client.put(
            "/v1/accounts/nope/subscription",
            json={"plan": factories.SEAT_NODE},
            headers=admin_headers,
        ),
        await client.get("/v1/accounts/nope/licenses", headers=admin_headers),
        await client.post("/v1/licenses", json={"account_id": "nope"}, headers=admin_headers),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "account_not_found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "x", "colour": "red"}, "colour"),
        ({}, "name"),
        ({"name": 5}, "name"),
    ],
)
async def test_bad_account_input_is_422_naming_the_field(
    client: httpx.AsyncClient, admin_headers: dict[str, str], db: Database, body: dict, field: str
) -> None:
    response = await client.post("/v1/accounts", json=body, headers=admin_headers)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == field
    assert await _count(db, Account) == 0
