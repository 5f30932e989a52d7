"""The audit log over HTTP: read with `audit:read`, verification names tampering."""

from __future__ import annotations

import httpx
from sqlalchemy import update

from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent
from tests.conftest import mint_token


async def test_verify_endpoint_reports_an_edited_event(
    client: httpx.AsyncClient, db: Database
) -> None:
    admin = {"Authorization": f"Bearer {await mint_token(db, 'admin')}"}
    for i in range(3):
        created = await client.post(
            "/v1/tokens", json={"name": f"t{i}", "scopes": ["audit:read"]}, headers=admin
        )
        assert created.status_code == 201
    reader = {"Authorization": f"Bearer {await mint_token(db, 'audit:read')}"}
    clean = (await client.get("/v1/audit/verify", headers=reader)).json()
    assert clean == {"ok": True, "checked": 5, "problems": []}

    events = (await client.get("/v1/audit/events?after_seq=1&limit=2", headers=reader)).json()
    assert [e["seq"] for e in events] == [2, 3]
    assert all(e["request_id"] for e in events)

    async with db.transaction() as session:
        await session.execute(
            update(AuditEvent).where(AuditEvent.seq == 3).values(details={"forged": True})
        )
    broken = (await client.get("/v1/audit/verify", headers=reader)).json()
    assert broken["ok"] is False
    assert [(p["seq"], p["kind"]) for p in broken["problems"]] == [(3, "edited")]
