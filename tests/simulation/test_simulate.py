"""`keyshift simulate`: a whole run rehearsed on synthetic accounts, as a real process — seeded,
reported, approved, rolled out by real workers (in-process on SQLite, `keyshift worker`
processes on PostgreSQL), every account verified, and a checksum of the outcome that is the
same for the same seed however many workers moved the accounts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select

from keyshift.db.engine import Database
from keyshift.db.tables import Subscription
from keyshift.simulation.checksum import outcome_checksum, outcome_view
from tests.support import PG_ADMIN_URL, create_pg_database, drop_pg_database, free_port
from tests.support import run_keyshift as _run_keyshift

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "examples" / "migrations" / "pro-2023-to-2025.toml"
#: Now, to the second: the runs migrate at about the anchored instant, as a rehearsal does.
AT = datetime.now(UTC).replace(microsecond=0)
N = "60"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One secrets dir for every rehearsal here: license keys' lookup hashes are keyed."""
    home = tmp_path_factory.mktemp("simulate-home")
    return {**os.environ, "KEYSHIFT_HOME": str(home), "KEYSHIFT_SECRETS_DIR": str(home / "s")}


def simulate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return _run_keyshift(
        env,
        "simulate", "--accounts", N, "--rules", str(RULES), "--at", f"{AT:%Y-%m-%dT%H:%M:%S}",
        "--batch-size", "5", *args,
        cwd=ROOT, timeout=300,
    )  # fmt: skip


def outcome(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    found: dict[str, Any] = json.loads(done.stdout)
    return found


@pytest.fixture(scope="module")
def sqlite_seed_3(env: dict[str, str]) -> Iterator[dict[str, Any]]:
    found = outcome(simulate(env, "--seed", "3", "--json", "--keep"))
    yield found
    shutil.rmtree(Path(found["scratch"]).parent)


def test_a_sqlite_rehearsal_completes_and_verifies_every_account(
    sqlite_seed_3: dict[str, Any],
) -> None:
    found = sqlite_seed_3
    assert found["ok"] is True and found["state"] == "completed"
    assert found["database"] == "sqlite" and found["workers"] == 1
    by_state = found["by_state"]
    assert by_state["migrated"] >= 10
    assert set(by_state) <= {"migrated", "skipped", "scheduled"}
    assert found["processed"] == found["total"] == sum(by_state.values())
    # Every account checked: the migrated ones against their plans, the rest unchanged.
    verified = found["verified"]
    assert verified["problems"] == {}
    assert verified["migrated"] == by_state["migrated"]
    assert verified["migrated"] + verified["unchanged"] == int(N)
    assert found["accounts_per_second"] > 0
    assert re.fullmatch(r"[0-9a-f]{64}", found["checksum"])
    assert found["checksum"] != found["seeded_checksum"]


def test_the_printed_checksum_is_the_kept_databases_outcome(sqlite_seed_3: dict[str, Any]) -> None:
    """--keep leaves the scratch file: its outcome checksum is the one printed, and the run's
    migrated accounts are on the target plan while the skipped ones stayed on the source."""
    path = sqlite_seed_3["scratch"]
    assert Path(path).is_file()

    async def read() -> tuple[str, dict[str, int]]:
        db = Database(f"sqlite+aiosqlite:///{path}")
        try:
            async with db.transaction() as session:
                rows = await session.execute(
                    select(Subscription.plan_key, Subscription.plan_version, func.count())
                    .where(Subscription.plan_key == "pro-seat")
                    .group_by(Subscription.plan_key, Subscription.plan_version)
                )
                plans = {f"{k}@{v}": n for k, v, n in rows}
            return await outcome_checksum(db, at=AT), plans
        finally:
            await db.dispose()

    checksum, plans = asyncio.run(read())
    assert checksum == sqlite_seed_3["checksum"]
    by_state = sqlite_seed_3["by_state"]
    assert plans.get("pro-seat@2023", 0) == by_state.get("skipped", 0) + by_state.get(
        "scheduled", 0
    )
    assert plans["pro-seat@2025"] >= by_state["migrated"]


def test_another_seed_gives_another_checksum(
    env: dict[str, str], sqlite_seed_3: dict[str, Any]
) -> None:
    other = outcome(simulate(env, "--seed", "4", "--json"))
    assert other["state"] == "completed" and other["ok"] is True
    assert other["seeded_checksum"] != sqlite_seed_3["seeded_checksum"]
    assert other["checksum"] != sqlite_seed_3["checksum"]
    assert not Path(other["scratch"]).exists()  # no --keep: the temporary file is gone


def test_the_text_output_names_throughput_failures_and_checksum(env: dict[str, str]) -> None:
    done = simulate(env, "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert re.search(r"completed: \d+ of \d+ accounts in [\d.]+ s = [\d.]+ accounts/s", done.stdout)
    assert "failures: 0 quarantined, 0 held" in done.stdout
    assert "approved by simulate:approver" in done.stdout
    assert re.search(r"verified: \d+ migrated accounts .* 0 differ", done.stdout)
    assert re.search(r"checksum sha256 [0-9a-f]{64}\n", done.stdout)


def test_postgresql_gives_the_same_checksum_whatever_the_workers(
    env: dict[str, str], sqlite_seed_3: dict[str, Any]
) -> None:
    """Seed 3 with 1 and 2 worker processes: the same outcome, and the same checksum as on
    SQLite; each scratch database is dropped at the end."""
    server = PG_ADMIN_URL.rsplit("/", 1)[0] + "/postgres"
    asyncio.run(_reachable())
    one = outcome(simulate(env, "--seed", "3", "--json", "--database-url", server))
    two = outcome(
        simulate(env, "--seed", "3", "--json", "--database-url", server, "--workers", "2")
    )
    assert one["database"] == two["database"] == "postgresql"
    assert (one["workers"], two["workers"]) == (1, 2)
    assert one["ok"] is two["ok"] is True
    assert one["seeded_checksum"] == two["seeded_checksum"] == sqlite_seed_3["seeded_checksum"]
    assert one["by_state"] == two["by_state"] == sqlite_seed_3["by_state"]
    assert one["checksum"] == two["checksum"] == sqlite_seed_3["checksum"]
    assert one["scratch"] != two["scratch"]
    assert asyncio.run(_databases_named(one["scratch"], two["scratch"])) == []


async def _reachable() -> None:
    name, _ = await create_pg_database()  # skips (or fails in CI) without PostgreSQL
    await drop_pg_database(name)


async def _databases_named(*names: str) -> list[str]:
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname = ANY($1)", names)
        return [r["datname"] for r in rows]
    finally:
        await conn.close()


def test_the_outcome_view_ignores_archive_ids_and_the_graces_clock_reading() -> None:
    """Two runs to the same outcome differ in an archive copy's id (from the migration's
    random id) and in the second a grace ends at; a different outcome still differs."""

    def state(copy_id: str, until: str, tier: str = "archive") -> dict[str, Any]:
        grace = {"until": until, "entitlements": {"features": {}, "quotas": {"storage_gb": 500}}}
        return {
            "account": {"id": "a"},
            "subscription": {"plan": "p@1", "overrides": {"grace": grace}},
            "activations": [],
            "objects": [
                {"id": "o1", "name": "x", "tier": "standard", "state": "superseded"},
                {"id": copy_id, "name": "x", "tier": tier, "state": "active"},
            ],
            "taken_at": until,
        }

    anchor = datetime(2026, 11, 30, 12, tzinfo=UTC)
    first = outcome_view(state("c-1", "2026-12-30T12:00:03Z"), anchor)
    again = outcome_view(state("c-2", "2026-12-30T12:01:40Z"), anchor)
    assert first == again
    assert first["subscription"]["overrides"]["grace"]["until_days"] == 30
    later = outcome_view(state("c-2", "2026-12-31T12:00:03Z"), anchor)
    assert later != first  # a grace a day longer is another outcome
    unarchived = outcome_view(state("c-1", "2026-12-30T12:00:03Z", "standard"), anchor)
    assert unarchived != first


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--accounts", "5", "--rules", "no-such-rules.toml"], "no-such-rules.toml"),
        (["--accounts", "0", "--rules", str(RULES)], "--accounts"),
        (["--accounts", "-4", "--rules", str(RULES)], "--accounts"),
        (["--accounts", "5"], "--rules"),
        (["--accounts", "5", "--rules", str(RULES), "--workers", "0"], "--workers"),
        (["--accounts", "5", "--rules", str(RULES), "--workers", "2"], "PostgreSQL"),
        (["--accounts", "5", "--rules", str(RULES), "--database-url", "mysql://h/d"], "PostgreSQL"),
        (["--accounts", "5", "--rules", str(RULES), "--batch-size", "0"], "--batch-size"),
    ],
    ids=[
        "unknown-rules",
        "zero-accounts",
        "negative-accounts",
        "no-rules",
        "zero-workers",
        "workers-on-sqlite",
        "not-postgresql",
        "zero-batch",
    ],
)
def test_bad_input_is_one_line_and_exit_2(env: dict[str, str], args: list[str], says: str) -> None:
    done = _run_keyshift(env, "simulate", *args, cwd=ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert says in done.stderr
    assert done.stdout == ""


def test_an_unreachable_server_is_one_line_and_exit_6(env: dict[str, str]) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    done = _run_keyshift(
        env, "simulate", "--accounts", "5", "--rules", str(RULES), "--database-url", url, cwd=ROOT
    )
    assert done.returncode == 6, done.stdout + done.stderr
    assert done.stderr.startswith("error: cannot create a scratch database on postgresql://")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_simulate_seed_still_only_seeds(env: dict[str, str], tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'seed.db'}"
    done = _run_keyshift(
        env, "simulate", "seed", "--accounts", "5", "--seed", "8", "--database-url", url, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "seeded 5 accounts (seed 8" in done.stdout and "run " not in done.stdout
