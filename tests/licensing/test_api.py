"""The licenses API: scopes over the admin routes, bad input, the lifecycle and the client
routes (accounts over HTTP: tests/accounts/test_api.py)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from keyshift.db.engine import Database
from keyshift.db.tables import Account, Activation, AuditEvent, License
from keyshift.licensing import keys
from tests import factories
from tests.support import LiveServer, mint_token


async def _count(db: Database, table: type) -> int:
    async with db.transaction() as session:
        return int((await session.execute(select(func.count()).select_from(table))).scalar_one())


async def _account(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> dict:
    response = await client.post(
        "/v1/accounts", json={"name": "Acme", "plan": factories.SEAT_NODE, **body}, headers=headers
    )
    assert response.status_code == 201, response.text
    return response.json()


async def _issue(client: httpx.AsyncClient, headers: dict[str, str], account_id: str, **kw: Any):  # type: ignore[no-untyped-def]
    response = await client.post(
        "/v1/licenses", json={"account_id": account_id, **kw}, headers=headers
    )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
async def catalog(db: Database) -> None:
    await factories.publish_sample_catalog(db)


# -- authentication and scopes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/accounts"),
        ("GET", "/v1/accounts"),
        ("GET", "/v1/accounts/x"),
        ("PUT", "/v1/accounts/x/subscription"),
        ("POST", "/v1/licenses"),
        ("GET", "/v1/licenses/x"),
        ("GET", "/v1/accounts/x/licenses"),
        ("POST", "/v1/licenses/x/suspend"),
        ("POST", "/v1/licenses/x/revoke"),
        ("GET", "/v1/licenses/x/activations"),
        ("DELETE", "/v1/activations/x"),
    ],
)
async def test_admin_routes_need_a_valid_bearer_token(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    missing = await client.request(method, path, json={})
    bad = await client.request(method, path, json={}, headers={"Authorization": "Bearer kst_nope"})
    assert (missing.status_code, bad.status_code) == (401, 401)
    assert missing.json()["error"]["code"] == "unauthenticated"


async def test_wrong_scope_is_forbidden(
    client: httpx.AsyncClient, db: Database, catalog: None
) -> None:
    reader = {"Authorization": f"Bearer {await mint_token(db, 'licenses:read', 'accounts:read')}"}
    writer = {"Authorization": f"Bearer {await mint_token(db, 'licenses:write')}"}
    assert (
        await client.post("/v1/accounts", json={"name": "x"}, headers=reader)
    ).status_code == 403
    assert (
        await client.post("/v1/licenses", json={"account_id": "x"}, headers=reader)
    ).status_code == 403
    assert (await client.get("/v1/accounts", headers=writer)).status_code == 403
    # licenses:write may remove a machine (docs/security.md): an unknown one is a 404, not a 403.
    assert (await client.delete("/v1/activations/x", headers=writer)).status_code == 404
    assert (await client.get("/v1/accounts", headers=reader)).status_code == 200
    assert await _count(db, Account) == 0


async def test_wrong_content_type_and_oversized_bodies_are_refused(
    client: httpx.AsyncClient, admin_headers: dict[str, str], db: Database
) -> None:
    as_form = await client.post(
        "/v1/accounts",
        content=b"name=x",
        headers={**admin_headers, "Content-Type": "application/x-www-form-urlencoded"},
    )
    huge = await client.post(
        "/v1/accounts",
        json={"name": "x", "attributes": {"a": "y" * 100_000}},
        headers=admin_headers,
    )
    activate_huge = await client.post(
        "/v1/licenses/activate", json={"key": "k", "fingerprint": "f" * 200_000}
    )
    assert as_form.status_code == 415
    assert (huge.status_code, activate_huge.status_code) == (413, 413)
    assert await _count(db, Account) == 0


# -- licenses ---------------------------------------------------------------------------------


async def test_issue_returns_the_key_once_and_never_again(
    client: httpx.AsyncClient, admin_headers: dict[str, str], catalog: None
) -> None:
    account = await _account(client, admin_headers)
    issued = await _issue(client, admin_headers, account["id"], max_activations=2)
    key = issued["key"]
    assert keys.normalise(key) == key
    assert issued["key_hint"] == "…" + key[-5:]
    assert issued["standing"] == "active" and issued["max_activations_override"] == 2
    shown = await client.get(f"/v1/licenses/{issued['id']}", headers=admin_headers)
    listed = await client.get(f"/v1/accounts/{account['id']}/licenses", headers=admin_headers)
    for response in (shown, listed):
        assert response.status_code == 200
        assert key not in response.text and key.replace("-", "") not in response.text
    assert [lic["id"] for lic in listed.json()] == [issued["id"]]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": "2099-01-01T00:00:00"}, "expires_at"),  # no timezone
        ({"expires_at": "soon"}, "expires_at"),
        ({"max_activations": 0}, "max_activations"),
        ({"max_activations": "many"}, "max_activations"),
        ({"seats": 3}, "seats"),
    ],
)
async def test_bad_license_input_is_422_and_issues_nothing(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    db: Database,
    catalog: None,
    extra: dict,
    field: str,
) -> None:
    account = await _account(client, admin_headers)
    response = await client.post(
        "/v1/licenses", json={"account_id": account["id"], **extra}, headers=admin_headers
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert await _count(db, License) == 0


async def test_issue_for_an_account_without_a_plan_is_409(
    client: httpx.AsyncClient, admin_headers: dict[str, str], catalog: None
) -> None:
    bare = (await client.post("/v1/accounts", json={"name": "b"}, headers=admin_headers)).json()
    response = await client.post(
        "/v1/licenses", json={"account_id": bare["id"]}, headers=admin_headers
    )
    assert response.status_code == 409
    assert response.json()["error"]["field"] == "account_id"


async def test_lifecycle_over_http(
    client: httpx.AsyncClient, admin_headers: dict[str, str], catalog: None
) -> None:
    account = await _account(client, admin_headers)
    issued = await _issue(client, admin_headers, account["id"])
    base = f"/v1/licenses/{issued['id']}"
    suspended = await client.post(
        f"{base}/suspend", json={"reason": "unpaid"}, headers=admin_headers
    )
    assert suspended.status_code == 200
    assert (suspended.json()["status"], suspended.json()["version"]) == ("suspended", 2)
    again = await client.post(f"{base}/suspend", headers=admin_headers)
    assert again.status_code == 409
    reinstated = await client.post(f"{base}/reinstate", headers=admin_headers)
    assert reinstated.json()["status"] == "active"
    renewed = await client.post(
        f"{base}/renew", json={"expires_at": "2040-01-01T00:00:00Z"}, headers=admin_headers
    )
    assert renewed.json()["expires_at"].startswith("2040-01-01")
    revoked = await client.post(f"{base}/revoke", headers=admin_headers)
    assert revoked.json()["status"] == "revoked"
    final = await client.post(f"{base}/reinstate", headers=admin_headers)
    assert final.status_code == 409
    assert final.json()["error"]["code"] == "license_not_active"
    assert "revoked" in final.json()["error"]["message"]
    missing = await client.post("/v1/licenses/nope/suspend", headers=admin_headers)
    assert missing.status_code == 404


# -- client routes ----------------------------------------------------------------------------


async def test_client_activate_heartbeat_deactivate_with_the_key(
    client: httpx.AsyncClient, admin_headers: dict[str, str], db: Database, catalog: None
) -> None:
    account = await _account(client, admin_headers)
    issued = await _issue(client, admin_headers, account["id"], max_activations=1)
    machine = {"key": issued["key"], "fingerprint": "laptop-1"}
    first = await client.post("/v1/licenses/activate", json={**machine, "label": "Ann's laptop"})
    repeat = await client.post("/v1/licenses/activate", json=machine)
    other = await client.post(
        "/v1/licenses/activate", json={"key": issued["key"], "fingerprint": "laptop-2"}
    )
    assert (first.status_code, repeat.status_code, other.status_code) == (201, 200, 409)
    assert other.json()["error"]["code"] == "activation_limit_reached"
    assert first.json()["id"] == repeat.json()["id"]
    beat = await client.post("/v1/licenses/heartbeat", json=machine)
    assert beat.status_code == 200
    listed = await client.get(f"/v1/licenses/{issued['id']}/activations", headers=admin_headers)
    assert [a["fingerprint"] for a in listed.json()] == ["laptop-1"]
    gone = await client.post("/v1/licenses/deactivate", json=machine)
    assert gone.status_code == 200
    assert (await client.post("/v1/licenses/deactivate", json=machine)).status_code == 404
    async with db.transaction() as session:
        actors = {
            e.actor
            for e in (await session.execute(select(AuditEvent))).scalars()
            if e.target_type == "activation"
        }
    assert actors == {f"license:{issued['id']}"}


async def test_admin_deletes_an_activation(
    client: httpx.AsyncClient, admin_headers: dict[str, str], db: Database, catalog: None
) -> None:
    account = await _account(client, admin_headers)
    issued = await _issue(client, admin_headers, account["id"])
    activation = (
        await client.post(
            "/v1/licenses/activate", json={"key": issued["key"], "fingerprint": "lost-phone"}
        )
    ).json()
    deleted = await client.delete(f"/v1/activations/{activation['id']}", headers=admin_headers)
    assert deleted.status_code == 200
    assert await _count(db, Activation) == 0
    again = await client.delete(f"/v1/activations/{activation['id']}", headers=admin_headers)
    assert again.status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"key": "NOT-A-KEY", "fingerprint": "m"}, 422, "key"),
        ({"key": "x" * 65, "fingerprint": "m"}, 422, "key"),
        ({"key": "VALID", "fingerprint": "f" * 10_000}, 422, "fingerprint"),
        ({"key": "VALID", "fingerprint": ""}, 422, "fingerprint"),
        ({"key": "VALID", "fingerprint": "bell\x07"}, 422, "fingerprint"),
        ({"key": "VALID", "fingerprint": "m", "admin": True}, 422, "admin"),
        ({"key": "UNKNOWN", "fingerprint": "m"}, 404, "key"),
        ({"fingerprint": "m"}, 422, "key"),
    ],
)
async def test_bad_client_input_is_refused_and_writes_nothing(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    db: Database,
    catalog: None,
    body: dict,
    status: int,
    field: str,
) -> None:
    account = await _account(client, admin_headers)
    issued = await _issue(client, admin_headers, account["id"])
    substitutes = {"VALID": issued["key"], "UNKNOWN": keys.generate()}
    body = {k: substitutes.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    events = await _count(db, AuditEvent)
    response = await client.post("/v1/licenses/activate", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field
    assert await _count(db, Activation) == 0
    assert await _count(db, AuditEvent) == events


async def test_a_suspended_license_cannot_activate(
    client: httpx.AsyncClient, admin_headers: dict[str, str], catalog: None
) -> None:
    account = await _account(client, admin_headers)
    issued = await _issue(client, admin_headers, account["id"])
    await client.post(f"/v1/licenses/{issued['id']}/suspend", headers=admin_headers)
    response = await client.post(
        "/v1/licenses/activate", json={"key": issued["key"], "fingerprint": "m"}
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "license_not_active"


@pytest.mark.server
async def test_account_license_and_activation_against_a_real_server(
    live_server: LiveServer, db: Database, catalog: None
) -> None:
    headers = {"Authorization": f"Bearer {await mint_token(db, 'admin')}"}
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=10) as http:
        account = await http.post(
            "/v1/accounts", json={"name": "Live", "plan": factories.SEAT_NODE}, headers=headers
        )
        assert account.status_code == 201, account.text
        issued = await http.post(
            "/v1/licenses", json={"account_id": account.json()["id"]}, headers=headers
        )
        assert issued.status_code == 201, issued.text
        activated = await http.post(
            "/v1/licenses/activate",
            json={"key": issued.json()["key"], "fingerprint": "live-machine"},
        )
        assert activated.status_code == 201, activated.text
        assert activated.json()["mode"] == "node"
    assert await _count(db, Activation) == 1
