"""Benchmark usage ingest on PostgreSQL: ``POST /v1/usage`` (one event per request) and
``POST /v1/usage/batch`` (100 and 1,000 events per request), against ``pgbench`` on the same
database in the same run.

What it does, all on this machine and all on loopback (127.0.0.1):

1. creates a fresh PostgreSQL database ``keyshift_ingest_<pid>`` (dropped at the end) and a
   temporary secrets directory; migrates; publishes a usage plan with one ``sum`` meter
   (``allow``, so nothing is refused and no notice fires) and issues ``--accounts`` licenses,
   one account each;
2. starts ``python -m keyshift.cli serve --workers N`` on a free loopback port, with
   ``KEYSHIFT_MAX_BODY_BYTES`` raised so that 1,000-event batches fit; checks that one event
   and one batch answer 200;
3. in each of ``--repeats`` rounds, for every scenario in turn, drives the server with ``wrk``
   (closed loop, a generated Lua script: a random one of the license keys per request and
   fresh idempotency keys, so every event is new) for ``--duration`` seconds;
4. then, as many rounds of ``pgbench`` on the same database: the TPC-B default (the
   database's write-transaction ceiling) and a custom script that inserts 1,000
   event-shaped rows per transaction into a copy of ``usage_events`` (same columns and
   indexes: the database's ceiling for the rows a batch writes). After the ingest rounds,
   because the gigabytes pgbench writes (and the checkpoints after them) would slow the
   ingest rounds that follow;
5. checks that the database holds as many events as the counters say (counted once);
6. prints medians and min–max over the rounds, the ratios to pgbench, and appends a dated
   section to ``docs/benchmarks.md`` (``--no-record`` to skip).

Every load is bounded (``--duration`` per measurement) and the script stops by itself. About
6 minutes with the defaults.

    .venv/bin/python benchmarks/ingest.py [--workers 2] [--duration 10] [--repeats 3]
        [--pg-url postgresql://postgres@127.0.0.1:5432/test] [--profile DIR] [--no-record]

It uses the server, CPU-accounting and reporting helpers of ``benchmarks/harness.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402  (the helpers both benchmark scripts share)

DOCS = HERE.parent / "docs" / "benchmarks.md"
HOST = harness.HOST
METER = "api_calls"
PGBENCH_ROWS = 1000  # rows per transaction of the insert script


@dataclass(frozen=True)
class Scenario:
    label: str
    batch: int  # events per request; 0 = the single-event endpoint
    connections: int

    @property
    def path(self) -> str:
        return "/v1/usage" if self.batch == 0 else "/v1/usage/batch"

    @property
    def events_per_request(self) -> int:
        return max(1, self.batch)


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark usage ingest against pgbench.")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--accounts", type=int, default=200, help="accounts (one license each)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (>= 3 for a spread)")
    parser.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="an admin URL of the PostgreSQL server (the bench database is created beside it)",
    )
    parser.add_argument(
        "--scenarios",
        default="single:1:16,batch100:100:8,batch1000:1000:8",
        help="label:events-per-request:connections, comma-separated (1 event = POST /v1/usage)",
    )
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--pgbench-duration", type=float, default=15.0, help="seconds per run")
    parser.add_argument("--no-pgbench", action="store_true", help="skip the pgbench runs")
    harness.add_load_arguments(parser, quiet_wait=10.0)
    parser.add_argument(
        "--gc-freeze",
        type=float,
        metavar="SECONDS",
        help="experiment: SECONDS after each worker starts, move every object it has to the "
        "GC's permanent generation (what gc.freeze() at worker start would do)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="also record a py-spy profile of the workers under the last scenario's load",
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to the docs")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the markdown file to append to")
    args = parser.parse_args(argv)
    try:
        args.scenario_list = [
            Scenario(label, int(batch) if int(batch) > 1 else 0, int(connections))
            for label, batch, connections in (s.split(":") for s in args.scenarios.split(","))
        ]
        args.extra_env = dict(item.split("=", 1) for item in args.server_env)
    except ValueError:
        parser.error("--scenarios takes label:events:connections; --server-env NAME=VALUE")
    if not 1 <= args.workers <= 16:
        parser.error("--workers must be in 1..16")
    if not 1 <= args.accounts <= 100_000:
        parser.error("--accounts must be in 1..100000")
    if not 1 <= args.duration <= 120 or not 1 <= args.pgbench_duration <= 120:
        parser.error("--duration and --pgbench-duration must be in 1..120 seconds")
    if not 1 <= args.repeats <= 10:
        parser.error("--repeats must be in 1..10")
    for s in args.scenario_list:
        if not 0 <= s.batch <= 1000 or not 1 <= s.connections <= 256:
            parser.error("a scenario has 1..1000 events per request and 1..256 connections")
    return args


# --------------------------------------------------------------------------- database setup

EDITION = {
    "edition": {"key": "ingest", "version": "1", "name": "Ingest benchmark edition"},
    "features": {"export": "enabled"},
}
PLAN = {
    "plan": {
        "key": "ingest-usage",
        "version": "1",
        "name": "Ingest benchmark usage plan",
        "edition": "ingest@1",
    },
    "licensing": {"model": "usage"},
    "term": {"length": "1y", "grace_period": "7d"},
    "meters": [
        {"key": METER, "unit": "call", "included": 10**12, "overage": "allow"},
    ],
}


async def seed(db_url: str, secrets_dir: Path, accounts: int) -> list[str]:
    """Migrate, publish the plan, issue one license per account; returns the plaintext keys."""
    from keyshift.catalog.manifests import Edition, Plan
    from keyshift.catalog.service import Manifest, publish
    from keyshift.context import SYSTEM
    from keyshift.db.engine import Database
    from keyshift.db.migrate import upgrade_to_head
    from keyshift.licensing import service as licensing
    from keyshift.security.secrets_store import ensure_secrets

    secrets, _ = ensure_secrets(secrets_dir)
    db = Database(db_url)
    try:
        await upgrade_to_head(db.engine)
        async with db.transaction() as session:
            await publish(
                session,
                SYSTEM,
                [
                    Manifest("edition", Edition.model_validate(EDITION), "benchmarks/ingest.py"),
                    Manifest("plan", Plan.model_validate(PLAN), "benchmarks/ingest.py"),
                ],
            )
        keys: list[str] = []
        async with db.transaction() as session:
            for n in range(accounts):
                account = await licensing.create_account(session, SYSTEM, name=f"ingest {n}")
                await licensing.subscribe(session, SYSTEM, account.id, "ingest-usage@1")
                issued = await licensing.issue_license(
                    session, SYSTEM, secrets.keyring, account_id=account.id
                )
                keys.append(issued.key)
        return keys
    finally:
        await db.dispose()


async def checkpoint_count(db_url: str) -> int:
    """Checkpoints the PostgreSQL server has started (anyone's: a CREATE or DROP DATABASE of
    other people's tests forces one). After each, the first change to every page writes the
    whole page to the WAL, so PostgreSQL's CPU per event rises for a while."""
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        value = await conn.fetchval(
            "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
        )
    finally:
        await conn.close()
    return int(value)


async def stored_totals(db_url: str) -> dict[str, int]:
    """Events stored, the sum of their quantities and the sum of the counters."""
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        events, quantity = await conn.fetchrow(
            "SELECT count(*), coalesce(sum(quantity), 0) FROM usage_events"
        )
        counters = await conn.fetchval("SELECT coalesce(sum(used), 0) FROM usage_counters")
    finally:
        await conn.close()
    return {"events": int(events), "quantity": int(quantity), "counters": int(counters)}


# --------------------------------------------------------------------------- CPU accounting


def database_pids(database: str) -> list[int]:
    """PostgreSQL processes working for ``database`` alone: its backends and autovacuum
    workers (their command line names it). The server's shared background processes (WAL
    writer, checkpointer …) and other databases' backends (other people's tests on a shared
    machine) count as "other"."""
    ours = []
    for pid in harness.postgres_pids():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if f" {database} ".encode() in command:
            ours.append(pid)
    return ours


@dataclass
class Cpu:
    wall: float
    server: dict[int, float]
    postgres: dict[int, float]
    generator: float
    busy: float


def cpu_snapshot(server: harness.Server, database: str) -> Cpu:
    pids = [server.process.pid, *server.worker_pids()]
    return Cpu(
        wall=time.monotonic(),
        server={p: harness.proc_cpu_seconds(p) for p in pids},
        postgres={p: harness.proc_cpu_seconds(p) for p in database_pids(database)},
        generator=harness.children_cpu(),
        busy=harness.system_busy_seconds()[0],
    )


def cpu_usage(before: Cpu, after: Cpu) -> dict[str, float]:
    """Cores used by the server, this database's PostgreSQL backends, the load generator
    (wrk, pgbench: waited-for children) and everything else. A pgbench client's backend
    exits before the second snapshot, so during pgbench its CPU shows under "other"."""
    wall = max(1e-9, after.wall - before.wall)

    def delta(a: dict[int, float], b: dict[int, float]) -> float:
        return sum(v - a.get(p, 0.0) for p, v in b.items())

    used = {
        "server": delta(before.server, after.server) / wall,
        "postgres": delta(before.postgres, after.postgres) / wall,
        "generator": (after.generator - before.generator) / wall,
        "all": (after.busy - before.busy) / wall,
    }
    used["other"] = max(0.0, used["all"] - used["server"] - used["postgres"] - used["generator"])
    return {k: round(v, 3) for k, v in used.items()}


# --------------------------------------------------------------------------- load: wrk

WRK_SCRIPT = """\
-- generated by benchmarks/ingest.py
local path, batch, tag, keys_file = "%(path)s", %(batch)d, "%(tag)s", "%(keys_file)s"
local keys = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
end

function init(args)
  math.randomseed(os.time() * 1000 + (thread_id or 0))
  for line in io.lines(keys_file) do keys[#keys + 1] = line end
  seq = 0
end

-- Every request carries fresh idempotency keys: tag-thread-request[-event].
function request()
  seq = seq + 1
  local key = keys[math.random(#keys)]
  local prefix = tag .. "-" .. thread_id .. "-" .. seq
  local body
  if batch == 0 then
    body = '{"key":"' .. key .. '","meter":"%(meter)s","quantity":1,"idempotency_key":"'
      .. prefix .. '"}'
  else
    local events = {}
    for i = 1, batch do
      events[i] = '{"meter":"%(meter)s","quantity":1,"idempotency_key":"' .. prefix .. "-"
        .. i .. '"}'
    end
    body = '{"key":"' .. key .. '","events":[' .. table.concat(events, ",") .. ']}'
  end
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'KSJSON {"requests":%%d,"duration_us":%%d,"status_errors":%%d,' ..
    '"socket_errors":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def write_wrk_script(scenario: Scenario, tag: str, keys_file: Path, directory: Path) -> Path:
    path = directory / f"wrk-{tag}.lua"
    path.write_text(
        WRK_SCRIPT
        % {
            "path": scenario.path,
            "batch": scenario.batch,
            "tag": tag,
            "keys_file": keys_file,
            "meter": METER,
        }
    )
    return path


@dataclass(frozen=True)
class Bench:
    """What every measurement needs: the server, its database and the keys to present."""

    server: harness.Server
    database: str
    plain_url: str
    keys_file: Path
    tmp: Path
    wrk_threads: int


def run_scenario(bench: Bench, scenario: Scenario, tag: str, duration: float) -> dict[str, Any]:
    """wrk on one scenario for ``duration`` s: events/s, latency per request, CPU split, and
    the CPU milliseconds the server and PostgreSQL spent per 1,000 events."""
    script = write_wrk_script(scenario, tag, bench.keys_file, bench.tmp)
    connections = scenario.connections
    command = [
        "wrk",
        f"-t{min(bench.wrk_threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://{HOST}:{bench.server.port}",
    ]
    checkpoints = asyncio.run(checkpoint_count(bench.plain_url))
    before = cpu_snapshot(bench.server, bench.database)
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    after = cpu_snapshot(bench.server, bench.database)
    checkpoints = asyncio.run(checkpoint_count(bench.plain_url)) - checkpoints
    match = re.search(r"^KSJSON (.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    ok = raw["requests"] - raw["status_errors"]
    cpu = cpu_usage(before, after)
    events = ok * scenario.events_per_request
    per_thousand = 1000 * seconds / max(1, events) * 1000  # ms of one core per 1,000 events
    return {
        "rps": round(ok / seconds, 1),
        "events_per_s": round(events / seconds, 1),
        "requests": raw["requests"],
        "non_2xx": raw["status_errors"],
        "socket_errors": raw["socket_errors"],
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "cpu": cpu,
        "server_ms_per_1000": round(cpu["server"] * per_thousand, 1),
        "postgres_ms_per_1000": round(cpu["postgres"] * per_thousand, 1),
        "checkpoints": checkpoints,
    }


# --------------------------------------------------------------------------- pgbench

PGBENCH_INSERT = """\
-- generated by benchmarks/ingest.py: one transaction writes %(rows)d event-shaped rows
\\set run random(1, 1000000000000)
INSERT INTO bench_usage_events (id, account_id, license_id, meter, quantity, member_hash,
    occurred_at, received_at, period_start, idempotency_key, idempotency_expires_at,
    request_hash, actor, response)
SELECT gen_random_uuid()::text, 'pgbench-account-' || :client_id, NULL, 'api_calls', 1, NULL,
    now(), now(), date_trunc('month', now()), 'pg-' || :run || '-' || g,
    now() + interval '72 hours', md5(g::text) || md5(:run::text), 'license:pgbench',
    jsonb_build_object('id', gen_random_uuid()::text, 'account_id', 'pgbench-account',
        'license_id', 'pgbench-license', 'meter', 'api_calls', 'quantity', 1, 'counted', 1,
        'occurred_at', now()::text, 'received_at', now()::text,
        'period', jsonb_build_object('start', now()::text, 'end', now()::text),
        'used', g, 'included', 1000000000000, 'remaining', 1000000000000 - g,
        'policy', 'allow', 'over', false, 'overage_flagged', false, 'notices', '[]'::jsonb)
FROM generate_series(1, %(rows)d) AS g
ON CONFLICT (account_id, idempotency_key) DO NOTHING;
"""


def pgbench_binary() -> str | None:
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"))
    return str(candidates[-1]) if candidates else None


def pgbench_prepare(plain_url: str, tmp: Path, clients: int) -> Path | None:
    """``pgbench -i`` at a scale of one branch per client (TPC-B's updates of the branch row
    would otherwise serialise the clients), and a copy of ``usage_events`` for the insert
    script; returns the script's path."""
    binary = pgbench_binary()
    if binary is None:
        return None
    init = subprocess.run(
        [binary, "-i", "-s", str(clients), "-q", plain_url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if init.returncode != 0:
        print(f"pgbench -i failed, pgbench skipped: {init.stderr.strip()}", file=sys.stderr)
        return None
    copy = subprocess.run(
        [
            "psql",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            plain_url,
            "-c",
            "CREATE TABLE bench_usage_events (LIKE usage_events INCLUDING ALL)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if copy.returncode != 0:
        print(f"copying usage_events failed: {copy.stderr.strip()}", file=sys.stderr)
        return None
    script = tmp / "pgbench-insert.sql"
    script.write_text(PGBENCH_INSERT % {"rows": PGBENCH_ROWS})
    return script


def run_pgbench(bench: Bench, script: Path | None, duration: float) -> dict[str, Any] | None:
    """One pgbench run: the TPC-B default when ``script`` is None, else the insert script."""
    binary = pgbench_binary()
    assert binary is not None
    seconds = max(1, round(duration))
    command = [binary, "-n", "-c", "8", "-j", "2", "-T", str(seconds)]
    if script is not None:
        command += ["-f", str(script)]
    before = cpu_snapshot(bench.server, bench.database)
    run = subprocess.run(
        [*command, bench.plain_url], capture_output=True, text=True, timeout=seconds + 120
    )
    after = cpu_snapshot(bench.server, bench.database)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", run.stdout)
    latency = re.search(r"latency average = ([\d.]+) ms", run.stdout)
    if run.returncode != 0 or not tps:
        print(f"pgbench failed: {run.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    rows = PGBENCH_ROWS if script is not None else 1
    return {
        "tps": float(tps.group(1)),
        "rows_per_s": float(tps.group(1)) * rows,
        "latency_ms": float(latency.group(1)) if latency else None,
        "cpu": cpu_usage(before, after),
    }


# --------------------------------------------------------------------------- profile


def profile_workers(
    bench: Bench, scenario: Scenario, args: argparse.Namespace
) -> dict[str, Any] | None:
    """py-spy (if installed) on the workers while wrk drives ``scenario``."""
    seconds = max(2, round(args.duration))
    return harness.profile_while(
        bench.server.process.pid,
        args.profile,
        f"ingest-{scenario.label}-profile",
        seconds,
        lambda: run_scenario(bench, scenario, f"prof{os.getpid()}", seconds),
    )


# --------------------------------------------------------------------------- the run


@dataclass
class Results:
    machine: dict[str, str] = field(default_factory=dict)
    ingest: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    tpcb: list[dict[str, Any]] = field(default_factory=list)
    inserts: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    profile: dict[str, Any] | None = None


def measure(args: argparse.Namespace, bench: Bench) -> Results:
    results = Results()
    progress = harness.progress
    progress("warm-up (unrecorded): 3 s of each scenario")
    for scenario in args.scenario_list:
        run_scenario(bench, scenario, f"w{scenario.label}", 3)
    for round_ in range(args.repeats):
        # Alternate the order every round, so a drift in background load spreads evenly.
        scenarios = args.scenario_list if round_ % 2 == 0 else args.scenario_list[::-1]
        for scenario in scenarios:
            background = harness.wait_for_quiet(args.quiet_threshold, args.quiet_wait)
            tag = f"r{round_}{scenario.label}"
            result = run_scenario(bench, scenario, tag, args.duration)
            result["background_before"] = background
            results.ingest.setdefault(scenario.label, []).append(result)
            progress(
                f"{scenario.label:10} round {round_ + 1}: {result['events_per_s']:>9,.0f} "
                f"events/s ({result['rps']:,.0f} req/s)  p50 {result['p50_ms']:.2f} ms  "
                f"p99 {result['p99_ms']:.2f} ms  non-2xx {result['non_2xx']}  "
                f"cpu {result['cpu']}  ms/1000 events: server {result['server_ms_per_1000']} "
                f"pg {result['postgres_ms_per_1000']}  checkpoints {result['checkpoints']}"
            )
    if args.profile:
        last = args.scenario_list[-1]
        progress(f"py-spy profile of the workers under {last.label} load")
        results.profile = profile_workers(bench, last, args)
    # pgbench after every ingest round, not between them: its -i and its inserts write
    # gigabytes into the same database (and the checkpoints after them make every page
    # touched again cost a full-page image), which would land in the ingest rounds.
    script = None
    if not args.no_pgbench:
        progress("pgbench -i and a copy of usage_events for the insert script")
        script = pgbench_prepare(bench.plain_url, bench.tmp, clients=8)
    for round_ in range(args.repeats if script is not None else 0):
        runs = (("TPC-B", None, results.tpcb), ("insert", script, results.inserts))
        for label, bench_script, sink in runs if round_ % 2 == 0 else runs[::-1]:
            harness.wait_for_quiet(args.quiet_threshold, args.quiet_wait)
            run = run_pgbench(bench, bench_script, args.pgbench_duration)
            if run is None:
                continue
            sink.append(run)
            progress(
                f"pgbench {label:6} round {round_ + 1}: {run['tps']:>9,.0f} tps "
                f"({run['rows_per_s']:,.0f} rows/s)  latency {run['latency_ms']} ms  "
                f"cpu {run['cpu']}"
            )
    return results


def check_sample(port: int, key: str) -> str | None:
    """One event and one batch of 3 must be accepted; returns a problem or None."""
    single = {"key": key, "meter": METER, "quantity": 1, "idempotency_key": "probe-0"}
    status, body = harness.http("POST", port, "/v1/usage", single)
    if status != 200 or json.loads(body).get("counted") != 1:
        return f"POST /v1/usage answered {status}: {body[:300]!r}"
    events = [{"meter": METER, "quantity": 1, "idempotency_key": f"probe-{i}"} for i in range(1, 4)]
    status, body = harness.http("POST", port, "/v1/usage/batch", {"key": key, "events": events})
    if status != 200 or json.loads(body).get("count") != 3:
        return f"POST /v1/usage/batch answered {status}: {body[:300]!r}"
    return None


# --------------------------------------------------------------------------- the report

TARGET = 20_000  # events/s, batched (issue #4)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def render(args: argparse.Namespace, results: Results, argv: list[str]) -> str:
    m = results.machine
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {now} — usage ingest, `POST /v1/usage` and `/v1/usage/batch`, {args.workers} workers"
        + (
            f", gc.freeze() experiment ({args.gc_freeze:g} s after start)" if args.gc_freeze else ""
        ),
        "",
        f"- Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram']} RAM, Linux {m['kernel']}; "
        f"load average before the run {m['load_before']} (the machine is shared and noisy).",
        f"- Software: Python {m['python']}, PostgreSQL {m['postgresql']}, {m['packages']}; "
        f"{m['wrk']}. Commit {m['commit']}.",
        f"- Command: `{shlex.join(['.venv/bin/python', 'benchmarks/ingest.py', *argv])}`",
        f"- Data: {args.accounts:,} accounts, one license each, on a usage plan with one `sum` "
        "meter (`allow`: nothing refused, no notices). Each request presents a random one of "
        "the license keys; every event has a fresh idempotency key, so every event is new. "
        f"Each measurement {args.duration:g} s (wrk, closed loop), {args.repeats} rounds, the "
        "order alternating; figures are median (min–max) over the rounds.",
        "",
        "| scenario | events / request | connections | events/s | requests/s | p50 ms | "
        "p99 ms | non-2xx | CPU cores: server / PostgreSQL / wrk / other | "
        "CPU ms per 1,000 events: server / PostgreSQL | checkpoints during |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for scenario in args.scenario_list:
        runs = results.ingest[scenario.label]
        lines.append(
            f"| {scenario.label} | {scenario.events_per_request:,} | {scenario.connections} | "
            f"**{harness.fmt([r['events_per_s'] for r in runs])}** | "
            f"{harness.fmt([r['rps'] for r in runs])} | {harness.fmt([r['p50_ms'] for r in runs], 2)} | "
            f"{harness.fmt([r['p99_ms'] for r in runs], 2)} | "
            f"{sum(r['non_2xx'] + r['socket_errors'] for r in runs)} | {harness.cpu_cell(runs)} | "
            f"{med([r['server_ms_per_1000'] for r in runs]):,.0f} / "
            f"{med([r['postgres_ms_per_1000'] for r in runs]):,.0f} "
            f"({min(r['postgres_ms_per_1000'] for r in runs):,.0f}–"
            f"{max(r['postgres_ms_per_1000'] for r in runs):,.0f}) | "
            f"{', '.join(str(r['checkpoints']) for r in runs)} |"
        )
    totals = results.totals
    lines += [
        "",
        f"- Stored after the run: {totals.get('events', 0):,} events, quantities summing to "
        f"{totals.get('quantity', 0):,}, counters summing to {totals.get('counters', 0):,} "
        + (
            "(equal: every accepted event counted once)."
            if totals.get("quantity") == totals.get("counters")
            else "(**not equal**)."
        ),
    ]
    if results.tpcb or results.inserts:
        lines += [
            "",
            "PostgreSQL alone, same database, after the ingest rounds (`pgbench -n -c 8 -j 2 "
            f"-T {max(1, round(args.pgbench_duration))}`):",
            "",
            "| pgbench | transactions/s | rows/s | latency avg ms | "
            "CPU cores: all busy / pgbench |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for label, runs in (
            ("TPC-B (default script, scale 8)", results.tpcb),
            (f"insert {PGBENCH_ROWS:,} event-shaped rows per transaction", results.inserts),
        ):
            if not runs:
                continue
            cpu = {k: med([r["cpu"][k] for r in runs]) for k in ("all", "generator")}
            lines.append(
                f"| {label} | {harness.fmt([r['tps'] for r in runs])} | "
                f"{harness.fmt([r['rows_per_s'] for r in runs])} | "
                f"{harness.fmt([r['latency_ms'] for r in runs if r['latency_ms']], 2)} | "
                f"{cpu['all']:.2f} / {cpu['generator']:.2f} |"
            )
        lines += ["", *ratios(args, results)]
    lines += ["", "### Target", "", *verdict(args, results), ""]
    return "\n".join(lines) + "\n"


def ratios(args: argparse.Namespace, results: Results) -> list[str]:
    """Our events/s over the database's own rate, per round and as the median of medians."""
    lines = []
    for scenario in args.scenario_list:
        runs = results.ingest[scenario.label]
        ceiling, unit = (
            (results.tpcb, "TPC-B transactions/s")
            if scenario.batch == 0
            else (results.inserts, "pgbench insert rows/s")
        )
        if not ceiling:
            continue
        pairs = [
            r["events_per_s"] / c["rows_per_s"]
            for r, c in zip(runs, ceiling, strict=False)
            if c["rows_per_s"]
        ]
        overall = med([r["events_per_s"] for r in runs]) / med([c["rows_per_s"] for c in ceiling])
        lines.append(
            f"- {scenario.label}: events/s ÷ {unit} = **{overall:.1%}** "
            f"(per round {min(pairs, default=0):.1%}–{max(pairs, default=0):.1%})."
        )
    return lines


def verdict(args: argparse.Namespace, results: Results) -> list[str]:
    batched = [s for s in args.scenario_list if s.batch > 0]
    if not batched:
        return ["- Batched ingest ≥ 20,000 events/s: not measured (no batch scenario)."]
    best = max(batched, key=lambda s: med([r["events_per_s"] for r in results.ingest[s.label]]))
    value = med([r["events_per_s"] for r in results.ingest[best.label]])
    met = "**met**" if value >= TARGET else "**not met**"
    return [
        f"- Batched ingest ≥ {TARGET:,} events/s: {met} (best median {value:,.0f} events/s, "
        f"{best.label})."
    ]


def write_docs(path: Path, section: str) -> None:
    with path.open("a") as handle:
        handle.write("\n" + section)


# --------------------------------------------------------------------------- main

GC_FREEZE_SITE = """\
# generated by benchmarks/ingest.py --gc-freeze: an experiment, not a setting of keyshift
import gc, os, threading, time

def _freeze_later():
    time.sleep(float(os.environ["KEYSHIFT_BENCH_GC_FREEZE"]))
    gc.freeze()

threading.Thread(target=_freeze_later, daemon=True).start()
"""


def gc_freeze_env(tmp: Path, seconds: float) -> dict[str, str]:
    """A ``sitecustomize`` that every server process (master and workers) runs at start."""
    site = tmp / "gc-freeze"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(GC_FREEZE_SITE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "KEYSHIFT_BENCH_GC_FREEZE": str(seconds)}


async def _setup(
    args: argparse.Namespace, name: str, driver_url: str, tmp: Path
) -> tuple[str, list[str]]:
    pg_version = await harness.create_database(args.pg_url, name)
    keys = await seed(driver_url, tmp / "secrets", args.accounts)
    return pg_version, keys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2
    name = f"keyshift_ingest_{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="keyshift-ingest-"))
    plain, driver = harness.database_urls(args.pg_url, name)
    server: harness.Server | None = None
    created = False

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        harness.progress(f"creating database {name}, {args.accounts} accounts with a license each")
        created = True
        pg_version, keys = asyncio.run(_setup(args, name, driver, tmp))
        keys_file = tmp / "keys.txt"
        keys_file.write_text("\n".join(keys) + "\n")
        env = {"KEYSHIFT_MAX_BODY_BYTES": str(1024 * 1024), **args.extra_env}
        if args.gc_freeze is not None:
            env.update(gc_freeze_env(tmp, args.gc_freeze))
        server = harness.start_server(args.workers, driver, tmp / "secrets", tmp, env)
        harness.progress(f"server up on {HOST}:{server.port}, workers {server.worker_pids()}")
        problem = check_sample(server.port, keys[0])
        if problem:
            print(f"{problem}\nnot benchmarking.", file=sys.stderr)
            return 3
        machine = harness.machine_info(pg_version)
        bench = Bench(server, name, plain, keys_file, tmp, args.wrk_threads)
        results = measure(args, bench)
        results.machine = machine
        server.stop()
        server = None
        results.totals = asyncio.run(stored_totals(plain))
        section = render(args, results, argv)
        print()
        print(section)
        if results.profile:
            for title, key in (
                ("keyshift functions, inclusive", "keyshift_inclusive_pct"),
                ("self time by package", "self_by_package_pct"),
                ("top frames by self time", "self_pct"),
            ):
                print(f"py-spy, {title} (% of samples):")
                for frame, pct in results.profile[key][:15]:
                    print(f"  {pct:5.1f}  {frame}")
        if not args.no_record:
            write_docs(args.docs, section)
            harness.progress(f"appended to {args.docs}")
        return 0
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            server.stop()
        if created:
            with contextlib.suppress(Exception):
                asyncio.run(harness.drop_database(args.pg_url, name))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
