"""Where a worker's time goes, per account: CPU by phase, PostgreSQL's CPU, garbage collection
and statements — measured in CPU time, so it means something on a busy machine too.

For each repeat, in a fresh database ``keyshift_wcpu_<pid>`` (dropped at the end): seed
``--accounts`` synthetic accounts and start a run of ``pro-2023-to-2025`` over the ones on
``pro-seat@2023`` (``runs.prepare``, in a child process, so the worker's heap holds only what a
worker holds), then run ONE ``Worker`` in this process until the run is done, with:

- ``time.process_time`` around each phase's call (``Executor.request_many`` — the lock phase,
  with the snapshot and prepare steps it takes on — and ``Executor._batch_step`` for the
  others); "other" is the rest of the worker (claim, settle, the run's checks);
- the CPU time of the PostgreSQL backends serving this database (their ``/proc`` times, read
  before and after);
- ``gc.callbacks``: collections per generation and the wall time they took;
- SQLAlchemy's ``before_cursor_execute``: statements per account, by phase.

``--collector tuned`` sets the collector up as ``keyshift worker`` does
(``runs.worker.tune_collector``); ``default`` leaves Python's defaults; ``both`` alternates
them, repeat by repeat, so both see the same machine.

    .venv/bin/python benchmarks/worker_cpu.py [--accounts 5000] [--batch-size 200]
        [--collector tuned|default|both] [--repeats 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import psutil
from harness import Record, pg, progress


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CPU per account of one worker, by phase.")
    add = parser.add_argument
    add("--accounts", type=int, default=5000, help="synthetic accounts to seed")
    add("--batch-size", type=int, default=200)
    add("--collector", choices=("tuned", "default", "both"), default="both")
    add("--repeats", type=int, default=1, help="runs of each collector setting")
    add("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    add("--no-record", action="store_true", help="do not write results/worker-cpu-*.json")
    add("--results", type=Path, default=harness.RESULTS)
    add("--seed-only", nargs=2, metavar=("URL", "SECRETS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.accounts < 1 or args.batch_size < 1 or args.repeats < 1:
        parser.error("--accounts, --batch-size and --repeats must be at least 1")
    return args


def backend_cpu(database: str) -> float:
    """CPU seconds of the PostgreSQL backends connected to ``database`` now."""
    total = 0.0
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if line.startswith("postgres:") and f" {database} " in f" {line} ":
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
    return total


async def measure(
    url: str, database: str, secrets_dir: Path, run_id: str, tuned: bool
) -> dict[str, Any]:
    from sqlalchemy import event

    from keyshift.context import SYSTEM
    from keyshift.db.engine import Database
    from keyshift.migration import executor as ex
    from keyshift.runs import worker as worker_module
    from keyshift.security.secrets_store import ensure_secrets

    Worker = worker_module.Worker

    cpu: collections.Counter[str] = collections.Counter()
    statements: collections.Counter[str] = collections.Counter()
    phase = {"now": "other"}
    step_call, lock_call = ex.Executor._batch_step, ex.Executor.request_many

    async def timed_step(self: Any, actor: Any, ids: Any, steps: Any) -> Any:
        name = str(steps) if isinstance(steps, str) else "+".join(map(str, steps))
        phase["now"], started = name, time.process_time()
        try:
            return await step_call(self, actor, ids, steps)
        finally:
            cpu[name] += time.process_time() - started
            phase["now"] = "other"

    async def timed_lock(self: Any, *args: Any, **kwargs: Any) -> Any:
        name = "lock+snapshot+prepare" if kwargs.get("through") else "lock"
        phase["now"], started = name, time.process_time()
        try:
            return await lock_call(self, *args, **kwargs)
        finally:
            cpu[name] += time.process_time() - started
            phase["now"] = "other"

    ex.Executor._batch_step = timed_step  # type: ignore[method-assign]
    ex.Executor.request_many = timed_lock  # type: ignore[method-assign]
    collections_by_generation: collections.Counter[str] = collections.Counter()
    gc_started: list[float] = []

    def on_gc(stage: str, info: dict[str, Any]) -> None:
        if stage == "start":
            gc_started.append(time.perf_counter())
        elif gc_started:
            generation = info["generation"]
            collections_by_generation[f"gen{generation}"] += 1
            collections_by_generation[f"gen{generation}_s"] += (
                time.perf_counter() - gc_started.pop()
            )

    secrets, _ = ensure_secrets(secrets_dir)
    db = Database(url)
    try:

        @event.listens_for(db.engine.sync_engine, "before_cursor_execute")
        def count(*_: Any) -> None:
            statements[phase["now"]] += 1

        worker = Worker(ex.Executor(db, secrets.signing), SYSTEM, poll_seconds=0.1)
        if tuned:  # an older src/ (PYTHONPATH) may not have it: then only --collector default
            worker_module.tune_collector()
        gc.callbacks.append(on_gc)
        pg_before, cpu_before, wall_before = (
            backend_cpu(database),
            time.process_time(),
            time.perf_counter(),
        )
        accounts = await worker.run(run_id=run_id, until_idle=True)
        wall = time.perf_counter() - wall_before
        worker_cpu = time.process_time() - cpu_before
        pg_cpu = backend_cpu(database) - pg_before
    finally:
        gc.callbacks.remove(on_gc) if on_gc in gc.callbacks else None
        ex.Executor._batch_step, ex.Executor.request_many = step_call, lock_call  # type: ignore[method-assign]
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)
        await db.dispose()
    cpu["other"] = worker_cpu - sum(cpu.values())
    per = 1e6 / max(accounts, 1)
    return {
        "collector": "tuned" if tuned else "default",
        "accounts": accounts,
        "wall_s": round(wall, 2),
        "accounts_per_s": round(accounts / wall, 1),
        "worker_cpu_us_per_account": round(worker_cpu * per),
        "postgres_cpu_us_per_account": round(pg_cpu * per),
        "phase_cpu_us_per_account": {p: round(cpu[p] * per) for p in cpu},
        "statements_per_account": {
            p: round(n / max(accounts, 1), 3) for p, n in statements.items()
        },
        "gc": {
            f"gen{g}": {
                "collections": collections_by_generation[f"gen{g}"],
                "wall_us_per_account": round(collections_by_generation[f"gen{g}_s"] * per),
            }
            for g in (0, 1, 2)
        },
    }


def one(args: argparse.Namespace, tuned: bool, index: int) -> dict[str, Any]:
    database = f"keyshift_wcpu_{os.getpid()}_{index}"
    _, url = harness.database_urls(args.pg_url, database)
    pg(args.pg_url, f'CREATE DATABASE "{database}"')
    try:
        with tempfile.TemporaryDirectory() as secrets_dir:
            seeded = subprocess.run(
                [sys.executable, __file__, "--accounts", str(args.accounts), "--batch-size",
                 str(args.batch_size), "--seed-only", url, secrets_dir],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            run_id = seeded.stdout.split()[-1]
            progress(f"  {'tuned' if tuned else 'default'} collector, run {run_id}")
            return asyncio.run(measure(url, database, Path(secrets_dir), run_id, tuned))
    finally:
        pg(args.pg_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str, sub: str | None = None) -> float:
        return statistics.median(r[key][sub] if sub else r[key] for r in runs)

    return {
        "runs": len(runs),
        "worker_cpu_us_per_account": median("worker_cpu_us_per_account"),
        "postgres_cpu_us_per_account": median("postgres_cpu_us_per_account"),
        "phase_cpu_us_per_account": {
            p: median("phase_cpu_us_per_account", p) for p in runs[0]["phase_cpu_us_per_account"]
        },
        "spread_worker_cpu": harness.spread(r["worker_cpu_us_per_account"] for r in runs),
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.seed_only:
        import runs as bench

        url, secrets = args.seed_only
        run_id, _ = asyncio.run(bench.prepare(url, Path(secrets), args.accounts, args.batch_size))
        print(run_id)
        return 0
    settings = {"tuned": [True], "default": [False], "both": [True, False]}[args.collector]
    runs: dict[str, list[dict[str, Any]]] = {"tuned": [], "default": []}
    for index in range(args.repeats):
        for tuned in settings:
            result = one(args, tuned, index)
            runs[result["collector"]].append(result)
            progress(f"  {result}")
    results = {name: summary(found) for name, found in runs.items() if found}
    print()
    print("| µs per account | " + " | ".join(results) + " |")
    print("| --- | " + " | ".join("---:" for _ in results) + " |")
    phases = list(dict.fromkeys(p for r in results.values() for p in r["phase_cpu_us_per_account"]))
    for phase in phases:
        print(
            f"| {phase} | "
            + " | ".join(
                f"{r['phase_cpu_us_per_account'].get(phase, 0):,.0f}" for r in results.values()
            )
            + " |"
        )
    print(
        "| **worker** | "
        + " | ".join(f"**{r['worker_cpu_us_per_account']:,.0f}**" for r in results.values())
        + " |"
    )
    print(
        "| PostgreSQL backends | "
        + " | ".join(f"{r['postgres_cpu_us_per_account']:,.0f}" for r in results.values())
        + " |"
    )
    if not args.no_record:
        record = Record(
            benchmark="worker-cpu",
            script="worker_cpu.py",
            argv=argv,
            parameters=harness.parameters(args, "seed_only"),
            machine={
                "cpus": os.cpu_count(),
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "postgresql": pg(args.pg_url, "SHOW server_version"),
            },
            results=results,
            runs=runs,
        )
        progress(f"wrote {record.write(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
