"""`keyshift serve` as a real process: health, readiness, metrics and request ids over TCP,
and metrics summed across several worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from keyshift.config import Settings
from keyshift.security.secrets_store import Secrets
from tests.api.test_operations import sample
from tests.support import LiveServer, cli_env, free_port

pytestmark = pytest.mark.server

REQUESTS = "keyshift_http_requests_total"


def test_live_server_health_ready_metrics_and_request_id(live_server: LiveServer) -> None:
    base = live_server.base_url
    health = httpx.get(f"{base}/healthz", timeout=5)
    assert health.status_code == 200 and health.headers["x-request-id"]
    assert "server" not in health.headers
    ready = httpx.get(f"{base}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert (
        httpx.get(f"{base}/healthz", headers={"x-request-id": "live-1"}, timeout=5).headers[
            "x-request-id"
        ]
        == "live-1"
    )
    assert httpx.get(f"{base}/v1/tokens", timeout=5).status_code == 401

    exposition = httpx.get(f"{base}/metrics", timeout=5).text
    # The fixture's own start-up polls hit /healthz too, so at least our two.
    assert sample(exposition, REQUESTS, route="/healthz", method="GET", status="200") >= 2
    assert sample(exposition, REQUESTS, route="/readyz", method="GET", status="200") == 1
    assert sample(exposition, REQUESTS, route="/v1/tokens", method="GET", status="401") == 1
    assert "keyshift_http_request_duration_seconds_bucket" in exposition


def _pids_with_samples(directory: Path) -> set[str]:
    return {p.stem.rsplit("_", 1)[-1] for p in directory.glob("counter_*.db")}


def _logged_metrics_dir(log_path: Path) -> Path | None:
    for line in log_path.read_text().splitlines():
        if '"metrics multiprocess dir: ' in line:
            return Path(json.loads(line)["message"].split(": ", 1)[1])
    return None


@pytest.mark.parametrize("dir_from", ["operator", "serve"])
def test_metrics_are_summed_across_worker_processes(
    settings: Settings, secrets: Secrets, tmp_path: Path, dir_from: str
) -> None:
    env = cli_env(settings)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if dir_from == "operator":
        metrics_dir: Path | None = tmp_path / "prom"
        metrics_dir.mkdir()
        # A file left by a previous run must not be read (it would not even parse).
        (metrics_dir / "counter_999999.db").write_bytes(b"stale garbage")
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keyshift.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "2",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        logged_dir = _logged_metrics_dir(log_path)
        if dir_from == "operator":
            assert logged_dir == metrics_dir
            assert not (metrics_dir / "counter_999999.db").exists()
        metrics_dir = logged_dir
        assert metrics_dir is not None and metrics_dir.is_dir(), log_path.read_text()[-2000:]

        def hit(_: int) -> int:
            # A new connection each time, so the kernel may hand it to either worker.
            return httpx.get(f"{base}/healthz", timeout=5).status_code

        sent = 0
        with ThreadPoolExecutor(8) as pool:
            for _ in range(20):  # bounded: at most 20 x 16 requests
                assert all(status == 200 for status in pool.map(hit, range(16)))
                sent += 16
                if len(_pids_with_samples(metrics_dir)) >= 2:
                    break
        assert len(_pids_with_samples(metrics_dir)) >= 2, "one worker served every request"

        # Whichever worker answers the scrape, it reports every worker's requests.
        for _ in range(6):
            exposition = httpx.get(f"{base}/metrics", timeout=5).text
            total = sample(exposition, REQUESTS, route="/healthz", method="GET", status="200")
            assert total == sent
        logged = log_path.read_text()
        assert '"logger":"keyshift.server"' in logged
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    assert process.returncode is not None
    # A directory `serve` made for itself goes away with it; an operator's stays.
    assert metrics_dir.exists() == (dir_from == "operator")
