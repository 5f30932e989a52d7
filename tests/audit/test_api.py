"""The audit log over HTTP: read with `audit:read`, verification names tampering."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select, update

from keyshift.audit import service as audit
from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent
from tests.support import LiveServer, mint_token


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
    assert [(p["seq"], p["kind"]) for p in broken["problems"]] == [(3, "content_edited")]


@pytest.mark.server
async def test_a_live_server_names_an_edited_and_rehashed_event_not_its_successor(
    live_server: LiveServer, db: Database
) -> None:
    admin = {"Authorization": f"Bearer {await mint_token(db, 'admin')}"}
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=10) as http:
        for i in range(3):
            created = await http.post(
                "/v1/tokens", json={"name": f"t{i}", "scopes": ["audit:read"]}, headers=admin
            )
            assert created.status_code == 201
        async with db.transaction() as session:
            event = (
                await session.execute(select(AuditEvent).where(AuditEvent.seq == 2))
            ).scalar_one()
            row = {c.key: getattr(event, c.key) for c in AuditEvent.__table__.columns}
            row["details"] = {"forged": True}
            forged_hash = audit.event_hash(
                row["prev_hash"], {**row, "occurred_at": audit._ts(row["occurred_at"])}
            )
            await session.execute(
                update(AuditEvent)
                .where(AuditEvent.seq == 2)
                .values(details={"forged": True}, hash=forged_hash)
            )
        report = (await http.get("/v1/audit/verify", headers=admin)).json()
    assert report["ok"] is False
    assert [(p["seq"], p["kind"]) for p in report["problems"]] == [(2, "content_edited")]
    assert report["problems"][0]["details"]["hash"] == forged_hash
