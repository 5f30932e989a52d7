"""Benchmark ``POST /v1/licenses/validate`` against the same app's empty endpoint.

What it does, all on this machine and all on loopback (127.0.0.1):

1. creates a fresh PostgreSQL database ``keyshift_bench_<pid>`` (dropped at the end), a
   temporary secrets directory, and migrates the schema;
2. publishes a small catalog (an edition and a ``usage`` plan, so a key validates without a
   fingerprint) and issues ``--licenses`` keys through the licensing service, in batches of
   ``--batch`` per transaction, keeping the plaintext keys;
3. starts ``python -m keyshift.cli serve --workers N`` on a free loopback port and waits for
   ``/healthz``; checks that one key answers 200 ``{"valid": true, "code": "VALID"}``;
   **warm-up**: every key validated, pass after pass in random orders, until the workers'
   caches hold them (the steady state of applications that validate the same keys again and
   again), checked with random keys; each measurement then reports the cache hit ratio it saw
   (``keyshift_validation_cache_total`` on ``/metrics``, before and after). The caches are
   cleared and warmed again before their entries' TTL would run out mid-measurement;
4. **throughput (closed loop)**: ``wrk`` with a generated Lua script, POSTing a random one of
   the keys per request, and the same script and settings against ``GET /healthz`` (the app's
   no-op route: the stack's ceiling); each measurement repeated ``--repeats`` times, the
   endpoints alternating; reports the median and min–max of requests/s, and the ratio;
5. **latency at fixed rates (open loop)**: ``benchmarks/loadgen.py`` (latency measured from each
   request's *scheduled* time, so no coordinated omission) at ``--rates``, both endpoints,
   repeated the same way; reports achieved rate, p50, p99 and errors;
6. ``pgbench -S`` (select-only) on the same database, as context for DB-bound paths;
7. prints the tables and appends a dated section to ``docs/benchmarks.md`` (``--no-record``
   to skip).

Every load is bounded (``--duration`` per measurement) and the script stops by itself.

    .venv/bin/python benchmarks/validate.py [--workers 2] [--licenses 10000] [--duration 10]
        [--pg-url postgresql://postgres@127.0.0.1:5432/test]

``--reuse-db NAME`` keeps the seeded database (and its keys and secrets, in the temporary
directory) for the next run with the same NAME and ``--plan``.

``--endpoint readyz`` swaps the validation request for ``GET /readyz`` (a DB round trip):
a self-test of the harness for a tree where validation does not exist yet.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (  # the helpers both benchmark scripts share
    HOST,
    Server,
    Target,
    add_load_arguments,
    cpu_cell,
    create_database,
    database_urls,
    drop_database,
    fmt,
    fmt_some,
    http,
    machine_info,
    profile_while,
    progress,
    run_loadgen,
    run_wrk,
    server_version,
    spread,
    start_server,
    wait_for_quiet,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS = ROOT / "docs" / "benchmarks.md"
EMPTY = "empty"  # label of GET /healthz


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark license validation against the same app's empty endpoint."
    )
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--licenses", type=int, default=10_000, help="license keys to issue")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="an admin URL of the PostgreSQL server (the bench database is created beside it)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (>=3)")
    parser.add_argument(
        "--connections", default="16,64", help="wrk connection counts, comma-separated"
    )
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument(
        "--rates", default="500,1000,2000,4000", help="open-loop rates (req/s), comma-separated"
    )
    parser.add_argument("--loadgen-connections", type=int, default=32)
    parser.add_argument(
        "--plan",
        choices=["usage", "seat"],
        default="usage",
        help="usage: validate by key alone; seat: each license activated on one machine, "
        "validated with key + fingerprint",
    )
    parser.add_argument("--batch", type=int, default=500, help="licenses per seeding transaction")
    parser.add_argument(
        "--endpoint",
        choices=["validate", "readyz"],
        default="validate",
        help="the endpoint under test (readyz: harness self-test without validation)",
    )
    add_load_arguments(parser, quiet_wait=15.0)
    parser.add_argument("--no-pgbench", action="store_true", help="skip the pgbench context run")
    parser.add_argument(
        "--warm-target",
        type=float,
        default=0.99,
        help="warm-up: walk the key list until a round's cache hit ratio reaches this ...",
    )
    parser.add_argument(
        "--warm-max", type=float, default=240.0, help="... or for at most this many seconds"
    )
    parser.add_argument(
        "--reuse-db",
        metavar="NAME",
        help="keep the seeded database NAME (and its keys and secrets under the temp dir) and "
        "reuse it on the next run with the same NAME and --plan (saves the 3-5 min of seeding)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="also record a py-spy profile of the workers under validation load into DIR",
    )
    parser.add_argument(
        "--seed-only",
        action="store_true",
        help="with --reuse-db: seed the kept database (if needed) and stop, measuring nothing",
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to the docs")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the markdown file to append to")
    args = parser.parse_args(argv)
    args.connection_counts = [int(c) for c in args.connections.split(",") if c.strip()]
    args.rate_list = [int(r) for r in args.rates.split(",") if r.strip()]
    try:
        args.extra_env = dict(item.split("=", 1) for item in args.server_env)
    except ValueError:
        parser.error("--server-env takes NAME=VALUE")
    env_ttl = {**os.environ, **args.extra_env}
    args.cache_ttl = max(
        float(env_ttl.get("KEYSHIFT_VALIDATION_CACHE_TTL", "1")),
        float(env_ttl.get("KEYSHIFT_VALIDATION_CACHE_TTL_LISTENING", "300")),
    )
    if args.seed_only and not args.reuse_db:
        parser.error("--seed-only needs --reuse-db")
    if not 1 <= args.workers <= 16:
        parser.error("--workers must be in 1..16")
    if not 1 <= args.licenses <= 1_000_000:
        parser.error("--licenses must be in 1..1000000")
    if not 1 <= args.duration <= 120:
        parser.error("--duration must be in 1..120 seconds")
    if not 1 <= args.repeats <= 10:
        parser.error("--repeats must be in 1..10")
    if any(not 1 <= c <= 1024 for c in args.connection_counts):
        parser.error("--connections must be in 1..1024")
    if any(not 1 <= r <= 50_000 for r in args.rate_list):
        parser.error("--rates must be in 1..50000")
    return args


# --------------------------------------------------------------------------- database setup


EDITION = {
    "edition": {"key": "bench", "version": "1", "name": "Benchmark edition"},
    "features": {
        "export": "enabled",
        "sync": "enabled",
        "sso": "disabled",
        "api": {"mode": "throttled", "limit": 1000, "period": "hour"},
    },
    "quotas": {"projects": 100, "storage": {"limit": 50, "unit": "GB"}, "seats": 25},
}
USAGE_PLAN = {
    "plan": {
        "key": "bench-usage",
        "version": "1",
        "name": "Benchmark usage plan",
        "edition": "bench@1",
    },
    "licensing": {"model": "usage"},
    "term": {"length": "1y", "grace_period": "7d", "offline_allowance": "3d"},
    "meters": [{"key": "api_calls", "unit": "call", "included": 100_000}],
}


SEAT_PLAN = {
    "plan": {
        "key": "bench-seat",
        "version": "1",
        "name": "Benchmark seat plan",
        "edition": "bench@1",
    },
    "licensing": {"model": "seat", "max_activations": 3, "activation": "node-locked"},
    "term": {"length": "1y", "grace_period": "7d", "offline_allowance": "3d"},
}


async def seed(
    db_url: str, secrets_dir: Path, licenses: int, batch: int, plan: str = "usage"
) -> list[str]:
    """Migrate, publish the catalog, issue the licenses; returns their plaintext keys (on the
    seat plan each license is activated on one machine: ``KEY<TAB>FINGERPRINT``)."""
    from keyshift.catalog.manifests import Edition, Plan
    from keyshift.catalog.service import Manifest, publish
    from keyshift.context import SYSTEM
    from keyshift.db.engine import Database
    from keyshift.db.migrate import upgrade_to_head
    from keyshift.licensing import activations
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
                    Manifest("edition", Edition.model_validate(EDITION), "benchmarks/validate.py"),
                    Manifest("plan", Plan.model_validate(USAGE_PLAN), "benchmarks/validate.py"),
                    Manifest("plan", Plan.model_validate(SEAT_PLAN), "benchmarks/validate.py"),
                ],
            )
        plan_ref = "bench-usage@1" if plan == "usage" else "bench-seat@1"
        keys: list[str] = []
        while len(keys) < licenses:
            async with db.transaction() as session:
                for _ in range(min(batch, licenses - len(keys))):
                    account = await licensing.create_account(
                        session, SYSTEM, name=f"bench account {len(keys)}"
                    )
                    await licensing.subscribe(session, SYSTEM, account.id, plan_ref)
                    issued = await licensing.issue_license(
                        session, SYSTEM, secrets.keyring, account_id=account.id
                    )
                    if plan == "usage":
                        keys.append(issued.key)
                        continue
                    fingerprint = f"bench-machine-{len(keys)}"
                    await activations.activate(
                        session, SYSTEM, secrets.keyring, issued.license, fingerprint
                    )
                    keys.append(f"{issued.key}\t{fingerprint}")
        return keys
    finally:
        await db.dispose()


# --------------------------------------------------------------------------- the server


# --------------------------------------------------------------------------- CPU accounting


# --------------------------------------------------------------------------- load drivers


WRK_SCRIPT = """\
-- generated by benchmarks/validate.py
local method, path, keys_file = "%(method)s", "%(path)s", %(keys_file)s
local requests = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
end

function init(args)
  math.randomseed(os.time() * 1000 + (thread_id or 0))
  if keys_file then
    for line in io.lines(keys_file) do
      local key, fingerprint = line:match("^([^\t]+)\t?(.*)$")
      local body = '{"key":"' .. key .. '"}'
      if fingerprint ~= "" then
        body = '{"key":"' .. key .. '","fingerprint":"' .. fingerprint .. '"}'
      end
      requests[#requests + 1] =
        wrk.format(method, path, {["Content-Type"] = "application/json"}, body)
    end
  else
    requests[1] = wrk.format(method, path)
  end
end

function request()
  return requests[math.random(#requests)]
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


WRK_WALK_SCRIPT = """\
-- generated by benchmarks/validate.py: the warm-up, walking the whole key list, pass after pass
local keys_file = "%(keys_file)s"
local requests = {}
local position = 0

-- Each pass walks the list in a new random order: a fixed order would send key i to the same
-- connection (so the same worker) on every pass whenever the connections take turns evenly,
-- and each worker would cache only its share of the keys.
math.randomseed(os.time() + math.floor(os.clock() * 1000000))

function shuffle()
  for i = #requests, 2, -1 do
    local j = math.random(i)
    requests[i], requests[j] = requests[j], requests[i]
  end
end

function init(args)
  for line in io.lines(keys_file) do
    local key, fingerprint = line:match("^([^\t]+)\t?(.*)$")
    local body = '{"key":"' .. key .. '"}'
    if fingerprint ~= "" then
      body = '{"key":"' .. key .. '","fingerprint":"' .. fingerprint .. '"}'
    end
    requests[#requests + 1] =
      wrk.format("POST", "%(path)s", {["Content-Type"] = "application/json"}, body)
  end
  shuffle()  -- each wrk run (a round) starts its walk at a random place in a random order
end

function request()
  if position >= #requests then
    shuffle()
    position = 0
  end
  position = position + 1
  return requests[position]
end
"""


def write_wrk_script(target: Target, directory: Path) -> Path:
    keys = f'"{target.keys_file}"' if target.keys_file else "nil"
    path = directory / f"wrk-{target.label}.lua"
    path.write_text(WRK_SCRIPT % {"method": target.method, "path": target.path, "keys_file": keys})
    return path


def run_pgbench(plain_url: str, duration: float, repeats: int) -> dict[str, Any] | None:
    if shutil.which("pgbench") is None:
        return None
    init = subprocess.run(
        ["pgbench", "-i", "-s", "1", "-q", plain_url], capture_output=True, text=True, timeout=120
    )
    if init.returncode != 0:
        print(f"pgbench -i failed, skipped: {init.stderr.strip()}", file=sys.stderr)
        return None
    seconds = max(1, round(min(duration, 10)))
    tps, latency = [], []
    for _ in range(repeats):
        run = subprocess.run(
            ["pgbench", "-S", "-c", "8", "-j", "2", "-T", str(seconds), "-n", plain_url],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        found = re.search(r"tps = ([\d.]+) \(without initial connection time\)", run.stdout)
        lat = re.search(r"latency average = ([\d.]+) ms", run.stdout)
        if run.returncode != 0 or not found:
            print(f"pgbench failed, skipped: {run.stderr.strip()}", file=sys.stderr)
            return None
        tps.append(float(found.group(1)))
        if lat:
            latency.append(float(lat.group(1)))
    return {
        "command": f"pgbench -S -c 8 -j 2 -T {seconds}",
        "tps": tps,
        "latency_ms": latency,
    }


# --------------------------------------------------------------------------- the cache


_CACHE_SAMPLE = re.compile(
    r'^keyshift_validation_cache_total\{result="(hit|miss)"\} ([0-9.e+]+)$', re.MULTILINE
)


def cache_counts(server: Server) -> dict[str, float]:
    """The validation cache's hit and miss counters, summed over the workers (/metrics)."""
    status, body = http("GET", server.port, "/metrics", timeout=10)
    counts = {"hit": 0.0, "miss": 0.0}
    if status == 200:
        for result, value in _CACHE_SAMPLE.findall(body.decode(errors="replace")):
            counts[result] += float(value)
    return counts


def hit_ratio(before: dict[str, float], after: dict[str, float]) -> float | None:
    hits = after["hit"] - before["hit"]
    misses = after["miss"] - before["miss"]
    return hits / (hits + misses) if hits + misses > 0 else None


def clear_caches(pg_url: str, database: str) -> None:
    """Empty every worker's validation cache: the same NOTIFY the services send on a change."""
    import asyncpg

    from keyshift.licensing.cache import CHANNEL

    async def notify() -> None:
        conn = await asyncpg.connect(pg_url.rsplit("/", 1)[0] + "/" + database)
        try:
            await conn.execute("SELECT pg_notify($1, 'clear')", CHANNEL)
        finally:
            await conn.close()

    asyncio.run(notify())


@dataclass
class Warmth:
    """When the caches were last filled, and how long an entry lives (the listening TTL)."""

    ttl: float
    filled_at: float = 0.0
    rounds: list[dict[str, Any]] = field(default_factory=list)


def warm_up(
    server: Server, target: Target, tmp: Path, args: argparse.Namespace, warmth: Warmth
) -> None:
    """Validate every key, pass after pass over the list (each pass in a new random order),
    in rounds of 5 s of wrk on 64 connections, until the hit ratio over the latest full walk
    of the list reaches ``--warm-target``; then check with 3 s of the measurement's own load
    (random keys, new connections): each worker must hold (nearly) every key, as in a
    deployment whose applications validate the same keys again and again. (A worker that got
    none of a round's connections warms nothing in that round; every wrk run connects anew.)
    Bounded by ``--warm-max``."""
    assert target.keys_file is not None
    keys = sum(1 for line in target.keys_file.read_text().splitlines() if line.strip())
    walk = tmp / "wrk-walk.lua"
    walk.write_text(WRK_WALK_SCRIPT % {"keys_file": target.keys_file, "path": target.path})
    check = write_wrk_script(target, tmp)
    started = time.monotonic()
    walked_rounds: list[dict[str, Any]] = []

    def one_round(script: Path, seconds: int, label: str) -> dict[str, Any]:
        before = cache_counts(server)
        done = subprocess.run(
            [
                *("wrk", "-t1", "-c64", f"-d{seconds}s", "--timeout", "5s", "-s", str(script)),
                f"http://{HOST}:{server.port}",
            ],
            capture_output=True,
            text=True,
            timeout=65,
        )
        if done.returncode != 0:
            raise RuntimeError(f"wrk (warm-up) failed:\n{done.stdout}\n{done.stderr}")
        after = cache_counts(server)
        ratio = hit_ratio(before, after)
        lookups = int(after["hit"] + after["miss"] - before["hit"] - before["miss"])
        result = {"lookups": lookups, "hit_ratio": ratio, "kind": label}
        warmth.rounds.append(result)
        progress(
            f"warm-up {label}: {lookups:,} validations, cache hit ratio "
            + (f"{ratio:.1%}" if ratio is not None else "n/a")
        )
        return result

    while time.monotonic() - started < args.warm_max:
        walked_rounds.append(one_round(walk, 5, "walk"))
        # Judge over the latest rounds that together walked the whole list at least once: a
        # round shorter than the list sees only part of it (the part walked most often).
        walked = recent_hits = 0.0
        for r in reversed(walked_rounds):
            walked += r["lookups"]
            recent_hits += r["lookups"] * (r["hit_ratio"] or 0.0)
            if walked >= keys:
                break
        if walked < keys or recent_hits / walked < args.warm_target:
            continue
        checked = one_round(check, 3, "check (random keys)")
        if checked["hit_ratio"] is None or checked["hit_ratio"] >= args.warm_target:
            break
    # The first entries were stored when the warm-up began: they are the first to expire.
    warmth.filled_at = started


def keep_warm(
    server: Server,
    target: Target,
    tmp: Path,
    args: argparse.Namespace,
    warmth: Warmth,
    database: str,
) -> None:
    """Entries live ``ttl`` from when they were stored and all were stored in the warm-up, so
    they would all expire together in the middle of a measurement (a stampede no deployment
    sees: there, keys come and go at different times). Before that moment, empty the caches
    and fill them again."""
    if target.keys_file is None:
        return
    if time.monotonic() - warmth.filled_at + args.duration + 30 < warmth.ttl:
        return
    progress("cache entries would expire during the next measurement: clearing, warming again")
    clear_caches(args.pg_url, database)
    time.sleep(0.5)
    warm_up(server, target, tmp, args, warmth)


# --------------------------------------------------------------------------- profile


def profile_workers(
    server: Server, script: Path, args: argparse.Namespace, directory: Path
) -> dict[str, Any] | None:
    """py-spy (if installed) on the workers while wrk drives the endpoint under test."""
    seconds = max(2, round(args.duration))
    return profile_while(
        server.process.pid,
        directory,
        "validate-profile",
        seconds,
        lambda: run_wrk(server, script, max(args.connection_counts), args.wrk_threads, seconds),
    )


# --------------------------------------------------------------------------- statistics


# --------------------------------------------------------------------------- the run


@dataclass
class Results:
    machine: dict[str, str] = field(default_factory=dict)
    seed_seconds: float = 0.0
    closed: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    open: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    pgbench: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    sample_response: str = ""
    warm_rounds: list[dict[str, Any]] = field(default_factory=list)


def alternate(pair: tuple[Target, Target], repeats: int) -> Iterator[tuple[int, Target]]:
    """Each repeat runs both targets; the order flips every repeat (ABBAAB…)."""
    for rep in range(repeats):
        for target in pair if rep % 2 == 0 else reversed(pair):
            yield rep, target


def measure(
    args: argparse.Namespace, server: Server, work: Target, empty: Target, tmp: Path
) -> Results:
    results = Results()
    scripts = {t.label: write_wrk_script(t, tmp) for t in (work, empty)}
    progress("warm-up (unrecorded): 3 s of wrk on each endpoint")
    for target in (work, empty):
        run_wrk(server, scripts[target.label], 16, args.wrk_threads, 3)
    warmth = Warmth(ttl=args.cache_ttl)
    if work.keys_file is not None:
        progress("warm-up (unrecorded): every key, in order, until the caches hold them")
        warm_up(server, work, tmp, args, warmth)
        results.warm_rounds = warmth.rounds

    def measured(target: Target, run: Any) -> dict[str, Any]:
        if target is work:
            keep_warm(server, work, tmp, args, warmth, args.database_name)
        background = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
        before = cache_counts(server) if target is work else None
        result: dict[str, Any] = run()
        result["background_before"] = background
        result["cache_hit_ratio"] = (
            hit_ratio(before, cache_counts(server)) if before is not None else None
        )
        return result

    def hits(result: dict[str, Any]) -> str:
        ratio = result["cache_hit_ratio"]
        return f"  cache hits {ratio:.1%}" if ratio is not None else ""

    for connections in args.connection_counts:
        for rep, target in alternate((work, empty), args.repeats):
            result = measured(
                target,
                lambda t=target, c=connections: run_wrk(
                    server, scripts[t.label], c, args.wrk_threads, args.duration
                ),
            )
            results.closed.setdefault((target.label, connections), []).append(result)
            progress(
                f"wrk  {target.label:8} c={connections:<3} run {rep + 1}: "
                f"{result['rps']:>9,.0f} req/s  p50 {result['p50_ms']:.2f} ms  "
                f"p99 {result['p99_ms']:.2f} ms  non-2xx {result['non_2xx']}  "
                f"cpu {result['cpu']}{hits(result)}"
            )

    for rate in args.rate_list:
        for rep, target in alternate((work, empty), args.repeats):
            result = measured(
                target,
                lambda t=target, r=rate: run_loadgen(
                    server, t, r, args.duration, args.loadgen_connections
                ),
            )
            results.open.setdefault((target.label, rate), []).append(result)
            progress(
                f"open {target.label:8} {rate:>5}/s run {rep + 1}: "
                f"achieved {result['achieved_rate']:>8,.0f}/s  p50 {result['p50_ms']} ms  "
                f"p99 {result['p99_ms']} ms  non-200 {result['non_200']}  "
                f"errors {result['errors']}  dropped {result['dropped']}  "
                f"sched-lag p99 {result['scheduler_lag_p99_ms']} ms  cpu {result['cpu']}"
                f"{hits(result)}"
            )

    if args.profile:
        keep_warm(server, work, tmp, args, warmth, args.database_name)
        progress(f"py-spy profile of the workers under {work.label} load")
        results.profile = profile_workers(server, scripts[work.label], args, args.profile)
    return results


def render(args: argparse.Namespace, results: Results, work: Target, argv: list[str]) -> str:
    m = results.machine
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {now} — `{work.method} {work.path}` vs `GET /healthz`, {args.workers} workers"
        + (f", {args.plan} plan" if work.label == "validate" else "")
        + "".join(f", {k}={v}" for k, v in args.extra_env.items()),
        "",
        f"- Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram']} RAM, Linux {m['kernel']}; "
        f"load average before the run {m['load_before']} (the machine is shared and noisy).",
        f"- Software: Python {m['python']}, PostgreSQL {m['postgresql']}, {m['packages']}; "
        f"{m['wrk']}. Commit {m['commit']}.",
        f"- Command: `{shlex.join(['.venv/bin/python', 'benchmarks/validate.py', *argv])}`",
        f"- Data: {args.licenses:,} licenses (one account each) on "
        + (
            "a usage plan (it has a meter)"
            if args.plan == "usage"
            else "a node-locked seat plan, each activated on one machine"
        )
        + f", issued in {results.seed_seconds:.0f} s; every request presents a random one of "
        + ("the keys. " if args.plan == "usage" else "the keys with its fingerprint. ")
        + f"Each measurement {args.duration:g} s, repeated {args.repeats}×, endpoints "
        "alternating; figures are median (min–max).",
        *warm_lines(args, results, work),
        "",
        "### Throughput, closed loop (wrk)",
        "",
        "| endpoint | connections | ok req/s | p50 ms | p99 ms | non-2xx | "
        "CPU cores: server / PostgreSQL / wrk / other | cache hits |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for connections in args.connection_counts:
        for target in (work.label, EMPTY):
            runs = results.closed[(target, connections)]
            lines.append(
                f"| {target} | {connections} | {fmt([r['rps'] for r in runs])} | "
                f"{fmt([r['p50_ms'] for r in runs], 2)} | {fmt([r['p99_ms'] for r in runs], 2)} | "
                f"{sum(r['non_2xx'] + r['socket_errors'] for r in runs)} | {cpu_cell(runs)} | "
                f"{hits_cell(runs)} |"
            )
    lines.append("")
    for connections, (med, lo, hi) in ratios(args, results, work).items():
        lines.append(
            f"- Ratio {work.label}/empty at {connections} connections: **{med:.1%}** "
            f"(per-repeat pairs {lo:.0%}–{hi:.0%})."
        )
    lines += [
        "",
        "### Latency at fixed rates, open loop (benchmarks/loadgen.py)",
        "",
        f"{args.loadgen_connections} keep-alive connections; latency from each request's "
        "scheduled send time (includes queueing; no coordinated omission). The generator wakes "
        "at most every millisecond and sends what is due, so its own lateness (shown) is "
        "included in the latencies: they are conservative by about that much.",
        "",
        "| endpoint | target req/s | achieved req/s | p50 ms | p99 ms | non-200 + errors + "
        "dropped | generator lateness p99 ms | CPU cores: server / PostgreSQL / loadgen / other "
        "| cache hits |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for rate in args.rate_list:
        for target in (work.label, EMPTY):
            runs = results.open[(target, rate)]
            bad = sum(r["non_200"] + r["errors"] + r["dropped"] for r in runs)
            lines.append(
                f"| {target} | {rate:,} | {fmt([r['achieved_rate'] for r in runs])} | "
                f"{fmt_some([r['p50_ms'] for r in runs], 2)} | "
                f"{fmt_some([r['p99_ms'] for r in runs], 2)} | {bad} | "
                f"{statistics.median(r['scheduler_lag_p99_ms'] or 0.0 for r in runs):.2f} | "
                f"{cpu_cell(runs)} | {hits_cell(runs)} |"
            )
    if results.pgbench:
        pg = results.pgbench
        lines += [
            "",
            f"PostgreSQL alone, same database: `{pg['command']}` (select-only, 8 clients): "
            f"{fmt(pg['tps'])} transactions/s"
            + (f", average latency {fmt(pg['latency_ms'], 3)} ms." if pg["latency_ms"] else "."),
        ]
    lines += ["", "### Targets", "", *verdict(args, results, work), ""]
    return "\n".join(lines) + "\n"


def warm_lines(args: argparse.Namespace, results: Results, work: Target) -> list[str]:
    if work.label != "validate":
        return []
    rounds = ", ".join(
        (f"{r['hit_ratio']:.1%}" if r["hit_ratio"] is not None else "n/a")
        + (" (check)" if r.get("kind", "walk") != "walk" else "")
        for r in results.warm_rounds
    )
    lines = [
        f"- Warm-up before measuring: every key validated, pass after pass over the list (each "
        f"pass in a new random order), in rounds of 5 s of wrk on 64 connections, until the "
        f"cache hit ratio over the latest rounds that together walked the whole key list "
        f"reached {args.warm_target:.0%}, then checked with 3 s of random keys on new "
        f"connections (at most {args.warm_max:g} s in all); rounds' hit ratios: "
        f"{rounds or 'none'}. The caches are cleared "
        f"and warmed again before an entry's {args.cache_ttl:g} s TTL would run out during a "
        'measurement. "cache hits" is the share of validations served from the worker\'s cache '
        "during each measurement (keyshift_validation_cache_total, /metrics, before and after).",
    ]
    if args.plan == "usage":
        lines.append(
            "- Usage plan: the plan has a meter, and meter state is read fresh from the database "
            "on every validation, by design (it is not cached), so even a cache hit costs one "
            "database round trip. Compare with the seat plan for the cached path alone."
        )
    return lines


def hits_cell(runs: list[dict[str, Any]]) -> str:
    """The validation cache's hit ratio over each run (from /metrics): median (min–max)."""
    ratios = [r["cache_hit_ratio"] for r in runs if r.get("cache_hit_ratio") is not None]
    if not ratios:
        return "—"
    med, lo, hi = spread(ratios)
    return f"{med:.1%} ({lo:.1%}–{hi:.1%})"


def ratios(
    args: argparse.Namespace, results: Results, work: Target
) -> dict[int, tuple[float, float, float]]:
    """Per connection count: median of validate/empty medians, and min–max over repeat pairs."""
    out = {}
    for connections in args.connection_counts:
        w = [r["rps"] for r in results.closed[(work.label, connections)]]
        e = [r["rps"] for r in results.closed[(EMPTY, connections)]]
        pairs = [a / b for a, b in zip(w, e, strict=True) if b]
        out[connections] = (
            statistics.median(w) / statistics.median(e) if statistics.median(e) else 0.0,
            min(pairs, default=0.0),
            max(pairs, default=0.0),
        )
    return out


def verdict(args: argparse.Namespace, results: Results, work: Target) -> list[str]:
    lines = []
    best_ratio = max(r[0] for r in ratios(args, results, work).values())
    lines.append(
        f"- Throughput ≥ 50 % of the empty endpoint: "
        f"{'**met**' if best_ratio >= 0.5 else '**not met**'} (best median ratio {best_ratio:.1%})."
    )
    runs = results.open.get((work.label, 2000))
    if runs:
        p99 = statistics.median(r["p99_ms"] or float("inf") for r in runs)
        achieved = statistics.median(r["achieved_rate"] for r in runs)
        bad = sum(r["non_200"] + r["errors"] + r["dropped"] for r in runs)
        met = p99 < 10 and achieved >= 0.98 * 2000 and bad == 0
        lines.append(
            f"- p99 under 10 ms at 2,000 req/s: {'**met**' if met else '**not met**'} "
            f"(median p99 {p99:.2f} ms, achieved {achieved:,.0f} req/s, {bad} failed)."
        )
    else:
        lines.append("- p99 at 2,000 req/s: not measured (2000 not in --rates).")
    return lines


#: The part of docs/benchmarks.md after the validation runs (another benchmark's).
NEXT_PART = "\n# Ingest"


def write_docs(path: Path, section: str) -> None:
    """Append the section to the validation part: at the end of the file, or before the next
    part if there is one."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(DOCS_HEADER)
    text = path.read_text()
    cut = text.find(NEXT_PART)
    if cut < 0:
        with path.open("a") as handle:
            handle.write("\n" + section)
        return
    path.write_text(text[:cut].rstrip("\n") + "\n\n" + section + text[cut:])


DOCS_HEADER = """\
# Benchmarks

Numbers measured with `benchmarks/validate.py` on the project's 2-core machines. Each run appends
a dated section below; older sections stay as a record (compare within a section: every ratio
is measured in one run, on one machine, because the machines are shared and noisy).

How to run (PostgreSQL on 127.0.0.1:5432 and Debian's `wrk` are needed; about 25 minutes, of
which 3–5 are spent issuing the 10,000 licenses through the services):

    apt-get install -y wrk
    .venv/bin/python benchmarks/validate.py --workers 2 --licenses 10000 --duration 10

Useful options: `--plan seat` (licenses on a node-locked seat plan, validated with key +
fingerprint; default `usage`), `--server-env KEYSHIFT_VALIDATION_CACHE_TTL=300` (environment
for the server), `--profile DIR` (py-spy profile of the workers under validation load; `pip
install py-spy` into the venv), `--no-record` (print only), `--endpoint readyz` (a self-test
of the harness). Everything runs on 127.0.0.1; each load is bounded by `--duration`; the
database `keyshift_bench_<pid>` and the temporary secrets are removed at the end.

What is measured:

- **Throughput (closed loop)**: `wrk` keeps N connections busy; requests/s at saturation, for
  `POST /v1/licenses/validate` with a random one of 10,000 keys per request, and for the same
  app's no-op `GET /healthz` (the ceiling of the stack: uvicorn, FastAPI, the middleware). The
  load generator shares the 2 cores with the server and PostgreSQL; the CPU columns show who used
  them.
- **Latency at fixed rates (open loop)**: `benchmarks/loadgen.py` sends at a fixed schedule and
  measures each request from its scheduled time, so a stall shows as the queueing it causes.
- **pgbench -S**: PostgreSQL's own select-only rate on the same database, for context.

Targets (from the issue): validation at ≥ 50 % of the empty endpoint's throughput, and p99 under
10 ms at 2,000 validations/s.
"""


def print_summary(section: str) -> None:
    print()
    print(section)


async def _setup(
    args: argparse.Namespace, name: str, driver_url: str, tmp: Path
) -> tuple[str, float, list[str]]:
    pg_version = await create_database(args.pg_url, name)
    started = time.monotonic()
    keys = await seed(driver_url, tmp / "secrets", args.licenses, args.batch, args.plan)
    return pg_version, time.monotonic() - started, keys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2

    name = f"keyshift_bench_{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="keyshift-bench-"))
    kept: Path | None = None  # --reuse-db: where the kept database's keys and secrets live
    if args.reuse_db:
        if not re.fullmatch(r"[a-z0-9_]{1,40}", args.reuse_db):
            print("--reuse-db takes a name of a-z, 0-9 and _", file=sys.stderr)
            return 2
        name = f"keyshift_bench_{args.reuse_db}_{args.plan}"
        kept = Path(tempfile.gettempdir()) / f"keyshift-bench-{args.reuse_db}-{args.plan}"
    args.database_name = name
    plain, driver = database_urls(args.pg_url, name)
    server: Server | None = None
    created = False

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        secrets_dir = tmp / "secrets"
        if kept is not None and (kept / "keys.txt").exists():
            secrets_dir = kept / "secrets"
            keys = (kept / "keys.txt").read_text().splitlines()[: args.licenses]
            pg_version = asyncio.run(server_version(args.pg_url))
            seed_seconds = float((kept / "seed_seconds").read_text())
            progress(f"reusing database {name} and its {len(keys):,} keys (--reuse-db)")
        else:
            progress(f"creating database {name} and seeding {args.licenses:,} licenses")
            created = kept is None
            if kept is not None:
                asyncio.run(drop_database(args.pg_url, name))
            pg_version, seed_seconds, keys = asyncio.run(_setup(args, name, driver, tmp))
            progress(f"seeded in {seed_seconds:.1f} s")
            if kept is not None:
                kept.mkdir(parents=True, exist_ok=True)
                shutil.copytree(tmp / "secrets", kept / "secrets", dirs_exist_ok=True)
                secrets_dir = kept / "secrets"
                (kept / "seed_seconds").write_text(f"{seed_seconds:.1f}")
                (kept / "keys.txt").write_text("\n".join(keys) + "\n")
        keys_file = tmp / "keys.txt"
        keys_file.write_text("\n".join(keys) + "\n")
        if args.seed_only:
            return 0

        server = start_server(args.workers, driver, secrets_dir, tmp, args.extra_env)
        progress(f"server up on {HOST}:{server.port}, workers {server.worker_pids()}")

        if args.endpoint == "validate":
            work = Target("validate", "POST", "/v1/licenses/validate", keys_file)
            key, _, fingerprint = keys[0].partition("\t")
            probe = {"key": key, **({"fingerprint": fingerprint} if fingerprint else {})}
            status, body = http("POST", server.port, work.path, probe)
            sample = body.decode(errors="replace")
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if (
                status != 200
                or not isinstance(parsed, dict)
                or parsed.get("valid") is not True
                or parsed.get("code") != "VALID"
            ):
                print(
                    f"POST {work.path} with a freshly issued key answered {status}: {sample[:500]}"
                    "\nexpected 200 with valid=true, code=VALID; not benchmarking.",
                    file=sys.stderr,
                )
                return 3
        else:
            work = Target("readyz", "GET", "/readyz", None)
            status, body = http("GET", server.port, work.path)
            sample = body.decode(errors="replace")
            if status != 200:
                print(f"GET /readyz answered {status}: {sample[:500]}", file=sys.stderr)
                return 3
        empty = Target(EMPTY, "GET", "/healthz", None)

        machine = machine_info(pg_version)
        results = measure(args, server, work, empty, tmp)
        results.machine = machine
        results.seed_seconds = seed_seconds
        results.sample_response = sample
        server.stop()
        server = None

        if not args.no_pgbench:
            progress("pgbench -S on the same database (context)")
            results.pgbench = run_pgbench(plain, args.duration, args.repeats)

        section = render(args, results, work, argv)
        print_summary(section)
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
            progress(f"appended to {args.docs}")
        return 0
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            server.stop()
        if created:
            with contextlib.suppress(Exception):
                asyncio.run(drop_database(args.pg_url, name))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
