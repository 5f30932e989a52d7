"""Rate limits per license key and per token, and the anomaly flags: a key presented from many
machines, a burst of migration requests. In process, and one run against a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from keyshift.api.app import create_app
from keyshift.api.ratelimit import TokenBucket
from keyshift.api.state import AppState
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent
from keyshift.licensing import activations
from keyshift.security.abuse import (
    AbuseSettings,
    AnomalyDetector,
    CountInWindow,
    DistinctInWindow,
)
from keyshift.security.secrets_store import Secrets
from keyshift.validation import cache
from tests import factories
from tests.api.test_operations import sample
from tests.support import LiveServer, mint_token

VALIDATE = "/v1/licenses/validate"


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    cache.default_cache.clear()


async def _client(state: AppState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(state=state))
    async with httpx.AsyncClient(transport=transport, base_url="http://keyshift.test") as c:
        yield c


async def _keys(db: Database, secrets: Secrets, count: int = 2) -> list[str]:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)
    keys = []
    for _ in range(count):
        _, key = await factories.issue_license(db, secrets, account.id)
        keys.append(key)
    return keys


async def _anomalies(db: Database, action: str) -> list[AuditEvent]:
    async with db.transaction() as session:
        rows = await session.execute(select(AuditEvent).where(AuditEvent.action == action))
        return list(rows.scalars())


# -- the window counters ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_distinct_values_flag_once_per_window_then_again_in_the_next() -> None:
    clock = Clock()
    seen = DistinctInWindow(60, clock=clock)
    assert [seen.observe("k", f"m{i}", 3) for i in range(3)] == [None, None, None]
    assert seen.observe("k", "m0", 3) is None  # a repeat is not a new machine
    assert seen.observe("k", "m3", 3) == 4  # the fourth distinct machine passes the limit
    assert seen.observe("k", "m4", 3) is None  # flagged once in this window
    assert seen.observe("other", "m0", 3) is None  # keys are counted apart
    clock.now = 61
    assert [seen.observe("k", f"n{i}", 3) for i in range(4)] == [None, None, None, 4]


def test_distinct_values_memory_is_bounded() -> None:
    clock = Clock()
    seen = DistinctInWindow(60, max_subjects=100, clock=clock)
    for i in range(1_000):
        clock.now = i / 100
        seen.observe(f"k{i}", "m", 3)
    assert len(seen._seen) <= 100


def test_counts_flag_when_passing_the_limit_once_per_window() -> None:
    clock = Clock()
    counts = CountInWindow(60, clock=clock)
    assert [counts.observe("t", 2) for _ in range(5)] == [None, None, 3, None, None]
    clock.now = 60
    assert [counts.observe("t", 2) for _ in range(3)] == [None, None, 3]


def test_fingerprint_limit_scales_with_the_seat_cap() -> None:
    settings = AbuseSettings(fingerprints_min=10, fingerprints_per_seat=3)
    assert settings.fingerprint_limit(1) == 10
    assert settings.fingerprint_limit(25) == 75


def test_bad_thresholds_in_the_environment_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from keyshift.errors import ConfigurationError

    monkeypatch.setenv("KEYSHIFT_ANOMALY_FINGERPRINTS_MIN", "lots")
    with pytest.raises(ConfigurationError, match="KEYSHIFT_ANOMALY_FINGERPRINTS_MIN"):
        AbuseSettings.from_env()


# -- rate limits -----------------------------------------------------------------------------


async def test_key_limit_refuses_one_key_on_every_key_endpoint_and_not_others(
    app_state: AppState, db: Database, secrets: Secrets
) -> None:
    key, other = await _keys(db, secrets)
    app_state.key_bucket = TokenBucket(0.1, 2)
    async for c in _client(app_state):
        before = (await c.get("/metrics")).text
        ok = [(await c.post(VALIDATE, json={"key": key})).status_code for _ in range(2)]
        refused = await c.post(VALIDATE, json={"key": key})
        activate = await c.post("/v1/licenses/activate", json={"key": key, "fingerprint": "m1"})
        usage = await c.post(
            "/v1/usage",
            json={"key": key, "meter": "sync", "quantity": 1, "idempotency_key": "u1"},
        )
        others = await c.post(VALIDATE, json={"key": other})
        after = (await c.get("/metrics")).text
    assert ok == [200, 200]
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limited" and error["details"] == {"limit": "key"}
    assert refused.headers["retry-after"] == "10"
    assert activate.status_code == 429 and usage.status_code == 429
    assert others.status_code == 200
    name = "keyshift_rate_limited_total"
    assert sample(after, name, limit="key") - sample(before, name, limit="key") == 3


async def test_a_malformed_key_is_refused_as_input_not_counted(app_state: AppState) -> None:
    app_state.key_bucket = TokenBucket(0.1, 1)
    async for c in _client(app_state):
        answers = [
            (await c.post(VALIDATE, json={"key": "not-a-key"})).status_code for _ in range(3)
        ]
    assert answers == [422, 422, 422]


async def test_the_address_limit_comes_before_the_body_is_read(app_state: AppState) -> None:
    app_state.client_bucket = TokenBucket(0.1, 1)
    junk = {"content": b"{not json", "headers": {"content-type": "application/json"}}
    async for c in _client(app_state):
        first = await c.post(VALIDATE, **junk)
        second = await c.post(VALIDATE, **junk)
    assert first.status_code == 422
    assert second.status_code == 429
    assert second.json()["error"]["details"] == {"limit": "address"}


async def test_token_limit_refuses_one_token_and_not_another(
    app_state: AppState, db: Database
) -> None:
    busy = {"Authorization": f"Bearer {await mint_token(db, 'admin', name='busy')}"}
    calm = {"Authorization": f"Bearer {await mint_token(db, 'admin', name='calm')}"}
    app_state.token_bucket = TokenBucket(0.1, 2)
    async for c in _client(app_state):
        ok = [(await c.get("/v1/accounts", headers=busy)).status_code for _ in range(2)]
        refused = await c.get("/v1/accounts", headers=busy)
        usage = await c.get("/v1/accounts/nope/usage", headers=busy)
        other = await c.get("/v1/accounts", headers=calm)
    assert ok == [200, 200]
    assert refused.status_code == 429
    assert refused.json()["error"]["details"] == {"limit": "token"}
    assert usage.status_code == 429  # every token-authenticated route shares the bucket
    assert other.status_code == 200


# -- anomalies -------------------------------------------------------------------------------


async def test_one_key_on_many_machines_is_flagged_once(
    app_state: AppState, db: Database, secrets: Secrets
) -> None:
    (key,) = await _keys(db, secrets, 1)
    async with db.transaction() as session:
        await activations.activate(session, SYSTEM, secrets.keyring, key, "m0")
    # seat-node caps activations at 3: the limit is max(3, 1 * 3) = 3 machines per window.
    app_state.anomalies = AnomalyDetector(
        db, AbuseSettings(fingerprints_min=3, fingerprints_per_seat=1)
    )
    async for c in _client(app_state):
        before = (await c.get("/metrics")).text
        codes = []
        for i in range(3):
            body = (await c.post(VALIDATE, json={"key": key, "fingerprint": f"m{i}"})).json()
            codes.append(body["code"])
        await app_state.anomalies.drain()
        assert await _anomalies(db, "anomaly.key_many_fingerprints") == []
        for i in range(3, 6):  # the fourth machine trips it; the fifth and sixth add nothing
            response = await c.post(VALIDATE, json={"key": key, "fingerprint": f"m{i}"})
            assert response.status_code == 200  # flagged, never refused
        await app_state.anomalies.drain()
        after = (await c.get("/metrics")).text
    assert codes == ["VALID", "FINGERPRINT_MISMATCH", "FINGERPRINT_MISMATCH"]
    (event,) = await _anomalies(db, "anomaly.key_many_fingerprints")
    assert event.target_type == "license"
    assert event.actor == "system:anomaly-detector"
    assert event.request_id  # the request that tripped it
    details: dict[str, Any] = event.details
    assert details["distinct_fingerprints"] == 4 and details["limit"] == 3
    assert details["max_activations"] == 3
    name = "keyshift_anomalies_total"
    kind = "key_many_fingerprints"
    assert sample(after, name, kind=kind) - sample(before, name, kind=kind) == 1


async def test_keys_without_a_seat_cap_are_not_watched(
    app_state: AppState, db: Database, secrets: Secrets
) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db, factories.USAGE)
    _, key = await factories.issue_license(db, secrets, account.id)
    app_state.anomalies = AnomalyDetector(
        db, AbuseSettings(fingerprints_min=1, fingerprints_per_seat=1)
    )
    async for c in _client(app_state):
        for i in range(5):
            assert (await c.post(VALIDATE, json={"key": key, "fingerprint": f"m{i}"})).is_success
    await app_state.anomalies.drain()
    assert await _anomalies(db, "anomaly.key_many_fingerprints") == []


async def test_a_burst_of_migration_requests_is_flagged(app_state: AppState, db: Database) -> None:
    token = await mint_token(db, "migrations:run", name="runner")
    headers = {"Authorization": f"Bearer {token}"}
    app_state.anomalies = AnomalyDetector(db, AbuseSettings(migrations_per_window=2))
    async for c in _client(app_state):
        for _ in range(4):
            response = await c.post("/v1/rules/validate", json={"rules": "x = 1"}, headers=headers)
            assert response.status_code == 422  # answered as usual
    await app_state.anomalies.drain()
    (event,) = await _anomalies(db, "anomaly.migration_burst")
    assert event.target_type == "token" and event.target_id.startswith("token:")
    assert event.details["requests"] == 3 and event.details["limit"] == 2


# -- a real server ---------------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.server_env(
    KEYSHIFT_KEY_RATE_PER_SECOND="0.05",
    KEYSHIFT_KEY_RATE_BURST="4",
    KEYSHIFT_ANOMALY_FINGERPRINTS_MIN="2",
    KEYSHIFT_ANOMALY_FINGERPRINTS_PER_SEAT="1",
)
async def test_live_server_limits_a_key_and_flags_its_machines(
    live_server: LiveServer, db: Database, secrets: Secrets
) -> None:
    key, other = await _keys(db, secrets)
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=10) as c:
        answers = [
            (await c.post(VALIDATE, json={"key": key, "fingerprint": "m0"})).status_code
            for _ in range(5)
        ]
        for i in range(4):
            assert (await c.post(VALIDATE, json={"key": other, "fingerprint": f"m{i}"})).is_success
    assert answers == [200, 200, 200, 200, 429]
    # The other key was presented by four machines (the limit is max(2, 1 * 3 seats) = 3):
    # one event, written by the server process in the background.
    for _ in range(50):
        events = await _anomalies(db, "anomaly.key_many_fingerprints")
        if events:
            break
        await asyncio.sleep(0.1)
    assert len(events) == 1


async def test_fleets_above_the_watch_limit_are_not_tracked(db: Database) -> None:
    detector = AnomalyDetector(db, AbuseSettings(fingerprints_min=10, fingerprints_per_seat=3))
    for i in range(50):  # 5,000 seats: a limit of 15,000 machines, above what is watched
        detector.key_presented("lookup", f"m{i}", 5_000, license_id="l", account_id="a")
    assert detector.fingerprints._seen == {}
    detector.key_presented("small", "m0", 3, license_id="l", account_id="a")
    assert list(detector.fingerprints._seen) == ["small"]
