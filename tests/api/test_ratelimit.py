"""The per-address token bucket and its 429."""

from __future__ import annotations

import httpx

from keyshift.api.app import create_app
from keyshift.api.ratelimit import TokenBucket
from keyshift.api.state import AppState


def test_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("a", now=0.0) == 0.5
    assert bucket.take("b", now=0.0) == 0.0  # another address has its own bucket
    assert bucket.take("a", now=0.5) == 0.0
    assert bucket.take("a", now=0.5) > 0


def test_a_flood_of_new_keys_does_not_reset_a_limited_one() -> None:
    bucket = TokenBucket(rate=0.01, burst=2, max_keys=100)
    assert bucket.take("target", now=0.0) == 0.0
    assert bucket.take("target", now=0.0) == 0.0
    for i in range(1_000):  # new keys, while the target keeps trying
        bucket.take(f"flood-{i}", now=i / 1_000)
        if i % 10 == 0:
            assert bucket.take("target", now=i / 1_000) > 0, i
    assert len(bucket._buckets) <= 100


def test_bucket_memory_is_bounded() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, max_keys=10)
    for i in range(100):
        bucket.take(f"k{i}", now=float(i))
    assert len(bucket._buckets) <= 10


async def test_client_endpoints_over_the_limit_answer_429_with_retry_after(
    app_state: AppState,
) -> None:
    app_state.client_bucket = TokenBucket(0.1, 2)
    app = create_app(state=app_state)
    body = {"key": "AAAAA-AAAAA-AAAAA-AAAAA-AAAAA"}  # malformed is fine: the limit comes first
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://keyshift.test"
    ) as c:
        first = [(await c.post("/v1/licenses/validate", json=body)).status_code for _ in range(2)]
        refused = await c.post("/v1/licenses/validate", json=body)
        other = await c.post("/v1/licenses/activate", json={**body, "fingerprint": "m1"})
    assert 429 not in first
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert refused.headers["retry-after"] == "10"
    # The same address shares one bucket across the client endpoints.
    assert other.status_code == 429


def test_limit_is_off_unless_configured(app_state: AppState) -> None:
    assert app_state.client_bucket is None
