"""Run and migration series on ``/metrics``, through the app on both databases: the gauges
read at scrape time (runs by state, queue depth by lane, leases held and expired, whether the
database answered) and the counters and histograms a worker moves (accounts by outcome, step
latency, batch sizes). The worker here runs in the test's process, so its samples are in the
registry the app renders; tests/runs/test_metrics_live.py does it with real processes."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from keyshift.api.app import create_app
from keyshift.api.state import AppState
from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.db.tables import Account, RunAccount
from keyshift.db.types import utcnow
from keyshift.migration.executor import RUN_STEPS, Executor
from keyshift.runs import service
from keyshift.runs.model import Priority, RunOptions
from keyshift.runs.worker import Worker
from keyshift.security.secrets_store import Secrets
from tests.api.test_operations import sample
from tests.runs.helpers import (
    CREATOR,
    approved_run,
    cohort,
    corrupt_an_archived_object,
    drive,
    run_row,
    states,
)
from tests.support import cli_env, free_port, invoke_keyshift, run_keyshift

ACCOUNTS = "keyshift_run_accounts_total"
STEP_COUNT = "keyshift_migration_step_duration_seconds_count"
BATCH_SUM = "keyshift_migration_batch_accounts_sum"
BATCH_COUNT = "keyshift_migration_batch_accounts_count"
OUTCOMES = ("migrated", "failed", "quarantined", "held", "rolled_back", "skipped", "prepared")
STEPS = ("lock", *RUN_STEPS)


async def _scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return response.text


def _counters(exposition: str, run_id: str) -> dict[str, float]:
    """Every worker-side number this test checks, to subtract a before from an after (the
    registry is the test process's: other tests moved it too, never for this run id, but the
    step series are shared)."""
    out = {o: sample(exposition, ACCOUNTS, run=run_id, outcome=o) for o in OUTCOMES}
    for step in STEPS:
        out[f"count:{step}"] = sample(exposition, STEP_COUNT, step=step)
        out[f"batches:{step}"] = sample(exposition, BATCH_COUNT, step=step)
        out[f"accounts:{step}"] = sample(exposition, BATCH_SUM, step=step)
    return out


def _moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


async def test_run_series_follow_a_run_from_queue_to_rollback(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    ids = await cohort(db, secrets, 4)
    await corrupt_an_archived_object(db, ids[0])  # fails every attempt: failed, quarantined
    async with db.transaction() as session:  # no priority attribute: the default lane
        await session.execute(update(Account).where(Account.id == ids[2]).values(attributes={}))
    options = RunOptions(
        max_attempts=2,
        failure_threshold=1,
        priority=Priority(attribute="tier", ids=[ids[1]]),
    )
    run = await approved_run(db, options=options)
    async with db.transaction() as session:  # plans differently from its report now: held
        await session.execute(
            update(Account).where(Account.id == ids[1]).values(status="suspended")
        )
    start = await _scrape(client)
    assert sample(start, "keyshift_database_up") == 1
    assert sample(start, "keyshift_runs", state="approved") == 1
    assert sample(start, "keyshift_runs", state="running") == 0
    assert sample(start, "keyshift_run_queue_depth", run=run.id) == 0  # not started: no queue
    before = _counters(start, run.id)

    await service.start(db, CREATOR, run.id)
    queued = await _scrape(client)
    assert sample(queued, "keyshift_runs", state="running") == 1
    assert sample(queued, "keyshift_runs", state="approved") == 0
    assert sample(queued, "keyshift_run_state", run=run.id, state="running") == 1
    lanes = {
        lane: sample(queued, "keyshift_run_queue_depth", run=run.id, lane=lane)
        for lane in ("listed", "attribute", "default")
    }
    assert lanes == {"listed": 1, "attribute": 2, "default": 1}

    executor = Executor(db, secrets.signing)
    worker = Worker(executor, CREATOR, poll_seconds=0.05)
    claim = await worker.claim(run_id=run.id)
    assert claim is not None and len(claim.accounts) == 4
    claimed = await _scrape(client)
    assert sample(claimed, "keyshift_run_queue_depth", run=run.id, lane="attribute") == 0
    assert sample(claimed, "keyshift_run_leases", run=run.id, status="held") == 4
    assert sample(claimed, "keyshift_run_leases", run=run.id, status="expired") == 0
    async with db.transaction() as session:  # as if its worker had died a minute ago
        await session.execute(
            update(RunAccount)
            .where(RunAccount.run_id == run.id)
            .values(lease_expires_at=utcnow() - timedelta(minutes=1))
        )
    lapsed = await _scrape(client)
    assert sample(lapsed, "keyshift_run_leases", run=run.id, status="expired") == 4
    assert sample(lapsed, "keyshift_run_leases", run=run.id, status="held") == 0

    await worker.work(claim)  # still its own batch: it settles them
    await drive(executor, run.id)  # the failed account again, alone: quarantined
    assert await states(db, run.id) == {
        ids[0]: "quarantined",
        ids[1]: "held",
        ids[2]: "migrated",
        ids[3]: "migrated",
    }
    done = await _scrape(client)
    settled = _counters(done, run.id)
    moved = _moved(before, settled)
    assert {k: v for k, v in moved.items() if k in OUTCOMES} == {
        "migrated": 2,
        "held": 1,
        "failed": 1,
        "quarantined": 1,
    }
    # The first batch locked all four (one refused: held); the two that passed prepare went
    # through cutover, verify and receipt together, in one batch each.
    assert moved["accounts:lock"] >= 4
    for step in ("cutover", "verify", "receipt"):
        assert moved[f"accounts:{step}"] == 2 and moved[f"batches:{step}"] == 1, moved
    for step in STEPS:  # one latency observation per batch size observation
        assert moved[f"count:{step}"] == moved[f"batches:{step}"] >= 1, (step, moved)
    assert sample(done, "keyshift_runs", state="completed") == 1
    assert sample(done, "keyshift_runs", state="running") == 0
    assert sample(done, "keyshift_run_state", run=run.id, state="running") == 0
    assert sample(done, "keyshift_run_leases", run=run.id, status="expired") == 0

    await service.rollback(db, CREATOR, run.id)
    rolling = await _scrape(client)
    assert sample(rolling, "keyshift_run_state", run=run.id, state="rolling_back") == 1
    # What the rollback still has to undo: the two migrated accounts, in their lanes.
    assert sample(rolling, "keyshift_run_queue_depth", run=run.id, lane="default") == 1
    assert sample(rolling, "keyshift_run_queue_depth", run=run.id, lane="attribute") == 1
    await drive(executor, run.id)
    assert (await run_row(db, run.id)).state == "rolled_back"
    back = await _scrape(client)
    assert _moved(settled, _counters(back, run.id)).get("rolled_back") == 2
    assert sample(back, "keyshift_runs", state="rolled_back") == 1
    assert sample(back, "keyshift_run_queue_depth", run=run.id) == 0


async def test_metrics_answer_with_database_up_0_when_the_database_is_unreachable(
    secrets: Secrets, secrets_dir: Path
) -> None:
    """A scrape during an outage still answers 200 — the request series and
    ``keyshift_database_up 0`` — so the alert on it can fire; no run gauge is invented."""
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing"
    db = Database(url)
    settings = Settings(database_url=url, secrets_dir=secrets_dir)
    state = AppState(settings=settings, db=db, secrets=secrets)
    transport = httpx.ASGITransport(app=create_app(state=state))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://keyshift.test") as c:
            response = await c.get("/metrics")
    finally:
        await db.dispose()
    assert response.status_code == 200
    assert sample(response.text, "keyshift_database_up") == 0
    assert "keyshift_runs{" not in response.text
    assert "keyshift_http_requests_total" in response.text


@pytest.mark.parametrize("port", ["0", "65536", "-1", "nine"])
def test_worker_refuses_a_metrics_port_out_of_range(port: str, settings: Settings) -> None:
    result = invoke_keyshift(cli_env(settings), "worker", "--metrics-port", port)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Invalid value for '--metrics-port'" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_refuses_a_metrics_port_in_use(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke_keyshift(cli_env(settings), "worker", "--metrics-port", str(port))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Invalid value for '--metrics-port'" in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_refuses_a_metrics_host_that_does_not_resolve(settings: Settings) -> None:
    result = invoke_keyshift(
        cli_env(settings), "worker", "--metrics-port", "9", "--metrics-host", "no-such-host.invalid"
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Invalid value for '--metrics-host'" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_run_completes_when_its_metrics_cannot_be_written(
    db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    """A process whose PROMETHEUS_MULTIPROC_DIR does not exist cannot write a sample: the run
    still completes (each failed sample logged once), never retried as a database error."""
    ids = await cohort(db, secrets, 3)
    run = await approved_run(db, options=RunOptions(batch_size=2))
    env = {**cli_env(settings), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")}

    done = run_keyshift(env, "runs", "start", run.id, "--wait")

    assert done.returncode == 0, done.stderr[-2000:]
    assert await states(db, run.id) == dict.fromkeys(ids, "migrated")
    assert done.stderr.count("metrics cannot be recorded (FileNotFoundError") == 1, done.stderr
    assert "retrying after a database error" not in done.stderr
