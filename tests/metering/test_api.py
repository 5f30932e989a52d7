"""The usage API through the real app: recording with a key or a token, replays, the 4xx of
bad input, batches, reading counters, validation's meter state and QUOTA_EXCEEDED, one run
against a live server and one through the CLI."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from keyshift.api.app import create_app
from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.db.tables import UsageCounter, UsageEvent
from keyshift.db.types import utcnow
from keyshift.errors import ConfigurationError
from keyshift.security.secrets_store import Secrets
from keyshift.validation import cache
from tests.metering.helpers import HYBRID, metered_license, used
from tests.support import LiveServer, cli_env, mint_token, run_keyshift

USAGE = "/v1/usage"
BATCH = "/v1/usage/batch"
VALIDATE = "/v1/licenses/validate"


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    cache.default_cache.clear()


async def _bearer(db: Database, *scopes: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {await mint_token(db, *scopes)}"}


async def _rows(db: Database, table: type) -> int:
    async with db.transaction() as session:
        return int((await session.execute(select(func.count()).select_from(table))).scalar_one())


async def test_client_records_with_its_key_and_replays_are_flagged(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    account, license_id, key = await metered_license(db, secrets)
    body = {"key": key, "meter": "calls", "quantity": 3, "idempotency_key": "e-1"}
    first = await client.post(USAGE, json=body)
    assert first.status_code == 200, first.text
    assert first.headers["idempotent-replayed"] == "false"
    view = first.json()
    assert view["license_id"] == license_id and view["account_id"] == account
    assert (view["used"], view["included"], view["remaining"]) == (3, 100, 97)
    again = await client.post(USAGE, json=body)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert {**again.json(), "replayed": False} == view
    changed = await client.post(USAGE, json={**body, "quantity": 4})
    assert changed.status_code == 409
    assert changed.json()["error"]["code"] == "idempotency_conflict"
    assert await used(db, account, "calls") == 3


async def test_service_records_for_an_account_with_a_scoped_token(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    account, _, _ = await metered_license(db, secrets)
    body = {"account_id": account, "meter": "jobs", "quantity": 2, "idempotency_key": "s-1"}
    assert (await client.post(USAGE, json=body)).status_code == 401
    wrong = await client.post(USAGE, json=body, headers=await _bearer(db, "licenses:write"))
    assert wrong.status_code == 403
    ok = await client.post(USAGE, json=body, headers=await _bearer(db, "usage:write"))
    assert ok.status_code == 200, ok.text
    assert ok.json()["license_id"] is None and ok.json()["used"] == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"quantity": -1}, "quantity"),
        ({"quantity": "5"}, "quantity"),
        ({"quantity": 1.5}, "quantity"),
        ({"quantity": True}, "quantity"),
        ({"quantity": 10**13}, "quantity"),
        ({"meter": "no_such_meter"}, "meter"),
        ({"meter": "Bad Name"}, "meter"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"timestamp": "2026-01-01T00:00:00"}, "timestamp"),  # no timezone
        ({"timestamp": "future"}, "timestamp"),
        ({"timestamp": "past"}, "timestamp"),
        ({"surprise": 1}, "surprise"),
        ({"account_id": "x"}, "body"),  # both key and account_id
    ],
)
async def test_bad_input_is_a_422_naming_the_field_and_writes_nothing(
    client: httpx.AsyncClient, db: Database, secrets: Secrets, change: dict[str, Any], field: str
) -> None:
    _, _, key = await metered_license(db, secrets)
    now = utcnow()
    if change.get("timestamp") == "future":
        change = {"timestamp": (now + timedelta(hours=1)).isoformat()}
    elif change.get("timestamp") == "past":
        change = {"timestamp": (now - timedelta(days=120)).isoformat()}
    body = {"key": key, "meter": "calls", "quantity": 1, "idempotency_key": "k", **change}
    response = await client.post(USAGE, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert await _rows(db, UsageEvent) == 0 and await _rows(db, UsageCounter) == 0


async def test_unknown_key_and_quota_refusals(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    from keyshift.licensing import keys

    _, _, key = await metered_license(db, secrets)
    unknown = await client.post(
        USAGE,
        json={"key": keys.generate(), "meter": "calls", "quantity": 1, "idempotency_key": "k"},
    )
    assert unknown.status_code == 404
    body = {"key": key, "meter": "jobs", "quantity": 26, "idempotency_key": "big"}
    refused = await client.post(USAGE, json=body)
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded" and error["details"]["remaining"] == 25


async def test_batch_records_all_or_nothing_and_refuses_oversize(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    account, _, key = await metered_license(db, secrets)
    events = [{"meter": "calls", "quantity": 1, "idempotency_key": f"b{i}"} for i in range(5)]
    ok = await client.post(BATCH, json={"key": key, "events": events})
    assert ok.status_code == 200, ok.text
    assert ok.json()["count"] == 5 and [r["used"] for r in ok.json()["results"]] == [1, 2, 3, 4, 5]
    replay = await client.post(BATCH, json={"key": key, "events": events})
    assert all(r["replayed"] for r in replay.json()["results"])
    over_quota = [{"meter": "jobs", "quantity": 10, "idempotency_key": f"j{i}"} for i in range(3)]
    refused = await client.post(BATCH, json={"key": key, "events": over_quota})
    assert refused.status_code == 409 and refused.json()["error"]["details"]["index"] == 2
    bad = [*events, {"meter": "calls", "quantity": -1, "idempotency_key": "neg"}]
    invalid = await client.post(BATCH, json={"key": key, "events": bad})
    assert invalid.status_code == 422 and invalid.json()["error"]["field"] == "events.5.quantity"
    huge = [{"meter": "calls", "quantity": 1, "idempotency_key": str(i)} for i in range(1001)]
    too_many = await client.post(BATCH, json={"key": key, "events": huge})
    assert too_many.status_code in (413, 422)
    assert await used(db, account, "calls") == 5 and await used(db, account, "jobs") == 0


async def test_reading_usage_needs_a_read_scope_and_shows_counters_and_history(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    account, _, key = await metered_license(db, secrets)
    for i in range(3):
        await client.post(
            USAGE, json={"key": key, "meter": "calls", "quantity": 2, "idempotency_key": f"r{i}"}
        )
    url = f"/v1/accounts/{account}/usage"
    assert (await client.get(url)).status_code == 401
    assert (await client.get(url, headers=await _bearer(db, "usage:write"))).status_code == 403
    for scope in ("accounts:read", "licenses:read"):
        response = await client.get(url, headers=await _bearer(db, scope))
        assert response.status_code == 200, response.text
    calls = response.json()["meters"]["calls"]
    assert (calls["used"], calls["included"], calls["remaining"]) == (6, 100, 94)
    assert len(calls["history"]) == 3 and calls["history"][0]["quantity"] == 2
    assert response.json()["meters"]["sync"]["throttle"] is True
    previous = await client.get(
        url, params={"period": "previous"}, headers=await _bearer(db, "admin")
    )
    assert previous.json()["meters"]["calls"]["used"] == 0
    bad = await client.get(url, params={"period": "yesterday"}, headers=await _bearer(db, "admin"))
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "period"
    missing = await client.get("/v1/accounts/nope/usage", headers=await _bearer(db, "admin"))
    assert missing.status_code == 404


async def test_validation_reports_meters_and_refuses_an_exhausted_block_meter(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    _, _, key = await metered_license(db, secrets)
    fresh = (await client.post(VALIDATE, json={"key": key, "meter": "jobs"})).json()
    assert fresh["code"] == "VALID"
    assert (
        fresh["meters"]["jobs"]["remaining"] == 25 and fresh["meters"]["jobs"]["overage"] == "block"
    )
    assert set(fresh["meters"]) == {"calls", "jobs", "devices", "peak"}
    await client.post(
        USAGE, json={"key": key, "meter": "jobs", "quantity": 25, "idempotency_key": "all"}
    )
    await client.post(
        USAGE, json={"key": key, "meter": "calls", "quantity": 500, "idempotency_key": "c"}
    )
    spent = (await client.post(VALIDATE, json={"key": key, "meter": "jobs"})).json()
    assert spent["code"] == "QUOTA_EXCEEDED" and spent["valid"] is False
    assert spent["meters"]["jobs"]["used"] == 25 and spent["meters"]["jobs"]["remaining"] == 0
    # an over-used allow meter stays valid (overage is flagged, not refused)
    allowed = (await client.post(VALIDATE, json={"key": key, "meter": "calls"})).json()
    assert allowed["code"] == "VALID" and allowed["meters"]["calls"]["over"] is True
    # no meter asked: the license as a whole is valid
    assert (await client.post(VALIDATE, json={"key": key})).json()["code"] == "VALID"
    unknown = (await client.post(VALIDATE, json={"key": key, "meter": "nope"})).json()
    assert unknown["code"] == "FEATURE_NOT_ENTITLED"
    # precedence: an activation problem comes first
    fingerprinted = (
        await client.post(VALIDATE, json={"key": key, "meter": "jobs", "fingerprint": "m"})
    ).json()
    assert fingerprinted["code"] == "QUOTA_EXCEEDED"  # usage plan: no cap, fingerprint ignored


async def test_throttled_feature_answers_with_time_until_reset(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    _, _, key = await metered_license(db, secrets, HYBRID)
    body = (await client.post(VALIDATE, json={"key": key, "feature": "sync"})).json()
    throttle = body["throttle"]
    assert body["code"] == "VALID"
    assert (throttle["limit"], throttle["period"], throttle["remaining"]) == (100, "day", 100)
    assert throttle["resets_at"] > body["server_time"]
    assert body["meters"]["exports"]["included"] == 10
    await client.post(
        USAGE, json={"key": key, "meter": "sync", "quantity": 100, "idempotency_key": "s"}
    )
    spent = (await client.post(VALIDATE, json={"key": key, "feature": "sync"})).json()
    assert spent["code"] == "QUOTA_EXCEEDED" and spent["throttle"]["remaining"] == 0
    assert (await client.post(VALIDATE, json={"key": key, "feature": "export"})).json()[
        "throttle"
    ] is None


@pytest.mark.server
async def test_usage_over_http_against_a_live_server(
    live_server: LiveServer, db: Database, secrets: Secrets
) -> None:
    account, _, key = await metered_license(db, secrets)
    base = live_server.base_url
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        body = {"key": key, "meter": "jobs", "quantity": 4, "idempotency_key": "live-1"}
        first = await http.post(USAGE, json=body)
        again = await http.post(USAGE, json=body)
        assert first.status_code == again.status_code == 200, first.text
        assert again.headers["idempotent-replayed"] == "true"
        check = await http.post(VALIDATE, json={"key": key, "meter": "jobs"})
        assert json.loads(check.content)["meters"]["jobs"]["used"] == 4
    assert await used(db, account, "jobs") == 4


async def test_usage_from_the_command_line(
    settings: Settings, db: Database, secrets: Secrets
) -> None:
    account, _, key = await metered_license(db, secrets)
    env = cli_env(settings)
    args = ["usage", "record", "--meter", "jobs", "--quantity", "5", "--idempotency-key", "cli-1"]
    first = run_keyshift(env, *args, "--key", key)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["used"] == 5
    again = run_keyshift(env, *args, "--key", key)
    assert json.loads(again.stdout)["replayed"] is True
    changed = run_keyshift(env, *args[:-1], "cli-1", "--account", account, "--quantity", "6")
    assert changed.returncode == 5 and "different request body" in changed.stderr
    unknown = run_keyshift(
        env, "usage", "record", "--meter", "zzz", "--idempotency-key", "x", "--account", account
    )
    assert unknown.returncode == 2 and "[meter]" in unknown.stderr
    shown = run_keyshift(env, "usage", "show", account)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["meters"]["jobs"]["used"] == 5


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "1e99"])
def test_a_bad_usage_window_setting_fails_at_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # The factory as `keyshift serve`'s workers call it: the settings come from the environment
    # (an app given its state uses that state's settings and reads no environment).
    monkeypatch.setenv("KEYSHIFT_USAGE_LATE_HOURS", value)
    with pytest.raises(ConfigurationError, match="KEYSHIFT_USAGE_LATE_HOURS"):
        create_app()


def test_the_idempotency_window_cannot_be_set_below_48_hours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYSHIFT_IDEMPOTENCY_WINDOW_HOURS", "1")
    with pytest.raises(ConfigurationError, match="KEYSHIFT_IDEMPOTENCY_WINDOW_HOURS"):
        create_app()
