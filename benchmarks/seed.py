"""Benchmark ``keyshift simulate seed`` on PostgreSQL: synthetic accounts written per second
(generation, key encryption and ``COPY`` together), and the state checksum read back.

For each ``--accounts`` size, in a fresh database ``keyshift_seed_<pid>`` (dropped at the end):
migrate, seed (the example catalog published first, as the command does), then checksum every
account. Prints a table and writes ``results/seed-<UTC time>.json``.

    .venv/bin/python benchmarks/seed.py [--accounts 10000,100000] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
from harness import ROOT, Record, pg, progress


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark seeding synthetic accounts.")
    add = parser.add_argument
    add("--accounts", default="10000,100000", help="sizes to seed, comma-separated")
    add("--seed", type=int, default=1)
    add(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="an admin URL of the PostgreSQL server (the bench database is created beside it)",
    )
    add(
        "--no-checksum",
        action="store_true",
        help="skip the state checksum after each seed (at 1,000,000 accounts it takes longer"
        " than the seed)",
    )
    add("--no-record", action="store_true", help="print only; write no JSON result")
    add("--results", type=Path, default=harness.RESULTS, help="where the JSON result is written")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(size) for size in args.accounts.split(",")]
    except ValueError:
        parser.error("--accounts takes whole numbers, comma-separated")
    if any(not 1 <= size <= 10_000_000 for size in args.sizes):
        parser.error("each size must be in 1..10,000,000")
    return args


async def measure(url: str, accounts: int, seed_value: int, checksum: bool) -> dict[str, Any]:
    from keyshift.context import SYSTEM
    from keyshift.db.engine import Database
    from keyshift.db.migrate import upgrade_to_head
    from keyshift.security.secrets_store import ensure_secrets
    from keyshift.simulation.checksum import state_checksum
    from keyshift.simulation.seed import seed

    secrets, _ = ensure_secrets(Path(tempfile.mkdtemp(prefix="keyshift-seed-bench-")))
    db = Database(url)
    try:
        await upgrade_to_head(db.engine)
        summary = await seed(
            db,
            accounts=accounts,
            seed=seed_value,
            keyring=secrets.keyring,
            actor=SYSTEM,
            catalog_dir=ROOT / "examples" / "catalog",
            progress=lambda done: progress(f"  {done:,} accounts") if done % 50_000 == 0 else None,
        )
        started = time.perf_counter()
        digest = await state_checksum(db, at=summary.anchor) if checksum else None
        checksum_seconds = time.perf_counter() - started
    finally:
        await db.dispose()
    rows = sum(summary.rows.values())
    return {
        "accounts": accounts,
        "seconds": round(summary.seconds, 2),
        "accounts_per_s": round(summary.accounts_per_second),
        "rows": summary.rows,
        "rows_per_s": round(rows / summary.seconds),
        "checksum_seconds": round(checksum_seconds, 2) if checksum else None,
        "checksum_accounts_per_s": round(accounts / checksum_seconds) if checksum else None,
        "checksum": digest,
    }


def machine(admin_url: str) -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": pg(admin_url, "SHOW server_version"),
        "packages": harness.package_versions("sqlalchemy", "asyncpg", "cryptography"),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    record = Record(
        benchmark="seed",
        script="seed.py",
        argv=argv,
        parameters=harness.parameters(args, "sizes"),
        machine=machine(args.pg_url),
    )
    database = f"keyshift_seed_{os.getpid()}"
    _, driver = harness.database_urls(args.pg_url, database)
    for size in args.sizes:
        pg(args.pg_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        pg(args.pg_url, f'CREATE DATABASE "{database}"')
        try:
            progress(f"seeding {size:,} accounts")
            result = asyncio.run(measure(driver, size, args.seed, not args.no_checksum))
        finally:
            pg(args.pg_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        record.runs[str(size)] = result
        record.results[str(size)] = {
            k: result[k]
            for k in ("seconds", "accounts_per_s", "rows_per_s", "checksum_accounts_per_s")
        }
        progress(
            f"{size:,} accounts in {result['seconds']} s: {result['accounts_per_s']:,} accounts/s,"
            f" {result['rows_per_s']:,} rows/s; checksum {result['checksum_accounts_per_s'] or '—'}"
            " accounts/s"
        )
    print("\n| accounts | seconds | accounts/s | rows/s | checksum accounts/s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for size, r in record.runs.items():
        print(
            f"| {int(size):,} | {r['seconds']} | {r['accounts_per_s']:,} | {r['rows_per_s']:,}"
            f" | {r['checksum_accounts_per_s'] or '—'} |"
        )
    if not args.no_record:
        print(f"recorded {record.write(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
