"""Traces from real processes: `keyshift serve` and `keyshift worker` with
``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at a loopback OTLP/HTTP receiver send their spans
there — a request's span with its migration steps and its statements beneath, a run's batches
with their steps — and a server with the SDK disabled sends none."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.migration.executor import PHASES
from keyshift.runs import service
from keyshift.runs.model import RunOptions
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers
from tests.observability.otlp import ReceivedSpan, receiving
from tests.runs.helpers import CREATOR, approved_run, cohort, states
from tests.support import cli_env, mint_token, serving

pytestmark = pytest.mark.server

#: A served migration: its lock step alone (the answer is the migration it locked), then the
#: executor's phases (``PHASES``: steps that share a transaction share a span).
STEPS = ["migration.lock", *["migration." + "+".join(phase) for phase in PHASES]]
#: A worker's batch: its lock step takes on the first phase.
WORKED = [
    "migration." + "+".join(("lock", *PHASES[0])),
    *["migration." + "+".join(phase) for phase in PHASES[1:]],
]


def _traced_env(settings: Settings, endpoint: str) -> dict[str, str]:
    env = cli_env(settings)
    env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
    env.pop("OTEL_SDK_DISABLED", None)
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    env["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # milliseconds: the batch goes out quickly
    return env


async def test_a_served_migration_sends_its_request_steps_and_statements(
    db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    token = await mint_token(db, "admin")
    with receiving() as (receiver, endpoint):
        env = _traced_env(settings, endpoint)
        with serving(env, tmp_path / "serve.log") as server:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
                assert (await http.get("/healthz")).status_code == 200
                response = await http.post(
                    "/v1/migrations",
                    json={"rules": helpers.RULES, "account_id": account_id},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert response.status_code == 201, response.text
                migration_id = response.json()["id"]
                validated = await http.post(
                    f"/v1/licenses/validate?key={keys[0][1]}", json={"key": keys[0][1]}
                )
                assert validated.status_code == 422  # the query parameter is refused

            def complete(spans: list[ReceivedSpan]) -> bool:
                names = {s.name for s in spans}
                return "migration.verify+receipt" in names and "POST /v1/licenses/validate" in names

            spans = receiver.wait_for(complete)

    assert {s.service for s in spans} == {"keyshift"}
    (request,) = [s for s in spans if s.name == "POST /v1/migrations"]
    assert request.attributes.get("http.status_code") == 201
    steps = [s for s in spans if s.name.startswith("migration.")]
    assert sorted(s.name for s in steps) == sorted(STEPS)
    for step in steps:
        assert step.trace_id == request.trace_id
        assert step.parent_span_id  # under the request's span
        assert step.attributes["keyshift.account.id"] == account_id
        assert step.attributes["keyshift.migration.id"] == migration_id
    statements = [s for s in spans if "db.system" in s.attributes]
    assert statements, [s.name for s in spans]
    expected = "postgresql" if db.dialect == "postgresql" else "sqlite"
    assert {s.attributes["db.system"] for s in statements} == {expected}
    step_ids = {s.span_id for s in steps}
    assert any(s.parent_span_id in step_ids for s in statements)  # a step's own statements
    assert not [s for s in spans if "healthz" in s.name]
    for span in spans:  # the key sent in the query string is in no span
        assert keys[0][1] not in repr(span.attributes), span.name


async def test_a_worker_process_sends_each_batch_and_its_steps(
    db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    if db.dialect != "postgresql":
        pytest.skip("separate worker processes share PostgreSQL (on SQLite: runs start --wait)")
    ids = await cohort(db, secrets, 3)
    run = await approved_run(db, options=RunOptions(batch_size=2))
    await service.start(db, CREATOR, run.id)
    with receiving() as (receiver, endpoint):
        env = _traced_env(settings, endpoint)
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            worker = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "keyshift.cli", "worker", "--run", run.id, "--until-idle",
                env=env, stdout=subprocess.DEVNULL, stderr=out,
            )  # fmt: skip
            try:
                code = await asyncio.wait_for(worker.wait(), 120)
            finally:
                if worker.returncode is None:
                    worker.kill()
                    await worker.wait()
        assert code == 0, log.read_text()[-3000:]
        # The process has exited: its last spans were sent on the way out.
        spans = receiver.wait_for(lambda s: sum(x.name == "run.settle" for x in s) == 2, 5)
    assert await states(db, run.id) == dict.fromkeys(ids, "migrated")

    assert {s.service for s in spans} == {"keyshift-worker"}
    batches = [s for s in spans if s.name == "run.batch"]
    assert sorted(s.attributes["keyshift.accounts"] for s in batches) == [1, 2]
    assert sorted(a for s in batches for a in s.attributes["keyshift.account_ids"]) == sorted(ids)
    for batch in batches:
        assert batch.attributes["keyshift.run.id"] == run.id
        children = [s for s in spans if s.parent_span_id == batch.span_id]
        ours = [s for s in children if s.name.startswith(("migration.", "run."))]
        assert sorted(s.name for s in ours) == sorted([*WORKED, "run.settle"])
        for step in ours:
            assert step.attributes["keyshift.batch.id"] == batch.attributes["keyshift.batch.id"]
            assert step.attributes["keyshift.account_ids"] == batch.attributes[
                "keyshift.account_ids"
            ] or sorted(step.attributes["keyshift.account_ids"]) == sorted(
                batch.attributes["keyshift.account_ids"]
            )
        settle = next(s for s in ours if s.name == "run.settle")
        assert set(settle.attributes["keyshift.outcomes"]) == {"migrated"}


async def test_a_server_with_the_sdk_disabled_sends_nothing(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    token = await mint_token(db, "admin")
    with receiving() as (receiver, endpoint):
        env = _traced_env(settings, endpoint)
        env["OTEL_SDK_DISABLED"] = "true"  # the endpoint is set, but tracing is off
        with serving(env, tmp_path / "serve.log") as server:
            async with httpx.AsyncClient(timeout=10) as http:
                response = await http.get(
                    f"{server.base_url}/v1/accounts", headers={"Authorization": f"Bearer {token}"}
                )
            assert response.status_code == 200
            await asyncio.sleep(0.5)  # five export intervals
        assert receiver.requests == 0
