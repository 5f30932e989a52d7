"""Zero downtime at scale (issue #13): applications keep validating and recording usage while a
migration run moves their accounts, against a real `keyshift serve` on a loopback port.

In a fresh PostgreSQL database ``keyshift_zdt_<pid>`` (dropped at the end): seed ``--accounts``
synthetic accounts and create, report, approve and start a run of
``examples/migrations/pro-2023-to-2025.toml`` over every account on ``pro-seat@2023``, as
``runs.py`` does. From the run's accounts take up to ``--pool`` at random, and for each the
(license key, fingerprint) of every activated machine of its active licenses (keys re-derived
from the seed, fingerprints read from the database). Start the server, validate every pair
once (the *sweep*: the pairs answering ``VALID`` are the pool, their entitlements the *old*
ones), read the pool's usage counters, then put on two open-loop streams (``loadgen.py``'s
connection pool): validations of a random pair at ``--validate-rate``, and usage events of a
random pool account at ``--usage-rate`` (meter ``api_access``, a throttled feature of both
plans, 1–3 units, each with its own idempotency key; retried with the same key after a 5xx
or a lost connection). Phases: ``--baseline`` seconds with no run, then ``--workers``
`keyshift worker --until-idle` processes until the run completes (or ``--time-limit``), then
``--after`` seconds more.

Then the checks (``tests/migration/no_downtime.py``, shared with the test of one account):

- **errors**: any answer that is not 2xx, a lost connection, or a validation not ``VALID``
  (every pair was valid before the run);
- **mixed entitlements**: an answer whose entitlements are neither the pair's old set nor its
  new one (its answer in this process, from the database, after the run) whole;
- **stale after the run**: an old answer scheduled more than a second after the workers exited
  (the cutover notifies the servers' caches), and pairs not ``VALID`` after the run;
- **usage**: the counters now = the counters before + the units acknowledged + the counter
  moves of each cutover's ledger row (less each rollback's), per account and meter — units
  lost or counted twice; and event by event, each acknowledged idempotency key stored once,
  none stored unacknowledged.

Reports validation (and usage) latency p50/p99 per phase, measured from each request's
scheduled time, and the run's accounts/s. Prints a table, writes
``results/zero-downtime-<UTC time>.json``, and exits 1 when a check failed.

    .venv/bin/python benchmarks/zero_downtime.py [--accounts 100000] [--workers 2]
        [--pool 10000] [--validate-rate 200] [--usage-rate 20] [--baseline 20] [--after 5]
        [--time-limit S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import loadgen
import orjson
import validation_cache
from checked_load import (
    DRAIN_SECONDS,
    EVENT_PREFIX,
    METER,
    SETTLE_SECONDS,
    Pair,
    Phases,
    UsageEvents,
    Validations,
    latency,
)
from harness import HOST, ROOT, Record, progress

import runs

sys.path.insert(0, str(ROOT))  # the checks live with the tests: tests/migration/no_downtime.py

from tests.migration.no_downtime import (
    AnswerVerdict,
    Findings,
    UsageBalance,
    entitlements_digest,
    read_counter_moves,
    read_counters,
    usage_balance,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--accounts", type=int, default=100_000, help="synthetic accounts to seed")
    add("--workers", type=int, default=2, help="`keyshift worker` processes")
    add("--server-workers", type=int, default=2, help="`keyshift serve` worker processes")
    add("--batch-size", type=int, default=100, help="accounts a worker claims at a time")
    add("--pool", type=int, default=10_000, help="accounts of the run the load picks from")
    add("--validate-rate", type=float, default=200.0, help="validations per second")
    add("--usage-rate", type=float, default=20.0, help="usage events per second")
    add("--connections", type=int, default=8, help="keep-alive connections per stream")
    add("--baseline", type=float, default=20.0, help="seconds of load before the run")
    add("--after", type=float, default=5.0, help="seconds of load after the run")
    add(
        "--time-limit",
        type=float,
        help="stop the workers (SIGTERM) after this many seconds; the checks still run",
    )
    add("--seed", type=int, default=1, help="the load's random seed (the pool, the picks)")
    add("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    add(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server",
    )
    add("--no-record", action="store_true", help="print only; write no JSON result")
    add("--results", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    try:
        args.extra_env = dict(item.split("=", 1) for item in args.server_env)
    except ValueError:
        parser.error("--server-env takes NAME=VALUE")
    if not 1 <= args.accounts <= 1_000_000:
        parser.error("--accounts must be in 1..1,000,000")
    if not 1 <= args.workers <= 16 or not 1 <= args.server_workers <= 16:
        parser.error("--workers and --server-workers must be in 1..16")
    if not 1 <= args.pool <= 1_000_000:
        parser.error("--pool must be in 1..1,000,000")
    if not 0 < args.validate_rate <= 20_000 or not 0 < args.usage_rate <= 20_000:
        parser.error("--validate-rate and --usage-rate must be in (0, 20000]")
    if not 1 <= args.connections <= 256:
        parser.error("--connections must be in 1..256")
    if not 1 <= args.baseline <= 600 or not 1 <= args.after <= 600:
        parser.error("--baseline and --after must be in 1..600 seconds")
    if args.after <= SETTLE_SECONDS:
        parser.error(f"--after must be longer than {SETTLE_SECONDS:g} s")
    return args


# -- the pool: (key, fingerprint) pairs of the run's accounts -------------------------------------


def synthetic_key(external_ref: str, license_id: str) -> str:
    """A synthetic license's plaintext key, from its account's ``sim-<seed>-<index>`` and its
    id (``keyshift.simulation.synthetic``: both derived from the seed)."""
    from keyshift.simulation.synthetic import license_key, synthetic_id

    _, seed, index = external_ref.split("-")
    for number in range(16):
        if synthetic_id(int(seed), "license", int(index), number) == license_id:
            return license_key(int(seed), int(index), number)
    raise ValueError(f"license {license_id} is not a synthetic license of {external_ref}")


async def read_pool(url: str, run_id: str, size: int, rng: random.Random) -> list[Pair]:
    """Every (key, fingerprint) of an active license of an active account of the run, for
    ``size`` of its accounts chosen at random."""
    from sqlalchemy import select

    from keyshift.db.engine import Database
    from keyshift.db.tables import Account, Activation, License, RunAccount

    db = Database(url)
    try:
        async with db.transaction() as session:
            rows = (
                await session.execute(
                    select(Account.id, Account.external_ref, License.id, Activation.fingerprint)
                    .join(RunAccount, RunAccount.account_id == Account.id)
                    .join(License, License.account_id == Account.id)
                    .join(Activation, Activation.license_id == License.id)
                    .where(
                        RunAccount.run_id == run_id,
                        Account.status == "active",
                        License.status == "active",
                    )
                    .order_by(Account.id, License.id, Activation.fingerprint)
                )
            ).all()
    finally:
        await db.dispose()
    accounts = sorted({row[0] for row in rows})
    chosen = set(rng.sample(accounts, min(size, len(accounts))))
    return [
        Pair(account_id, synthetic_key(ref, license_id), fingerprint)
        for account_id, ref, license_id, fingerprint in rows
        if account_id in chosen
    ]


# -- the run under load --------------------------------------------------------------------------


@dataclass
class Loaded:
    """What the load saw, and what the run did meanwhile."""

    validations: Validations
    usage: UsageEvents
    before: Counter[tuple[str, str]]
    phase_seconds: dict[str, float]
    cpu: dict[str, dict[str, float]]
    cache_hit_ratio: dict[str, float | None]
    run_seconds: float
    workers: list[runs.Worker]
    undrained: dict[str, int] = field(default_factory=dict)


def cpu_of(sampled: dict[str, float], own: float, wall: float) -> dict[str, float]:
    """``harness.cpu_sampled``'s split, its "generator" (this script's reaped children: the
    run's workers) named as such, and this process (the load generator) out of "other". Its
    "postgres" counts the bench database's backends alive at the phase's end: the workers'
    backends exit with them, so their CPU is under "other" (with other people's work)."""
    out = dict(sampled)
    out["workers"] = out.pop("generator")
    out["load_generator"] = round(own / max(1e-9, wall), 3)
    out["other"] = round(max(0.0, out["other"] - out["load_generator"]), 3)
    return out


async def under_load(
    args: argparse.Namespace, bench: harness.Bench, pairs: list[Pair], env: dict[str, str]
) -> Loaded:
    assert bench.server is not None
    port, rng, phases = bench.server.port, random.Random(args.seed), Phases()
    validations = Validations(port, phases, rng, pairs)
    await validations.open(args.connections)
    progress(f"sweep: validating each of {len(pairs):,} (key, fingerprint) pairs once")
    await validations.run_sweep()
    codes = Counter(code for code, _ in validations.swept.values())
    progress(f"  answers: {dict(codes)}; {len(validations.live):,} valid pairs in the load")
    if not validations.live:
        raise SystemExit("no pair validated before the run: nothing to measure")
    key_of: dict[str, str] = {}  # one license key per account
    for index in validations.live:
        key_of.setdefault(pairs[index].account_id, pairs[index].key)
    usage = UsageEvents(port, phases, rng, sorted(key_of.items()))
    await usage.open(args.connections)

    from keyshift.db.engine import Database

    db = Database(bench.driver_url)
    try:
        before = await read_counters(db, set(key_of))
    finally:
        await db.dispose()

    stop = asyncio.Event()
    start = phases.begin("baseline", time.perf_counter() + 0.05)
    senders = [
        asyncio.create_task(loadgen.send_at_rate(s, start, 1 / rate, sys.maxsize, stop))
        for s, rate in ((validations, args.validate_rate), (usage, args.usage_rate))
    ]
    cpu: dict[str, dict[str, float]] = {}
    phase_seconds: dict[str, float] = {}
    hits: dict[str, float | None] = {}  # the servers' validation cache hit ratio

    async def phase(name: str, work: Any) -> Any:
        began, own = time.perf_counter(), time.process_time()
        if name != "baseline":
            phases.begin(name, began)
        counts = await asyncio.to_thread(validation_cache.cache_counts, bench)
        with harness.cpu_sampled(bench) as sampled:
            result = await work
        wall = time.perf_counter() - began
        phase_seconds[name] = round(wall, 2)
        cpu[name] = cpu_of(sampled, time.process_time() - own, wall)
        after = await asyncio.to_thread(validation_cache.cache_counts, bench)
        hits[name] = validation_cache.hit_ratio(counts, after)
        return result

    progress(f"baseline: {args.baseline:g} s of load, no run")
    await phase("baseline", asyncio.sleep(max(0.0, start + args.baseline - time.perf_counter())))
    progress(f"during: {args.workers} worker(s) until the run completes")
    commands = [runs.WORKER_COMMAND] * args.workers
    run_seconds, workers = await phase(
        "during",
        asyncio.to_thread(
            runs.run_workers, commands, env, profiled=False, time_limit=args.time_limit
        ),
    )
    progress(f"after: {args.after:g} s of load, the run over")
    await phase("after", asyncio.sleep(args.after))
    stop.set()
    await asyncio.gather(*senders)
    await usage.send_retries()
    undrained = {}
    for name, stream in (("validate", validations), ("usage", usage)):
        await stream.drain(DRAIN_SECONDS)
        undrained[name] = stream.outstanding
        stream.close()
    return Loaded(
        validations, usage, before, phase_seconds, cpu, hits, run_seconds, workers, undrained
    )


# -- the checks ----------------------------------------------------------------------------------


async def references_after(
    url: str, secrets_dir: Path, pairs: list[Pair], live: list[int]
) -> dict[int, tuple[str, str]]:
    """Each live pair validated in this process, from the database (no server cache): its
    code and the digest of its entitlements, the *new* ones."""
    from keyshift.db.engine import Database
    from keyshift.security.secrets_store import ensure_secrets
    from keyshift.validation import service as validation

    secrets, _ = ensure_secrets(secrets_dir)
    db = Database(url)
    try:
        out = {}
        for index in live:
            pair = pairs[index]
            result = await validation.validate(
                db.transaction,
                secrets.keyring,
                secrets.signing,
                key=pair.key,
                fingerprint=pair.fingerprint,
            )
            answer = orjson.loads(result.body)
            out[index] = (answer["code"], entitlements_digest(answer["entitlements"]))
        return out
    finally:
        await db.dispose()


@dataclass(frozen=True)
class UsageFindings:
    balance: UsageBalance
    events_lost: int  # acknowledged, not stored
    events_unacknowledged: int  # stored, never acknowledged


async def usage_findings(url: str, loaded: Loaded) -> UsageFindings:
    from sqlalchemy import select

    from keyshift.db.engine import Database
    from keyshift.db.tables import UsageEvent

    accounts = {account for account, _ in loaded.usage.accounts}
    acknowledged: Counter[tuple[str, str]] = Counter()
    for account_id, counted in loaded.usage.acknowledged.values():
        acknowledged[(account_id, METER)] += counted
    db = Database(url)
    try:
        moves = await read_counter_moves(db, accounts)
        after = await read_counters(db, accounts)
        async with db.transaction() as session:
            stored = set(
                (
                    await session.execute(
                        select(UsageEvent.idempotency_key).where(
                            UsageEvent.idempotency_key.like(f"{EVENT_PREFIX}%")
                        )
                    )
                ).scalars()
            )
    finally:
        await db.dispose()
    acked = set(loaded.usage.acknowledged)
    return UsageFindings(
        balance=usage_balance(loaded.before, acknowledged, moves, after),
        events_lost=len(acked - stored),
        events_unacknowledged=len(stored - acked),
    )


def answer_verdict(
    loaded: Loaded, after: dict[int, tuple[str, str]]
) -> tuple[AnswerVerdict, int, int]:
    """The verdict on every answer; answers still old after the run settled; pairs no longer
    valid after the run."""
    v = loaded.validations
    old = {i: digest for i, (_, digest) in v.swept.items()}
    new = {i: digest for i, (_, digest) in after.items()}
    stale = sum(1 for i, digest in v.settled if digest != new[i])
    invalid = sum(1 for code, _ in after.values() if code != "VALID")
    return v.log.verdict(old, new), stale, invalid


# -- the command ---------------------------------------------------------------------------------


def summarise(
    args: argparse.Namespace,
    loaded: Loaded,
    verdict: AnswerVerdict,
    stale: int,
    invalid_after: int,
    usage: UsageFindings,
    outcome: dict[str, Any],
    total: int,
    pairs: list[Pair],
) -> tuple[dict[str, Any], list[str]]:
    v, u = loaded.validations, loaded.usage
    errors: Counter[str] = Counter()
    for stream, name in ((v, "validate"), (u, "usage")):
        for (phase, problem), count in stream.failures.items():
            errors[f"{name}, {phase}: {problem}"] += count
        if loaded.undrained.get(name):
            errors[f"{name}: unanswered at the end"] += loaded.undrained[name]
    errors.update({"usage: given up after retries": len(u.given_up)} if u.given_up else {})
    migrated = outcome["by_state"].get("migrated", 0)
    stopped = args.time_limit is not None and loaded.run_seconds > args.time_limit
    phases = ("baseline", "during", "after")
    results: dict[str, Any] = {
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "mixed_entitlements": verdict.mixed,
        "mixed_examples": [list(e) for e in verdict.mixed_examples],
        "stale_after_run": stale,
        "not_valid_after_run": invalid_after,
        "usage_units_lost": usage.balance.lost,
        "usage_units_extra": usage.balance.extra,
        "usage_accounts_off": len(usage.balance.off),
        "usage_events_lost": usage.events_lost,
        "usage_events_unacknowledged": usage.events_unacknowledged,
        "usage_events_acknowledged": len(u.acknowledged),
        "usage_units_acknowledged": sum(c for _, c in u.acknowledged.values()),
        "answers": {
            "total": verdict.answers,
            "old": verdict.old,
            "new": verdict.new,
            "back_to_old": verdict.back_to_old,
            "pairs_seen_both": verdict.subjects_seen_both,
        },
        "validate_latency": {p: latency(v.latencies[p]) for p in phases},
        "usage_latency": {p: latency(u.latencies[p]) for p in phases},
        "phase_seconds": loaded.phase_seconds,
        "cpu_cores": loaded.cpu,
        "cache_hit_ratio": {
            name: None if ratio is None else round(ratio, 4)
            for name, ratio in loaded.cache_hit_ratio.items()
        },
        "run": {
            "accounts_seeded": args.accounts,
            "accounts_in_run": total,
            "migrated": migrated,
            "by_state": outcome["by_state"],
            "state": str(outcome["state"]),
            "seconds": round(loaded.run_seconds, 2),
            "accounts_per_s": round(migrated / loaded.run_seconds, 1) if migrated else 0.0,
            "stopped_at_time_limit": stopped,
            "worker_exit_codes": [w.exit_code for w in loaded.workers],
        },
        "pool": {
            "accounts": len({p.account_id for p in pairs}),
            "pairs": len(pairs),
            "valid_pairs": len(v.live),
            "sweep_codes": dict(Counter(code for code, _ in v.swept.values())),
        },
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    findings = Findings(
        errors=errors,
        answers=verdict,
        usage=usage.balance,
        stale_after=stale,
        invalid_after=invalid_after,
        events_lost=usage.events_lost,
        events_unacknowledged=usage.events_unacknowledged,
    )
    problems = findings.problems()
    if not v.latencies["during"] or not u.latencies["during"]:
        problems.append("no load was answered during the run")
    if any(w.exit_code != 0 for w in loaded.workers):
        problems.append(f"workers exited with {[w.exit_code for w in loaded.workers]}")
    if not stopped and str(outcome["state"]) != "completed":
        problems.append(f"the run ended {outcome['state']}, not completed")
    return results, problems


def render(results: dict[str, Any], problems: list[str]) -> str:
    lines = [
        "| phase | seconds | validations | p50 ms | p99 ms | cache hits | usage events"
        " | p50 ms | p99 ms | cores: server / run workers / whole machine |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for phase in ("baseline", "during", "after"):
        v, u = results["validate_latency"][phase], results["usage_latency"][phase]
        hits = results["cache_hit_ratio"].get(phase)
        cpu = results["cpu_cores"].get(phase, {})
        cores = " / ".join(str(cpu.get(k, "—")) for k in ("server", "workers", "all"))
        lines.append(
            f"| {phase} | {results['phase_seconds'].get(phase, '—')} | {v['count']:,}"
            f" | {v['p50_ms']} | {v['p99_ms']} | {'—' if hits is None else f'{hits:.1%}'}"
            f" | {u['count']:,} | {u['p50_ms']} | {u['p99_ms']} | {cores} |"
        )
    run, answers = results["run"], results["answers"]
    lines += [
        "",
        f"run: {run['migrated']:,} of {run['accounts_in_run']:,} accounts migrated"
        f" ({run['accounts_seeded']:,} seeded) in {run['seconds']} s: {run['accounts_per_s']}"
        f" accounts/s; {run['state']}"
        + (" (stopped at the time limit)" if run["stopped_at_time_limit"] else "")
        + f"; by state {run['by_state']}",
        f"pool: {results['pool']['valid_pairs']:,} valid (key, fingerprint) pairs of"
        f" {results['pool']['accounts']:,} accounts",
        "",
        "| check | found | target |",
        "| --- | ---: | ---: |",
        f"| errors (non-2xx, lost connections, not VALID) | {results['errors']} | 0 |",
        f"| answers with mixed entitlements | {results['mixed_entitlements']} | 0 |",
        f"| answers still old > {SETTLE_SECONDS:g} s after the run | {results['stale_after_run']}"
        " | 0 |",
        f"| pairs not valid after the run | {results['not_valid_after_run']} | 0 |",
        f"| usage units lost / extra | {results['usage_units_lost']}"
        f" / {results['usage_units_extra']} | 0 / 0 |",
        f"| usage events lost / stored unacknowledged | {results['usage_events_lost']}"
        f" / {results['usage_events_unacknowledged']} | 0 / 0 |",
        "",
        f"answers: {answers['total']:,} ({answers['old']:,} old, {answers['new']:,} new,"
        f" {answers['back_to_old']} old again after new); {answers['pairs_seen_both']:,} pairs"
        f" seen answering old, then new; usage: {results['usage_events_acknowledged']:,} events"
        f" ({results['usage_units_acknowledged']:,} units) acknowledged",
    ]
    lines.append("CHECKS FAILED:\n- " + "\n- ".join(problems) if problems else "all checks passed")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    name = f"keyshift_zdt_{os.getpid()}"
    with harness.bench_run(args.pg_url, name, needs_wrk=False) as bench:
        harness.pg(args.pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        harness.pg(args.pg_url, f'CREATE DATABASE "{name}"')
        machine = harness.machine(args.pg_url)
        secrets_dir = bench.tmp / "secrets"
        progress(f"seeding {args.accounts:,} accounts; creating, reporting, approving the run")
        prepared = time.perf_counter()
        run_id, total = asyncio.run(
            runs.prepare(bench.driver_url, secrets_dir, args.accounts, args.batch_size)
        )
        prepare_seconds = round(time.perf_counter() - prepared, 1)
        pairs = asyncio.run(
            read_pool(bench.driver_url, run_id, args.pool, random.Random(args.seed))
        )
        progress(f"run {run_id}: {total:,} accounts; {len(pairs):,} pairs in the pool")
        bench.server = harness.start_server(
            args.server_workers, bench.driver_url, secrets_dir, bench.tmp, args.extra_env
        )
        progress(f"server up on {HOST}:{bench.server.port}")
        env = runs.worker_env(bench.driver_url, secrets_dir)
        loaded = run_event_loop(under_load(args, bench, pairs, env))
        bench.server.stop()
        bench.server = None
        progress("checking: the new entitlements from the database, the usage counters, the ledger")
        after = asyncio.run(
            references_after(bench.driver_url, secrets_dir, pairs, loaded.validations.live)
        )
        verdict, stale, invalid_after = answer_verdict(loaded, after)
        usage = asyncio.run(usage_findings(bench.driver_url, loaded))
        outcome = asyncio.run(runs.outcome(bench.driver_url, run_id))
        results, problems = summarise(
            args, loaded, verdict, stale, invalid_after, usage, outcome, total, pairs
        )
        results["prepare_seconds"] = prepare_seconds
        results["passed"] = not problems
        print(render(results, problems))
        if not args.no_record:
            record = Record(
                benchmark="zero-downtime",
                script="zero_downtime.py",
                argv=argv,
                parameters=harness.parameters(args, "extra_env"),
                machine=machine,
                results=results,
                runs={
                    "problems": problems,
                    "usage_off": [
                        [*key, off] for key, off in list(usage.balance.off.items())[:100]
                    ],
                },
            )
            progress(f"wrote {record.write(args.results)}")
    return 1 if problems else 0


def run_event_loop(work: Any) -> Any:
    """``work`` on uvloop when installed (the load generator's CPU per request is lower)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(work)
    return uvloop.run(work)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
