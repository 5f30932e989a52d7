"""/v1/runs over the ASGI client and against a real server process: the lifecycle, the
accounts page with its ledger, scopes and four eyes, and bad input that changes nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from keyshift.api.state import AppState
from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.migration.executor import Executor
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers
from tests.runs.helpers import cohort, drive
from tests.support import LiveServer, mint_token


def _body(**extra: Any) -> dict[str, Any]:
    return {"rules": helpers.RULES, **extra}


async def _token(db: Database, *scopes: str, name: str = "test") -> dict[str, str]:
    return {"Authorization": f"Bearer {await mint_token(db, *scopes, name=name)}"}


async def test_the_lifecycle_over_http(
    client: httpx.AsyncClient, db: Database, secrets: Secrets, app_state: AppState
) -> None:
    ids = await cohort(db, secrets, 3)
    runner = await _token(db, "migrations:run", name="runner")
    approver = await _token(db, "migrations:approve", name="approver")

    made = await client.post(
        "/v1/runs",
        json=_body(cohort={"ids": ids[:2]}, options={"canary": 1}),
        headers=runner,
    )
    assert made.status_code == 201, made.text
    run = made.json()
    assert run["state"] == "draft" and run["total"] == 2
    assert run["created_at"].endswith("Z")
    assert run["progress"]["waves"] == {"0": {"pending": 1}, "1": {"pending": 1}}
    run_id = run["id"]

    assert (await client.get(f"/v1/runs/{run_id}/report", headers=runner)).status_code == 404
    assert (await client.post(f"/v1/runs/{run_id}/start", headers=runner)).status_code == 409
    reported = await client.post(f"/v1/runs/{run_id}/report", headers=runner)
    assert reported.json()["state"] == "reported"
    report = (await client.get(f"/v1/runs/{run_id}/report", headers=runner)).json()
    assert report["outcomes"] == {"migrate": 2}
    assert report["risks"]["activations_trimmed"]["count"] == 2
    # Approving needs migrations:approve, which the runner's token lacks.
    assert (await client.post(f"/v1/runs/{run_id}/approve", headers=runner)).status_code == 403
    approved = await client.post(f"/v1/runs/{run_id}/approve", headers=approver)
    assert approved.json()["approved_by"].startswith("token:")
    started = await client.post(f"/v1/runs/{run_id}/start", headers=runner)
    assert started.json()["state"] == "running"

    await drive(app_state.executor, run_id)

    detail = (await client.get(f"/v1/runs/{run_id}", headers=runner)).json()
    assert detail["state"] == "completed"
    assert detail["progress"]["by_state"] == {"migrated": 2}
    page = (await client.get(f"/v1/runs/{run_id}/accounts?limit=1", headers=runner)).json()
    assert len(page["accounts"]) == 1 and page["next_after"] == 0
    first = page["accounts"][0]
    assert [s["step"] for s in first["ledger"]] == [
        "lock",
        "snapshot",
        "prepare",
        "cutover",
        "verify",
        "receipt",
    ]
    rest = await client.get(f"/v1/runs/{run_id}/accounts?after=0", headers=runner)
    assert len(rest.json()["accounts"]) == 1 and rest.json()["next_after"] is None
    listed = (await client.get("/v1/runs", headers=runner)).json()
    assert [r["id"] for r in listed] == [run_id]
    # A completed run is not paused.
    paused = await client.post(f"/v1/runs/{run_id}/pause", headers=runner)
    assert paused.status_code == 409
    assert paused.json()["error"]["code"] == "wrong_run_state"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_body(cohort={"plans": ["ghost@1"]}), "cohort.plans"),
        (_body(cohort={"ids": ["a", "a"]}), "cohort.ids"),
        (_body(cohort={"sample": {"count": 0}}), "cohort.sample.count"),
        (_body(options={"batch_size": 0}), "options.batch_size"),
        (
            _body(options={"window": {"start": "01:00", "end": "05:00", "timezone": "X/Y"}}),
            "options.window.timezone",
        ),
        (_body(options={"unknown": 1}), "options.unknown"),
        ({"rules": "not toml ["}, "rules"),
    ],
)
async def test_bad_input_is_a_422_naming_the_field_and_writes_nothing(
    client: httpx.AsyncClient, db: Database, secrets: Secrets, body: dict[str, Any], field: str
) -> None:
    await cohort(db, secrets, 1)
    headers = await _token(db, "migrations:run")
    response = await client.post("/v1/runs", json=body, headers=headers)
    assert response.status_code == 422, response.text
    assert field in response.text
    assert (await client.get("/v1/runs", headers=headers)).json() == []


async def test_four_eyes_over_http(db: Database, secrets: Secrets, settings: Settings) -> None:
    from keyshift.api.app import create_app

    await cohort(db, secrets, 1)
    state = AppState(
        settings=settings.model_copy(update={"runs_four_eyes": True}), db=db, secrets=secrets
    )
    transport = httpx.ASGITransport(app=create_app(state=state))
    one = await _token(db, "admin", name="one-person")
    other = await _token(db, "migrations:approve", name="another-person")
    async with httpx.AsyncClient(transport=transport, base_url="http://keyshift.test") as client:
        run_id = (await client.post("/v1/runs", json=_body(), headers=one)).json()["id"]
        await client.post(f"/v1/runs/{run_id}/report", headers=one)
        refused = await client.post(f"/v1/runs/{run_id}/approve", headers=one)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "four_eyes"
        assert (await client.get(f"/v1/runs/{run_id}", headers=one)).json()["state"] == "reported"
        approved = await client.post(f"/v1/runs/{run_id}/approve", headers=other)
        assert approved.status_code == 200 and approved.json()["state"] == "approved"


async def test_a_run_against_a_real_server_and_worker(
    live_server: LiveServer, db: Database, secrets: Secrets
) -> None:
    ids = await cohort(db, secrets, 2)
    headers = await _token(db, "admin")
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=60) as http:
        run_id = (await http.post("/v1/runs", json=_body(), headers=headers)).json()["id"]
        for move in ("report", "approve", "start"):
            response = await http.post(f"/v1/runs/{run_id}/{move}", headers=headers)
            assert response.status_code == 200, response.text
        await drive(Executor(db, secrets.signing), run_id)
        detail = (await http.get(f"/v1/runs/{run_id}", headers=headers)).json()
    assert detail["state"] == "completed"
    assert detail["progress"]["by_state"] == {"migrated": len(ids)}
