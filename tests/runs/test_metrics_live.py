"""Metrics with real processes on PostgreSQL: `keyshift serve --workers 2` and a `keyshift
worker --metrics-port` work a small run; the worker's own /metrics counts exactly the run's
accounts, the server's /metrics shows the queue draining and the run completing (read from the
database at scrape time), and the worker's samples never leak into the server's sums even when
it inherits the server's PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.migration.executor import RUN_STEPS
from keyshift.runs import service
from keyshift.runs.model import RunOptions
from keyshift.security.secrets_store import Secrets
from tests.api.test_operations import sample
from tests.runs.helpers import CREATOR, approved_run, cohort, run_row
from tests.support import cli_env, free_port

pytestmark = pytest.mark.server

ACCOUNTS = "keyshift_run_accounts_total"
OUTCOMES = ("migrated", "failed", "quarantined", "held", "rolled_back", "skipped")


def _spawn(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "keyshift.cli", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


async def _scrape(http: httpx.AsyncClient, url: str) -> str:
    response = await http.get(url)
    assert response.status_code == 200, response.text
    return response.text


async def _scrape_when_up(
    http: httpx.AsyncClient, url: str, process: subprocess.Popen[bytes], log: Path
) -> str:
    deadline = time.monotonic() + 60
    while True:
        try:
            return await _scrape(http, url)
        except httpx.TransportError:
            pass
        assert process.poll() is None, _tail(log)
        assert time.monotonic() < deadline, f"{url} never answered: {_tail(log)}"
        await asyncio.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
        raise


async def test_a_real_worker_and_server_count_exactly_the_runs_accounts(
    db: Database, secrets: Secrets, settings: Settings, tmp_path: Path
) -> None:
    if db.dialect != "postgresql":
        pytest.skip("separate worker processes share PostgreSQL (on SQLite: runs start --wait)")
    ids = await cohort(db, secrets, 3)
    run = await approved_run(db, options=RunOptions(batch_size=2))  # batches of 2, then 1
    await service.start(db, CREATOR, run.id)

    env = cli_env(settings)
    shared = tmp_path / "prom"
    shared.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(shared)  # the server's; the worker must not use it
    server_port, worker_port = free_port(), free_port()
    server_log, worker_log = tmp_path / "serve.log", tmp_path / "worker.log"
    server = _spawn(
        env, server_log, "serve", "--host", "127.0.0.1", "--port", str(server_port),
        "--workers", "2",
    )  # fmt: skip
    worker: subprocess.Popen[bytes] | None = None
    http = httpx.AsyncClient(timeout=5)
    try:
        server_metrics = f"http://127.0.0.1:{server_port}/metrics"
        queued = await _scrape_when_up(http, server_metrics, server, server_log)
        assert sample(queued, "keyshift_database_up") == 1
        assert sample(queued, "keyshift_run_state", run=run.id, state="running") == 1
        assert sample(queued, "keyshift_run_queue_depth", run=run.id, lane="default") == 3

        worker = _spawn(
            env, worker_log, "worker", "--run", run.id, "--poll", "0.1",
            "--metrics-port", str(worker_port),
        )  # fmt: skip
        worker_metrics = f"http://127.0.0.1:{worker_port}/metrics"
        await _scrape_when_up(http, worker_metrics, worker, worker_log)
        deadline = time.monotonic() + 120
        while (await run_row(db, run.id)).state != "completed":
            assert worker.poll() is None, _tail(worker_log)
            assert time.monotonic() < deadline, _tail(worker_log)
            await asyncio.sleep(0.2)

        mine = await _scrape(http, worker_metrics)
        assert sample(mine, ACCOUNTS, run=run.id, outcome="migrated") == len(ids)
        assert sum(sample(mine, ACCOUNTS, run=run.id, outcome=o) for o in OUTCOMES) == len(ids)
        for step in ("lock", *RUN_STEPS):
            accounts = sample(mine, "keyshift_migration_batch_accounts_sum", step=step)
            batches = sample(mine, "keyshift_migration_batch_accounts_count", step=step)
            timed = sample(mine, "keyshift_migration_step_duration_seconds_count", step=step)
            assert (accounts, batches, timed) == (len(ids), 2, 2), step
            assert sample(mine, "keyshift_migration_step_duration_seconds_sum", step=step) > 0

        # Whichever server process answers: the gauges are read from the database now, and
        # the worker's counters are not in the server's sums.
        for _ in range(4):
            done = await _scrape(http, server_metrics)
            assert sample(done, "keyshift_runs", state="completed") == 1
            assert sample(done, "keyshift_runs", state="running") == 0
            assert sample(done, "keyshift_run_queue_depth", run=run.id) == 0
            assert sample(done, "keyshift_run_leases", run=run.id, status="held") == 0
            assert sample(done, ACCOUNTS, run=run.id, outcome="migrated") == 0
            assert sample(done, "keyshift_migration_batch_accounts_count", step="receipt") == 0
        assert not list(shared.glob(f"*_{worker.pid}.db"))

        assert _stop(worker) == 0, _tail(worker_log)
        worker = None
    finally:
        await http.aclose()
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(timeout=5)
        _stop(server)
