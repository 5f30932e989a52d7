"""Chaos at scale (issue #13): the test of ``tests/runs/test_chaos.py`` with a big cohort.

On a PRIVATE PostgreSQL (initdb into a temporary directory, its own port; never the shared
server), seed ``--accounts`` synthetic accounts twice, in two databases, and in each create,
report, approve and start a run of ``examples/migrations/pro-2023-to-2025.toml`` over every
account on ``pro-seat@2023`` (about 39 % of them). The twin is worked by ``--workers``
undisturbed `keyshift worker` processes; the other by as many while a driver SIGKILLs a random
busy worker every ``--kill-every`` seconds (starting a replacement) and restarts PostgreSQL
once, as a crash, when ``--restart-at`` of the run is settled. Then the checks: the run
completed, every account ended as in the twin, every migrated account has exactly one cutover
ledger row (done) and one migration, no failed attempt, the state checksum (``across_runs``)
equals the twin's, both audit chains verify, no worker died but by our hand. Prints the checks
and the timings, writes ``results/chaos-<UTC time>.json``, and exits 1 when a check failed.

    .venv/bin/python benchmarks/chaos.py [--accounts 100000] [--workers 4] [--kill-every 2,3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import harness
from harness import ROOT, Record, progress

sys.path.insert(0, str(ROOT))  # the harness lives with the tests: tests/runs/chaos.py

from tests.private_postgres import private_postgres
from tests.runs import chaos


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A migration run under chaos, at scale.")
    add = parser.add_argument
    add("--accounts", type=int, default=100_000, help="synthetic accounts to seed (each database)")
    add("--workers", type=int, default=4, help="worker processes (chaos and twin)")
    add("--batch-size", type=int, default=50)
    add("--kill-every", default="2,3", help="seconds between kills: MIN,MAX (uniform)")
    add("--max-kills", type=int, default=None, help="stop killing after this many (default: never)")
    add("--restart-at", type=float, default=0.3, help="restart PostgreSQL at this share settled")
    add("--deadline", type=float, default=6 * 3600, help="give up after this many seconds")
    add("--seed", type=int, default=None, help="the driver's random seed (default: random)")
    add("--no-twin", action="store_true", help="skip the undisturbed run (and the comparisons)")
    add("--no-record", action="store_true", help="print only; write no JSON result")
    add("--results", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    try:
        low, high = (float(x) for x in args.kill_every.split(","))
    except ValueError:
        parser.error("--kill-every takes MIN,MAX seconds")
    if not 0.1 <= low <= high <= 600:
        parser.error("--kill-every: 0.1 <= MIN <= MAX <= 600")
    args.kill_range = (low, high)
    if not 1 <= args.accounts <= 1_000_000 or not 1 <= args.workers <= 16:
        parser.error("--accounts in 1..1,000,000 and --workers in 1..16")
    if not 0 < args.restart_at < 1:
        parser.error("--restart-at is a share of the run, between 0 and 1")
    if args.seed is None:
        args.seed = random.randrange(2**32)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    secrets_dir = Path(tempfile.mkdtemp(prefix="keyshift-chaos-bench-"))
    from keyshift.security.secrets_store import ensure_secrets

    secrets, _ = ensure_secrets(secrets_dir)
    options = chaos.chaos_options(args.batch_size)
    log_dir = Path(tempfile.mkdtemp(prefix="keyshift-chaos-logs-"))
    timings: dict[str, float] = {}
    load_before = [round(x, 2) for x in os.getloadavg()]
    # A bigger WAL: a 100,000-account seed in one transaction would checkpoint all along.
    with private_postgres(settings={"max_wal_size": "4GB"}) as pg:
        progress(f"private PostgreSQL on port {pg.port}; worker logs in {log_dir}")
        databases = {"chaos": pg.url}
        if not args.no_twin:
            databases["twin"] = pg.create_database("twin")
        runs = {}
        for name, url in databases.items():
            started = time.perf_counter()
            runs[name] = asyncio.run(
                chaos.prepare_run(url, secrets, accounts=args.accounts, options=options)
            )
            timings[f"{name}_prepare_s"] = round(time.perf_counter() - started, 1)
            progress(f"{name}: seeded, reported, approved, started ({runs[name][1]} accounts)")
        total = runs["chaos"][1]

        twin = None
        if not args.no_twin:
            env = chaos.worker_env(databases["twin"], secrets_dir)
            seconds = chaos.undisturbed(env, args.workers, log_dir, timeout=args.deadline)
            timings["twin_run_s"] = round(seconds, 1)
            progress(f"twin: {total} accounts in {seconds:.1f} s, undisturbed")
            twin = asyncio.run(chaos.outcome(databases["twin"], runs["twin"][0]))

        done = chaos.unleash(
            pg,
            databases["chaos"],
            chaos.worker_env(databases["chaos"], secrets_dir),
            runs["chaos"][0],
            total,
            log_dir=log_dir,
            workers=args.workers,
            kill_every=args.kill_range,
            max_kills=args.max_kills,
            restart_at=args.restart_at,
            deadline=args.deadline,
            rng=random.Random(args.seed),
            say=progress,
        )
        timings["chaos_run_s"] = round(done.seconds, 1)
        started = time.perf_counter()
        after = asyncio.run(chaos.outcome(databases["chaos"], runs["chaos"][0]))
        timings["checks_s"] = round(time.perf_counter() - started, 1)

    found = []
    if done.timed_out:
        found.append(f"the run did not complete within {args.deadline:.0f} s")
    if done.crashed:
        found += [f"worker {pid} exited {rc} by itself:\n{tail}" for pid, rc, tail in done.crashed]
    if done.restarted_at_settled is None:
        found.append("PostgreSQL was never restarted (the run ended first)")
    if twin is not None:
        found += chaos.problems(after, twin)
        if after.errors != twin.errors:
            found.append(f"{len(after.errors) - len(twin.errors)} failed attempts")
    elif not after.audit_ok:
        found.append(f"the audit chain does not verify: {after.audit_problem}")

    states = Counter(after.states.values())
    once = sum(
        1 for a, s in after.states.items() if s == "migrated" and after.cutovers.get(a) == (1, 1)
    )
    lines = [
        f"accounts seeded: {args.accounts:,} per database; in the run: {total:,}",
        f"run: {after.run_state}; accounts by state: {dict(sorted(states.items()))}",
        f"migrated accounts with exactly one cutover (done): {once:,} of {states['migrated']:,}",
        f"kills: {done.kills} (every {args.kill_range[0]:g}-{args.kill_range[1]:g} s,"
        f" driver seed {args.seed}); workers started: {done.spawned}",
        f"PostgreSQL restarted at {done.restarted_at_settled} settled,"
        f" down and up in {done.restart_seconds:.1f} s",
        f"checksum: {after.checksum}"
        + (
            ""
            if twin is None
            else f" ({'equals' if after.checksum == twin.checksum else 'DIFFERS FROM'} the twin's)"
        ),
        f"audit chain: {'verifies' if after.audit_ok else 'BROKEN'} ({after.audit_checked:,} events)",
        "timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
        f"accounts/s: chaos {total / done.seconds:.1f}"
        + ("" if twin is None else f", undisturbed {total / timings['twin_run_s']:.1f}"),
    ]
    print("\n".join(lines))
    print("CHECKS FAILED:\n- " + "\n- ".join(found) if found else "all checks passed")

    if not args.no_record:
        record = Record(
            benchmark="chaos",
            script="chaos.py",
            argv=argv,
            parameters=harness.parameters(args, "kill_range"),
            machine={
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_average_before": load_before,
            },
            results={
                "passed": not found,
                "accounts_in_run": total,
                "kills": done.kills,
                "chaos_accounts_per_s": round(total / done.seconds, 2),
                **timings,
            },
            runs={"lines": lines, "problems": found, "by_state": dict(states)},
        )
        progress(f"wrote {record.write(args.results)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
