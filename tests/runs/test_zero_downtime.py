"""``benchmarks/zero_downtime.py`` end to end, small: a run of 200 seeded accounts' cohort on
PostgreSQL while the script validates and records usage against a real `keyshift serve`, then
its checks (``tests/migration/no_downtime.py``; that they can fail is tested in
``tests/migration/test_no_downtime.py``)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.support import IN_CI, PG_ADMIN_URL

ROOT = Path(__file__).resolve().parents[2]


def _postgres_reachable() -> None:
    async def probe() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        await conn.close()

    try:
        asyncio.run(probe())
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL unreachable at {PG_ADMIN_URL}: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.server
def test_a_run_under_load_has_no_error_no_mixed_answer_and_no_lost_usage(tmp_path: Path) -> None:
    _postgres_reachable()
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "zero_downtime.py"),
        *("--accounts", "200", "--baseline", "3", "--after", "3"),
        *("--validate-rate", "100", "--usage-rate", "20", "--batch-size", "20"),
        *("--pg-url", PG_ADMIN_URL, "--results", str(tmp_path)),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = done.stdout[-6000:] + done.stderr[-4000:]
    assert done.returncode == 0, output
    assert "all checks passed" in done.stdout

    (recorded,) = tmp_path.glob("zero-downtime-*.json")
    results = json.loads(recorded.read_text())["results"]
    assert results["passed"] is True
    assert results["errors"] == 0 and results["errors_by_kind"] == {}
    assert results["mixed_entitlements"] == 0
    assert results["stale_after_run"] == 0 and results["not_valid_after_run"] == 0
    assert (results["usage_units_lost"], results["usage_units_extra"]) == (0, 0)
    assert (results["usage_events_lost"], results["usage_events_unacknowledged"]) == (0, 0)
    # The load overlapped the run: accounts migrated, and pairs answered old, then new.
    run = results["run"]
    assert run["state"] == "completed" and run["migrated"] > 0, run
    assert results["answers"]["old"] > 0 and results["answers"]["new"] > 0
    assert results["answers"]["pairs_seen_both"] > 0
    assert results["validate_latency"]["during"]["count"] > 0
    assert results["usage_latency"]["during"]["count"] > 0
    assert results["usage_events_acknowledged"] > 0
