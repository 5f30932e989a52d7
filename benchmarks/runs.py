"""Benchmark a migration run on PostgreSQL: accounts migrated per second with K worker
processes, beside ``pgbench -N`` transactions per second on the same database in the same run;
each worker's peak RSS; and the latency of a single-account ``migrate apply``.

For each worker count, in a fresh database ``keyshift_runs_<pid>_<K>`` (dropped at the end):
migrate, seed ``--accounts`` synthetic accounts (``keyshift.simulation``), create a run of the
example rules ``pro-2023-to-2025`` over every account on ``pro-seat@2023``, report, approve,
start, and time K `keyshift worker --until-idle` processes until the run completes (or
``--time-limit`` stops them), reading each worker's peak RSS (``VmHWM`` while it runs, the
kernel's ``ru_maxrss`` when it exits). Then, in the same database, ``pgbench -i`` (its own
``pgbench_*`` tables) and ``pgbench -N``: accounts/s ÷ pgbench tps says how far a run is from
what this PostgreSQL does with simple write transactions, on the same machine at the same time.

Then, in a database of its own, ``--apply-samples`` single-account ``Executor.apply`` calls
(``keyshift migrate apply``'s path, in this process) on accounts the rules can migrate: p50,
p90 and the spread.

``--rss-check`` runs instead one worker at each of ``--rss-sizes`` (default 10,000 and
100,000 accounts) and reports its peak RSS at each and their ratio: a worker's memory should not
grow with the run.

``--rollback`` goes on, in each worker count's database, once the run has completed: ``keyshift
runs rollback RUN``, then K workers again until the run is rolled back, timed the same way
(accounts rolled back per second). ``--finalize`` instead times ``keyshift runs finalize RUN``
on the completed run (accounts finalized per second). Both go through the CLI, so the same
script measures any version of the code.

``--tracing on`` has the workers trace (``OTEL_EXPORTER_OTLP_ENDPOINT`` names a loopback
OTLP/HTTP receiver in this process that counts the exports and parses nothing): the cost of a
span per batch step with its accounts, and of a span per statement.

Prints a table and writes ``results/runs-<UTC time>.json``.

    .venv/bin/python benchmarks/runs.py [--accounts 2000] [--workers 1,2,4] [--batch-size 100]
        [--pgbench-duration 10] [--apply-samples 50] [--time-limit S] [--profile DIR]
        [--rollback | --finalize]
    .venv/bin/python benchmarks/runs.py --rss-check [--rss-sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import psutil
from harness import ROOT, Record, pg, progress

RULES = ROOT / "examples" / "migrations" / "pro-2023-to-2025.toml"
#: Applies before the timed ones (imports, the catalog cache, prepared statements).
APPLY_WARMUP = 2
#: One `keyshift worker` that exits once the run has nothing left to claim.
WORKER_COMMAND = [sys.executable, "-m", "keyshift.cli", "worker", "--until-idle", "--poll", "0.2"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark a migration run with workers.")
    add = parser.add_argument
    add("--accounts", type=int, default=2000, help="synthetic accounts to seed")
    add("--workers", default="1,2", help="worker counts to try, comma-separated")
    add("--batch-size", type=int, default=100)
    add("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    add(
        "--time-limit",
        type=float,
        help="stop the workers (SIGTERM) after this many seconds; the rate is of what they did",
    )
    add("--pgbench-duration", type=int, default=10, help="seconds of pgbench -N; 0: none")
    add("--pgbench-scale", type=int, default=8, help="pgbench -i scale (its own tables)")
    add("--pgbench-clients", type=int, default=4)
    add("--pgbench-threads", type=int, default=2)
    add("--apply-samples", type=int, default=50, help="single-account applies timed; 0: none")
    add(
        "--rss-check",
        action="store_true",
        help="instead: one worker at each --rss-sizes, its peak RSS at each and their ratio",
    )
    add("--rss-sizes", default="10000,100000", help="accounts seeded for --rss-check")
    after = parser.add_mutually_exclusive_group()
    after.add_argument(
        "--rollback",
        action="store_true",
        help="then roll each completed run back with the same workers, timed",
    )
    after.add_argument(
        "--finalize", action="store_true", help="then finalize each completed run, timed"
    )
    add(
        "--tracing",
        choices=["off", "on"],
        default="off",
        help="on: workers export their spans over OTLP/HTTP to a loopback sink",
    )
    add("--no-record", action="store_true", help="print only; write no JSON result")
    add(
        "--profile",
        type=Path,
        help="run each worker under py-spy; collapsed stacks to DIR/worker-<accounts>-<K>-<i>.txt",
    )
    add("--results", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    try:
        args.worker_counts = [int(n) for n in args.workers.split(",")]
        args.rss_accounts = [int(n) for n in args.rss_sizes.split(",")]
    except ValueError:
        parser.error("--workers and --rss-sizes take whole numbers, comma-separated")
    sizes = [args.accounts, *args.rss_accounts]
    if any(not 1 <= n <= 1_000_000 for n in sizes) or any(
        not 1 <= n <= 16 for n in args.worker_counts
    ):
        parser.error("accounts in 1..1,000,000 and each worker count in 1..16")
    if args.rss_check and len(args.rss_accounts) < 2:
        parser.error("--rss-sizes takes two sizes or more")
    if not 0 <= args.pgbench_duration <= 120 or not 0 <= args.apply_samples <= 10_000:
        parser.error("--pgbench-duration in 0..120 s, --apply-samples in 0..10,000")
    return args


# -- the run -------------------------------------------------------------------------------------


async def prepare(url: str, secrets_dir: Path, accounts: int, batch_size: int) -> tuple[str, int]:
    """Seed, create, report, approve and start a run; returns its id and size."""
    from keyshift.context import SYSTEM, Actor
    from keyshift.migration.loader import load_rules
    from keyshift.runs import service
    from keyshift.runs.model import Cohort, RunOptions

    db = await seeded(url, secrets_dir, accounts)
    try:
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


async def seeded(url: str, secrets_dir: Path, accounts: int) -> Any:
    """The migrated database at ``url`` with ``accounts`` synthetic accounts (seed 1)."""
    from keyshift.context import SYSTEM
    from keyshift.db.engine import Database
    from keyshift.db.migrate import upgrade_to_head
    from keyshift.security.secrets_store import ensure_secrets
    from keyshift.simulation.seed import seed

    secrets, _ = ensure_secrets(secrets_dir)
    db = Database(url)
    await upgrade_to_head(db.engine)
    summary = await seed(
        db,
        accounts=accounts,
        seed=1,
        keyring=secrets.keyring,
        actor=SYSTEM,
        catalog_dir=ROOT / "examples" / "catalog",
    )
    progress(f"  seeded {accounts:,} accounts: {summary.accounts_per_second:,.0f} accounts/s")
    return db


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


# -- workers and their memory --------------------------------------------------------------------

_VMHWM = re.compile(r"^VmHWM:\s+(\d+) kB$", re.M)


def vmhwm_kib(pid: int) -> int | None:
    """The process's peak resident set so far (``VmHWM``), None once it has gone."""
    try:
        found = _VMHWM.search(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) if found else None


@dataclass
class Worker:
    """One `keyshift worker` process (under py-spy if profiled: then the worker is its child)."""

    process: subprocess.Popen[bytes]
    profiled: bool
    peak_kib: int = 0
    exit_code: int | None = None
    seconds: float | None = None

    def worker_pids(self) -> list[int]:
        """The worker's pid: the process, or under py-spy the process's child."""
        if not self.profiled:
            return [self.process.pid]
        with contextlib.suppress(psutil.Error):
            return [child.pid for child in psutil.Process(self.process.pid).children()]
        return []

    def stop(self) -> None:
        """SIGTERM to the worker itself (py-spy, stopped, would leave it running)."""
        for pid in self.worker_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def sample(self) -> None:
        """Raise ``peak_kib`` to the worker's ``VmHWM`` (monotonic: the last read before it
        exits is within one poll of its peak)."""
        for pid in self.worker_pids():
            if (kib := vmhwm_kib(pid)) is not None:
                self.peak_kib = max(self.peak_kib, kib)

    def reap(self, started: float) -> bool:
        """Reap the process if it has exited; its ``ru_maxrss`` is exact (when not profiled)."""
        pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.process.returncode = self.exit_code
        self.seconds = time.perf_counter() - started
        if not self.profiled:  # py-spy's own maxrss would say nothing of the worker
            self.peak_kib = max(self.peak_kib, usage.ru_maxrss)  # KiB on Linux
        return True


def worker_env(url: str, secrets_dir: Path) -> dict[str, str]:
    """The environment of a worker on the database at ``url`` with these secrets."""
    return {**os.environ, "KEYSHIFT_DATABASE_URL": url, "KEYSHIFT_SECRETS_DIR": str(secrets_dir)}


def run_workers(
    commands: list[list[str]],
    env: dict[str, str],
    *,
    profiled: bool,
    time_limit: float | None,
    poll: float = 0.2,
) -> tuple[float, list[Worker]]:
    """Start the workers, sample their memory every ``poll`` s until all have exited (SIGTERM
    after ``time_limit``); the seconds until the last exited, and each worker."""
    started = time.perf_counter()
    workers = [
        Worker(subprocess.Popen(c, env=env, stderr=subprocess.DEVNULL), profiled) for c in commands
    ]
    stopped = False
    while True:
        running = [w for w in workers if w.exit_code is None and not w.reap(started)]
        if not running:
            break
        elapsed = time.perf_counter() - started
        if time_limit is not None and elapsed > time_limit and not stopped:
            for w in running:
                w.stop()
            stopped = True
        if elapsed > 3600 + (time_limit or 0):
            for w in running:
                w.process.kill()
        for w in running:
            w.sample()
        time.sleep(poll)
    return time.perf_counter() - started, workers


def keyshift(env: dict[str, str], *args: str) -> None:
    """One `keyshift` command; its failure stops the benchmark."""
    done = subprocess.run(
        [sys.executable, "-m", "keyshift.cli", *args], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"keyshift {' '.join(args)} failed ({done.returncode}): {done.stderr}")


def measure_after(
    url: str, env: dict[str, str], run_id: str, commands: list[list[str]], then: str
) -> dict[str, Any]:
    """Roll the completed run back with the workers (``then="rollback"``), or finalize it
    (``"finalize"``); the seconds it took and the accounts it moved."""
    load = [round(x, 2) for x in os.getloadavg()]
    if then == "rollback":
        keyshift(env, "runs", "rollback", run_id)
        # Timed as the forward run is: from the workers' start until the last has exited.
        seconds, ran = run_workers(commands, env, profiled=False, time_limit=None)
        moved_state = "rolled_back"
    else:
        # The command's own start-up (about a second of imports) is in the time.
        started = time.perf_counter()
        keyshift(env, "runs", "finalize", run_id)
        seconds, ran = time.perf_counter() - started, []
        moved_state = "migrated"
    result = asyncio.run(outcome(url, run_id))
    moved = result["by_state"].get(moved_state, 0)
    progress(f"  {then}: {moved:,} accounts in {seconds:.2f} s, run {result['state']}")
    return {
        "what": then,
        "accounts": moved,
        "seconds": round(seconds, 2),
        "accounts_per_s": round(moved / seconds, 1) if seconds else None,
        "worker_exit_codes": [w.exit_code for w in ran],
        "load_average_before": load,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "final": result,
    }


def measure(
    admin_url: str,
    accounts: int,
    workers: int,
    batch_size: int,
    *,
    profile: Path | None = None,
    time_limit: float | None = None,
    pgbench: dict[str, int] | None = None,
    then: str | None = None,
) -> dict[str, Any]:
    name = f"keyshift_runs_{os.getpid()}_{workers}_{accounts}"
    plain_url, url = harness.database_urls(admin_url, name)
    pg(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    pg(admin_url, f'CREATE DATABASE "{name}"')
    secrets_dir = Path(tempfile.mkdtemp(prefix="keyshift-runs-bench-"))
    try:
        run_id, total = asyncio.run(prepare(url, secrets_dir, accounts, batch_size))
        env = worker_env(url, secrets_dir)
        command = WORKER_COMMAND
        commands = [command] * workers
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            spy = [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw"]
            commands = [
                [*spy, "-o", str(profile / f"worker-{accounts}-{workers}-{i}.txt"), "--", *command]
                for i in range(workers)
            ]
        seconds, ran = run_workers(
            commands, env, profiled=profile is not None, time_limit=time_limit
        )
        result = asyncio.run(outcome(url, run_id))
        migrated = result["by_state"].get("migrated", 0)
        row: dict[str, Any] = {
            "workers": workers,
            "accounts_seeded": accounts,
            "accounts_in_run": total,
            "migrated": migrated,
            "seconds": round(seconds, 2),
            "stopped_at_time_limit": time_limit is not None and seconds > time_limit,
            "accounts_per_s": round(migrated / seconds, 1) if seconds else None,
            "worker_peak_rss_mib": [round(w.peak_kib / 1024, 1) for w in ran],
            "worker_exit_codes": [w.exit_code for w in ran],
            "final": result,
        }
        if then is not None and result["state"] == "completed":
            row[then] = measure_after(url, env, run_id, [command] * workers, then)
        if pgbench is not None:
            row["pgbench"] = run_pgbench(admin_url, name, plain_url, **pgbench)
            tps = (row["pgbench"] or {}).get("tps")
            if tps and row["accounts_per_s"] is not None:
                row["accounts_per_s_per_pgbench_tps"] = round(row["accounts_per_s"] / tps, 5)
        return row
    finally:
        pg(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_pgbench(
    admin_url: str, database: str, plain_url: str, *, duration: int, scale: int, clients: int,
    threads: int,
) -> dict[str, Any] | None:  # fmt: skip
    """``pgbench -i -s scale`` then ``pgbench -N`` in the run's database (its own tables)."""
    bench = harness.Bench(admin_url, database, Path(tempfile.mkdtemp(prefix=f"{database}-")))
    progress(f"  pgbench -i -s {scale}, then -N -c {clients} -j {threads} -T {duration}")
    if harness.pgbench(bench, "-i", "-s", str(scale), "-q", timeout=600) is None:
        return None
    options = ["-N", "-n", "-c", str(clients), "-j", str(threads), "-T", str(duration)]
    return harness.pgbench(bench, *options, timeout=duration + 120)


# -- a single account's apply --------------------------------------------------------------------


async def apply_latency(url: str, secrets_dir: Path, accounts: int, samples: int) -> dict[str, Any]:
    """``samples`` single-account applies (after ``APPLY_WARMUP`` untimed) on accounts the
    example rules can migrate now, one after another: each one's seconds."""
    from sqlalchemy import select

    from keyshift.context import SYSTEM
    from keyshift.db.tables import Subscription
    from keyshift.db.types import utcnow
    from keyshift.migration.executor import Executor, preview
    from keyshift.migration.loader import load_rules
    from keyshift.security.secrets_store import ensure_secrets
    from keyshift.states import MigrationState

    secrets, _ = ensure_secrets(secrets_dir)
    db = await seeded(url, secrets_dir, accounts)
    try:
        rules, _ = load_rules(RULES)
        wanted = samples + APPLY_WARMUP
        chosen: list[str] = []
        async with db.transaction() as session:
            candidates = (
                await session.execute(
                    select(Subscription.account_id)
                    .where(Subscription.plan_key == "pro-seat", Subscription.plan_version == "2023")
                    .order_by(Subscription.account_id)
                )
            ).scalars()
            for account_id in candidates:
                plan, _ = await preview(session, rules, account_id, now=utcnow())
                if plan.can_apply:
                    chosen.append(account_id)
                    if len(chosen) == wanted:
                        break
        if len(chosen) < wanted:
            raise SystemExit(f"only {len(chosen)} accounts to apply; seed more (--accounts)")
        executor = Executor(db, secrets.signing)
        timings, states = [], {}
        for n, account_id in enumerate(chosen):
            started = time.perf_counter()
            migration = await executor.apply(SYSTEM, rules, account_id)
            seconds = time.perf_counter() - started
            states[str(migration.state)] = states.get(str(migration.state), 0) + 1
            if n >= APPLY_WARMUP:
                timings.append(seconds)
        if states.get(str(MigrationState.COMPLETED), 0) != wanted:
            progress(f"  not every apply completed: {states}")
        ms = sorted(1000 * t for t in timings)
        return {
            "samples": len(ms),
            "warmup": APPLY_WARMUP,
            "states": states,
            "p50_ms": round(statistics.median(ms), 1),
            "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1),
            "min_ms": round(ms[0], 1),
            "max_ms": round(ms[-1], 1),
            "stdev_ms": round(statistics.stdev(ms), 1) if len(ms) > 1 else 0.0,
        }
    finally:
        await db.dispose()


def measure_apply(admin_url: str, accounts: int, samples: int) -> dict[str, Any]:
    name = f"keyshift_runs_{os.getpid()}_apply"
    _, url = harness.database_urls(admin_url, name)
    pg(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    pg(admin_url, f'CREATE DATABASE "{name}"')
    secrets_dir = Path(tempfile.mkdtemp(prefix="keyshift-runs-bench-"))
    try:
        return asyncio.run(apply_latency(url, secrets_dir, accounts, samples))
    finally:
        pg(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the command ---------------------------------------------------------------------------------


def machine(admin_url: str) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "postgresql": pg(admin_url, "SHOW server_version"),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }


def rss_check(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    rows = []
    for accounts in args.rss_accounts:
        progress(f"rss check: 1 worker, {accounts:,} accounts seeded")
        rows.append(
            measure(
                args.pg_url, accounts, 1, args.batch_size,
                profile=args.profile, time_limit=args.time_limit,
            )
        )  # fmt: skip
        progress(f"  {rows[-1]}")
    peaks = [row["worker_peak_rss_mib"][0] for row in rows]
    ratio = round(peaks[-1] / peaks[0], 3) if peaks[0] else None
    for row, peak in zip(rows, peaks, strict=True):
        print(
            f"{row['accounts_seeded']:,} accounts ({row['accounts_in_run']:,} in the run,"
            f" {row['migrated']:,} migrated in {row['seconds']} s): worker peak RSS {peak} MiB"
        )
    print(f"peak RSS ratio, {args.rss_accounts[-1]:,} to {args.rss_accounts[0]:,}: {ratio}")
    results = {
        "peak_rss_mib": {str(r["accounts_seeded"]): p for r, p in zip(rows, peaks, strict=True)},
        "peak_rss_ratio": ratio,
    }
    return results, {"rows": rows}


def throughput(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    pgbench = None
    if args.pgbench_duration:
        pgbench = {
            "duration": args.pgbench_duration,
            "scale": args.pgbench_scale,
            "clients": args.pgbench_clients,
            "threads": args.pgbench_threads,
        }
    rows = []
    for workers in args.worker_counts:
        progress(f"{workers} worker(s), {args.accounts:,} accounts seeded")
        rows.append(
            measure(
                args.pg_url, args.accounts, workers, args.batch_size,
                profile=args.profile, time_limit=args.time_limit, pgbench=pgbench,
                then=after_run(args),
            )
        )  # fmt: skip
        progress(f"  {rows[-1]}")
    apply = None
    if args.apply_samples:
        progress(f"{args.apply_samples} single-account applies, {args.accounts:,} accounts seeded")
        apply = measure_apply(args.pg_url, args.accounts, args.apply_samples)
        progress(f"  {apply}")

    print("\n| workers | in run | migrated | seconds | accounts/s | pgbench -N tps | ratio |"
          " peak RSS per worker (MiB) |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        tps = (row.get("pgbench") or {}).get("tps")
        print(
            f"| {row['workers']} | {row['accounts_in_run']:,} | {row['migrated']:,}"
            f" | {row['seconds']} | {row['accounts_per_s']} | {f'{tps:,.0f}' if tps else '—'}"
            f" | {row.get('accounts_per_s_per_pgbench_tps', '—')}"
            f" | {', '.join(str(m) for m in row['worker_peak_rss_mib'])} |"
        )
    if after_run(args) is not None:
        print(f"\n| workers | {after_run(args)}: accounts | seconds | accounts/s |")
        print("| ---: | ---: | ---: | ---: |")
        for row in rows:
            after = row.get(after_run(args)) or {}
            print(
                f"| {row['workers']} | {after.get('accounts', '—')} | {after.get('seconds', '—')}"
                f" | {after.get('accounts_per_s', '—')} |"
            )
    if apply is not None:
        print(
            f"\nmigrate apply, one account ({apply['samples']} samples): p50 {apply['p50_ms']} ms,"
            f" p90 {apply['p90_ms']} ms, min {apply['min_ms']} ms, max {apply['max_ms']} ms"
        )
    results: dict[str, Any] = {
        str(r["workers"]): {
            "accounts_per_s": r["accounts_per_s"],
            "pgbench_tps": (r.get("pgbench") or {}).get("tps"),
            "accounts_per_s_per_pgbench_tps": r.get("accounts_per_s_per_pgbench_tps"),
            "worker_peak_rss_mib": max(r["worker_peak_rss_mib"]),
            **(
                {
                    f"{after_run(args)}_accounts_per_s": (r.get(after_run(args)) or {}).get(
                        "accounts_per_s"
                    )
                }
                if after_run(args)
                else {}
            ),
        }
        for r in rows
    }
    if apply is not None:
        results["apply_p50_ms"] = apply["p50_ms"]
    return results, {"rows": rows, "apply": apply}


def after_run(args: argparse.Namespace) -> str | None:
    """What follows each completed run: ``rollback``, ``finalize`` or nothing."""
    return "rollback" if args.rollback else "finalize" if args.finalize else None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        sink = None
        if args.tracing == "on":
            sink = stack.enter_context(harness.otlp_sink())
            # Every worker's environment is this process's (``worker_env``).
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint
            os.environ["OTEL_SERVICE_NAME"] = "keyshift-bench"
        results, runs = rss_check(args) if args.rss_check else throughput(args)
        if sink is not None:
            runs = {
                "throughput": runs,
                "otlp_sink": {"requests": sink.requests, "bytes": sink.bytes},
            }
            progress(f"OTLP sink: {sink.requests:,} exports, {sink.bytes:,} bytes")
    if not args.no_record:
        record = Record(
            benchmark="runs-rss" if args.rss_check else "runs",
            script="runs.py",
            argv=argv,
            parameters=harness.parameters(args, "worker_counts", "rss_accounts"),
            machine=machine(args.pg_url),
            results=results,
            runs=runs,
        )
        progress(f"wrote {record.write(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
