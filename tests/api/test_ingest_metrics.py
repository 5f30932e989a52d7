"""Usage ingest and activation series on ``/metrics``, through the app on both databases:
events counted by result (recorded, replayed, refused) with the request's time, activations by
result (created, existing, refused)."""

from __future__ import annotations

import httpx

from keyshift.db.engine import Database
from keyshift.security.secrets_store import Secrets
from tests.api.test_operations import sample
from tests.metering.helpers import HYBRID, metered_license

EVENTS = "keyshift_usage_events_total"
INGEST = "keyshift_usage_ingest_duration_seconds_count"
ACTIVATIONS = "keyshift_activations_total"


def _numbers(exposition: str) -> dict[str, float]:
    out = {r: sample(exposition, EVENTS, result=r) for r in ("recorded", "replayed", "refused")}
    out |= {f"{k}-requests": sample(exposition, INGEST, kind=k) for k in ("single", "batch")}
    out |= {
        f"activation-{r}": sample(exposition, ACTIVATIONS, result=r)
        for r in ("created", "existing", "refused")
    }
    return out


async def _numbers_now(client: httpx.AsyncClient) -> dict[str, float]:
    return _numbers((await client.get("/metrics")).text)


async def test_usage_events_and_activations_are_counted_by_result(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    _, _, key = await metered_license(db, secrets, HYBRID)  # 2 machines, exports: 10, block
    before = await _numbers_now(client)

    event = {"key": key, "meter": "exports", "quantity": 1, "idempotency_key": "m-1"}
    assert (await client.post("/v1/usage", json=event)).status_code == 200
    assert (await client.post("/v1/usage", json=event)).status_code == 200  # a replay
    batch = {
        "key": key,
        "events": [
            {"meter": "exports", "quantity": 2, "idempotency_key": "m-2"},
            {"meter": "exports", "quantity": 3, "idempotency_key": "m-3"},
            {"meter": "exports", "quantity": 1, "idempotency_key": "m-1"},  # a replay
        ],
    }
    assert (await client.post("/v1/usage/batch", json=batch)).status_code == 200
    over = {**batch, "events": [{"meter": "exports", "quantity": 50, "idempotency_key": "m-4"}]}
    refused = await client.post("/v1/usage/batch", json=over)  # over a blocking quota
    assert refused.status_code == 409, refused.text

    activate = {"key": key, "fingerprint": "machine-1"}
    assert (await client.post("/v1/licenses/activate", json=activate)).status_code == 201
    assert (await client.post("/v1/licenses/activate", json=activate)).status_code == 200
    second = {**activate, "fingerprint": "machine-2"}
    assert (await client.post("/v1/licenses/activate", json=second)).status_code == 201
    third = {**activate, "fingerprint": "machine-3"}
    assert (await client.post("/v1/licenses/activate", json=third)).status_code == 409

    after = await _numbers_now(client)
    moved = {k: after[k] - before[k] for k in after}
    assert moved == {
        "recorded": 3,
        "replayed": 2,
        "refused": 1,
        "single-requests": 2,
        "batch-requests": 2,
        "activation-created": 2,
        "activation-existing": 1,
        "activation-refused": 1,
    }
