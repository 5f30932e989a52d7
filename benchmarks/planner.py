"""Benchmark the planner and the state reader: CPU microseconds per account of each pure-Python
piece a worker runs for every account it migrates.

Seeds ``--accounts`` synthetic accounts (``keyshift.simulation``, the realistic spread) into a
temporary SQLite file (``--database postgres``: a database ``keyshift_planner_<pid>`` made beside
``--pg-url`` and dropped at the end), reads them back, and times, as CPU time of this process,
passes over every account of:

- ``read_states``: the whole call (queries, driver, rows, dicts) in batches of ``--batch``
  accounts, as a worker reads a batch; and its parts: ``fetch rows`` (the same six queries,
  rows fetched, nothing built; on SQLite the database engine runs in this process and is in
  both) and ``build dicts`` (the states made from rows already fetched, per account, by the
  function ``read_states`` makes them with: ``_state_of_rows``, or ``build_state`` in code
  from before it).
- ``plan_migration`` under each rules file of ``examples/migrations``, over the accounts on a
  source plan of those rules (the cohort a run of them would have);
- ``plan.to_dict()`` and ``plan.outcome_digest()`` of those plans;
- ``state_hash(snapshot)`` of every account.

Each figure is the median over ``--repeats`` passes of (a pass's CPU time ÷ the items in it),
with the fastest and slowest pass. The garbage collector runs as it would in a worker.
``--profile`` also prints a cProfile of one pass of each piece. Prints a table and writes
``results/planner-<UTC time>.json``.

    .venv/bin/python benchmarks/planner.py [--accounts 5000] [--repeats 5] [--database postgres]
        [--profile [cumulative]]

The code timed is the ``keyshift`` Python imports: ``PYTHONPATH=<other checkout>/src`` times
another commit's (the record names the checkout and its commit), with this script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import harness
from harness import ROOT, Record, progress

RULES_DIR = ROOT / "examples" / "migrations"
HEADLINE = "pro-2023-to-2025"  # the rules benchmarks/runs.py migrates with


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the planner and the state reader.")
    add = parser.add_argument
    add("--accounts", type=int, default=5000, help="synthetic accounts to seed and time")
    add("--seed", type=int, default=1)
    add("--repeats", type=int, default=5, help="passes over the accounts per measurement")
    add("--batch", type=int, default=100, help="accounts per read_states call")
    add("--database", choices=("sqlite", "postgres"), default="sqlite")
    add(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="with --database postgres: an admin URL of the server (the database is made beside)",
    )
    add(
        "--profile",
        nargs="?",
        const="tottime",
        choices=("tottime", "cumulative"),
        help="also print a cProfile of one pass of each, sorted by own (default) or cumulative time",
    )
    add("--no-record", action="store_true", help="print only; write no JSON result")
    add("--results", type=Path, default=harness.RESULTS, help="where the JSON result is written")
    args = parser.parse_args(argv)
    if not 1 <= args.accounts <= 1_000_000:
        parser.error("--accounts must be in 1..1,000,000")
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be at least 1")
    return args


def to_dict(plan: Any) -> Any:
    """``plan.to_dict()`` as its first call on the plan makes it (a plan keeps its outcome
    digest once worked out, in code that does: each pass times the work anew)."""
    plan.__dict__.pop("_outcome_digest", None)
    return plan.to_dict()


def outcome_digest(plan: Any) -> Any:
    """``plan.outcome_digest()`` as its first call on the plan makes it."""
    plan.__dict__.pop("_outcome_digest", None)
    return plan.outcome_digest()


def settle() -> None:
    """Collect, then freeze what is alive (the benchmark's inputs) out of the collector's
    sight: a worker holds one batch, not every account, and its full collections do not scan
    thousands of states and plans."""
    gc.collect()
    gc.freeze()


def cpu_passes(items: Sequence[Any], call: Callable[[Any], Any], repeats: int) -> dict[str, float]:
    """CPU µs per item over ``repeats`` passes (median, min, max). Each result is dropped as
    it is made (a worker drops an account's once it is written): thousands kept alive would
    time the garbage collector walking them."""
    per_item: list[float] = []
    for _ in range(repeats):
        settle()
        started = time.process_time_ns()
        for item in items:
            call(item)
        per_item.append((time.process_time_ns() - started) / 1000 / max(1, len(items)))
    return _spread(per_item)


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def profile_pass(
    title: str, items: Sequence[Any], call: Callable[[Any], Any], sort: str = "tottime"
) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for item in items:
        call(item)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats(sort).print_stats(25)
    print(f"\n--- cProfile: {title} ({len(items)} items), by {sort} ---")
    print("\n".join(line for line in stream.getvalue().splitlines()[4:] if line.strip()))


async def fetch_rows(session: Any, ids: Sequence[str], now: datetime) -> dict[Any, Any]:
    """The rows ``read_states`` reads for ``ids``, grouped as it groups them, nothing built."""
    from sqlalchemy import select

    from keyshift.db.tables import DataObject, UsageCounter
    from keyshift.migration import repository

    try:  # = ANY(array) on PostgreSQL, as read_states does since 6bf6d98
        from keyshift.db.sql import among
    except ImportError:

        def among(session: Any, column: Any, values: Sequence[str]) -> Any:
            return column.in_(list(values))

    wheres: dict[Any, tuple[Any, ...]] = {
        UsageCounter: (UsageCounter.period_end > now,),
        DataObject: (DataObject.state != "staged",),
    }
    grouped: dict[Any, dict[str, list[Any]]] = {}
    for table, columns in repository._STATE_COLUMNS.items():
        rows: dict[str, list[Any]] = {}
        result = await session.execute(
            select(*columns).where(among(session, columns[0], ids), *wheres.get(table, ()))
        )
        for row in result:
            rows.setdefault(row[0], []).append(row)
        grouped[table] = rows
    return grouped


async def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    from keyshift.context import SYSTEM
    from keyshift.db.engine import Database
    from keyshift.db.migrate import upgrade_to_head
    from keyshift.db.tables import (
        Account,
        Activation,
        DataObject,
        License,
        Subscription,
        UsageCounter,
    )
    from keyshift.migration import repository
    from keyshift.migration.executor import plan_pair
    from keyshift.migration.loader import load_rules
    from keyshift.migration.planner import plan_migration
    from keyshift.migration.state import state_hash
    from keyshift.security.keyring import Keyring
    from keyshift.simulation.seed import seed
    from keyshift.simulation.synthetic import synthetic_id

    keyring = Keyring(active="k1", keys={"k1": b"k" * 32}, lookup_key=b"l" * 32)
    anchor = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    now = anchor + timedelta(minutes=10)
    ids = [synthetic_id(args.seed, "account", i) for i in range(args.accounts)]
    batches = [ids[i : i + args.batch] for i in range(0, len(ids), args.batch)]
    repeats = args.repeats
    db = Database(url)
    try:
        await upgrade_to_head(db.engine)
        progress(f"seeding {args.accounts:,} accounts")
        summary = await seed(
            db,
            accounts=args.accounts,
            seed=args.seed,
            keyring=keyring,
            actor=SYSTEM,
            catalog_dir=ROOT / "examples" / "catalog",
            at=anchor,
        )
        progress(f"seeded in {summary.seconds:.1f} s; timing")
        results: dict[str, Any] = {}
        async with db.transaction() as session:
            # read_states, whole and in parts, per account.
            async def read_all() -> list[Any]:
                states: list[Any] = []
                for batch in batches:
                    states += await repository.read_states(session, batch, now)
                return states

            async def fetch_all() -> list[Any]:
                return [await fetch_rows(session, batch, now) for batch in batches]

            await read_all()  # warm: statement caches, imports
            timings: dict[str, list[float]] = {"read_states": [], "fetch rows": []}
            states: list[Any] = []
            fetched: list[Any] = []
            for _ in range(repeats):
                states = fetched = []
                settle()
                started = time.process_time_ns()
                states = await read_all()
                timings["read_states"].append(time.process_time_ns() - started)
                settle()
                started = time.process_time_ns()
                fetched = await fetch_all()
                timings["fetch rows"].append(time.process_time_ns() - started)
            for name, values in timings.items():
                results[name] = _spread([v / 1000 / len(ids) for v in values])
            rows_of = []
            for grouped in fetched:
                for account_id, (account,) in grouped[Account].items():
                    rows_of.append(
                        (
                            account,
                            (grouped[Subscription].get(account_id) or [None])[0],
                            grouped[License].get(account_id, ()),
                            grouped[Activation].get(account_id, ()),
                            grouped[UsageCounter].get(account_id, ()),
                            grouped[DataObject].get(account_id, ()),
                        )
                    )

            positional = getattr(repository, "_state_of_rows", None)
            taken_at = now.isoformat()

            def build(rows: tuple[Any, ...]) -> Any:
                if positional is not None:
                    return positional(*rows, taken_at)
                return repository.build_state(*rows, now)

            results["build dicts"] = cpu_passes(rows_of, build, repeats)
            built = [build(rows) for rows in rows_of]
            assert len(built) == len(states) == len(ids)
            results["state_hash"] = cpu_passes(states, state_hash, repeats)
            if args.profile:
                profile_pass("build dicts", rows_of, build, args.profile)
                profile_pass("state_hash", states, state_hash, args.profile)

            pairs: dict[str, Any] = {}
            for path in sorted(RULES_DIR.glob("*.toml")):
                rules, _ = load_rules(path)
                for ref in [*rules.rules.from_plans, rules.rules.to]:
                    if ref not in pairs:
                        pairs[ref] = await plan_pair(session, ref)
                target = pairs[rules.rules.to]
                cohort = [
                    s
                    for s in states
                    if s["subscription"] and s["subscription"]["plan"] in rules.rules.from_plans
                ]

                def plan(state: Any, rules: Any = rules, target: Any = target) -> Any:
                    return plan_migration(
                        state,
                        rules,
                        pairs[state["subscription"]["plan"]],
                        target,
                        migration_id="00000000-0000-4000-8000-000000000001",
                        now=now,
                    )

                name = rules.rules.key
                timed = cpu_passes(cohort, plan, repeats)
                plans = [plan(state) for state in cohort]
                eligible = sum(1 for p in plans if p.can_apply)
                results[f"plan_migration {name}"] = {
                    **timed,
                    "accounts": len(cohort),
                    "can_apply": eligible,
                }
                results[f"to_dict {name}"] = cpu_passes(plans, to_dict, repeats)
                results[f"outcome_digest {name}"] = cpu_passes(plans, outcome_digest, repeats)
                if args.profile:
                    profile_pass(f"plan_migration {name}", cohort, plan, args.profile)
                    profile_pass(f"to_dict {name}", plans, to_dict, args.profile)
    finally:
        await db.dispose()
    results["read_states, less fetch rows"] = {
        "median": round(results["read_states"]["median"] - results["fetch rows"]["median"], 2)
    }
    per_account = (
        results["read_states"]["median"]
        + results["state_hash"]["median"]
        + results[f"plan_migration {HEADLINE}"]["median"]
        + results[f"to_dict {HEADLINE}"]["median"]
        + results[f"outcome_digest {HEADLINE}"]["median"]
    )
    results[f"sum: read_states + state_hash + plan + to_dict + digest ({HEADLINE})"] = {
        "median": round(per_account, 2)
    }
    return results


def code_timed() -> dict[str, str]:
    """The checkout whose ``keyshift`` is imported, and its commit (marked when its ``src``
    has uncommitted changes)."""
    import subprocess

    import keyshift

    src = Path(keyshift.__file__).resolve().parents[1]

    def git(*argv: str) -> str:
        run = subprocess.run(["git", "-C", str(src), *argv], capture_output=True, text=True)
        return run.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no", "."):
        commit += " (uncommitted changes)"
    return {"src": str(src), "commit": commit}


def machine() -> dict[str, Any]:
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
        "packages": harness.package_versions("sqlalchemy", "aiosqlite", "asyncpg", "orjson"),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    record = Record(
        benchmark="planner",
        script="planner.py",
        argv=argv,
        parameters=harness.parameters(args, "profile"),
        machine=machine(),
    )
    record.parameters["code"] = code_timed()
    if args.database == "postgres":
        database = f"keyshift_planner_{os.getpid()}"
        _, url = harness.database_urls(args.pg_url, database)
        harness.pg(args.pg_url, f'CREATE DATABASE "{database}"')
        try:
            results = asyncio.run(measure(args, url))
        finally:
            harness.pg(args.pg_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    else:
        with tempfile.TemporaryDirectory(prefix="keyshift-planner-bench-") as scratch:
            results = asyncio.run(measure(args, f"sqlite+aiosqlite:///{scratch}/bench.db"))
    record.machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    record.results = results
    code = record.parameters["code"]
    print(
        f"\n{args.accounts:,} accounts on {args.database}, CPU µs per account (median of"
        f" {args.repeats} passes); code {code['commit']} ({code['src']})"
    )
    print("\n| piece | µs/account | min | max | accounts |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(
            f"| {name} | {r['median']:.1f} | {r.get('min', '')} | {r.get('max', '')}"
            f" | {r.get('accounts', '')} |"
        )
    print(
        f"load average before {record.machine['load_average_before']}, after"
        f" {record.machine['load_average_after']}"
    )
    if not args.no_record:
        print(f"recorded {record.write(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
