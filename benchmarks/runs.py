"""Benchmark a migration run on PostgreSQL: accounts migrated per second with K worker
processes, beside ``pgbench -N`` transactions per second on the same database in the same run.

For each worker count, in a fresh database ``keyshift_runs_<pid>`` (dropped at the end): migrate,
seed ``--accounts`` synthetic accounts (``keyshift.simulation``), create a run of the example
rules ``pro-2023-to-2025`` over every account on ``pro-seat@2023``, report, approve, start, and
time K `keyshift worker --until-idle` processes until the run completes. Prints a table and
writes ``results/runs-<UTC time>.json``.

    .venv/bin/python benchmarks/runs.py [--accounts 2000] [--workers 1,2] [--batch-size 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
from harness import ROOT, Record, pg, progress

RULES = ROOT / "examples" / "migrations" / "pro-2023-to-2025.toml"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark a migration run with workers.")
    add = parser.add_argument
    add("--accounts", type=int, default=2000, help="synthetic accounts to seed")
    add("--workers", default="1,2", help="worker counts to try, comma-separated")
    add("--batch-size", type=int, default=100)
    add("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    add("--no-record", action="store_true", help="print only; write no JSON result")
    add("--profile", type=Path, help="run each worker under py-spy; collapsed stacks to DIR")
    add("--results", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    try:
        args.worker_counts = [int(n) for n in args.workers.split(",")]
    except ValueError:
        parser.error("--workers takes whole numbers, comma-separated")
    if not 1 <= args.accounts <= 1_000_000 or any(not 1 <= n <= 16 for n in args.worker_counts):
        parser.error("--accounts in 1..1,000,000 and each worker count in 1..16")
    return args


async def prepare(url: str, secrets_dir: Path, accounts: int, batch_size: int) -> tuple[str, int]:
    """Seed, create, report, approve and start a run; returns its id and size."""
    from keyshift.context import SYSTEM, Actor
    from keyshift.db.engine import Database
    from keyshift.db.migrate import upgrade_to_head
    from keyshift.migration.loader import load_rules
    from keyshift.runs import service
    from keyshift.runs.model import Cohort, RunOptions
    from keyshift.security.secrets_store import ensure_secrets
    from keyshift.simulation.seed import seed

    secrets, _ = ensure_secrets(secrets_dir)
    db = Database(url)
    try:
        await upgrade_to_head(db.engine)
        await seed(
            db,
            accounts=accounts,
            seed=1,
            keyring=secrets.keyring,
            actor=SYSTEM,
            catalog_dir=ROOT / "examples" / "catalog",
        )
        rules, _ = load_rules(RULES)
        run = await service.create(
            db, SYSTEM, rules, Cohort(), RunOptions(batch_size=batch_size, failure_threshold=1)
        )
        started = time.perf_counter()
        await service.report(db, SYSTEM, run.id)
        report_seconds = time.perf_counter() - started
        progress(f"  report of {run.total} accounts: {report_seconds:.1f} s")
        await service.approve(db, Actor(id="bench-approver", scopes=frozenset({"admin"})), run.id)
        await service.start(db, SYSTEM, run.id)
        return run.id, run.total
    finally:
        await db.dispose()


async def outcome(url: str, run_id: str) -> dict[str, Any]:
    from keyshift.db.engine import Database
    from keyshift.db.types import utcnow
    from keyshift.runs import service

    db = Database(url)
    try:
        async with db.transaction() as session:
            run = await service.get(session, run_id)
            numbers = await service.progress(session, run, utcnow())
        return {"state": run.state, "by_state": numbers.by_state}
    finally:
        await db.dispose()


def measure(
    admin_url: str, accounts: int, workers: int, batch_size: int, profile: Path | None = None
) -> dict[str, Any]:
    name = f"keyshift_runs_{os.getpid()}_{workers}"
    _, url = harness.database_urls(admin_url, name)
    pg(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    pg(admin_url, f'CREATE DATABASE "{name}"')
    secrets_dir = Path(tempfile.mkdtemp(prefix="keyshift-runs-bench-"))
    try:
        run_id, total = asyncio.run(prepare(url, secrets_dir, accounts, batch_size))
        env = {
            **os.environ,
            "KEYSHIFT_DATABASE_URL": url,
            "KEYSHIFT_SECRETS_DIR": str(secrets_dir),
        }
        command = [sys.executable, "-m", "keyshift.cli", "worker", "--until-idle", "--poll", "0.2"]
        commands = [command] * workers
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            spy = [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw"]
            commands = [
                [*spy, "-o", str(profile / f"worker-{workers}-{i}.txt"), "--", *command]
                for i in range(workers)
            ]
        started = time.perf_counter()
        processes = [subprocess.Popen(c, env=env, stderr=subprocess.DEVNULL) for c in commands]
        for process in processes:
            process.wait(timeout=3600)
        seconds = time.perf_counter() - started
        result = asyncio.run(outcome(url, run_id))
        migrated = result["by_state"].get("migrated", 0)
        return {
            "workers": workers,
            "accounts_in_run": total,
            "migrated": migrated,
            "seconds": round(seconds, 2),
            "accounts_per_s": round(migrated / seconds, 1) if seconds else None,
            "final": result,
        }
    finally:
        pg(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    rows = []
    for workers in args.worker_counts:
        progress(f"{workers} worker(s), {args.accounts} accounts seeded")
        rows.append(measure(args.pg_url, args.accounts, workers, args.batch_size, args.profile))
        progress(f"  {rows[-1]}")
    for row in rows:
        print(
            f"{row['workers']} worker(s): {row['migrated']} of {row['accounts_in_run']} accounts"
            f" in {row['seconds']} s = {row['accounts_per_s']} accounts/s"
        )
    if not args.no_record:
        record = Record(
            benchmark="runs",
            script="runs.py",
            argv=argv,
            parameters=harness.parameters(args, "worker_counts"),
            machine={
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "postgresql": pg(args.pg_url, "SHOW server_version"),
                "load_average_before": [round(x, 2) for x in os.getloadavg()],
            },
            results={str(r["workers"]): r["accounts_per_s"] for r in rows},
            runs={"rows": rows},
        )
        progress(f"wrote {record.write(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
