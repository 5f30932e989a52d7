"""Benchmark ``POST /v1/licenses/validate`` against the same app's empty endpoint.

All on this machine, on loopback (the steps' helpers are in ``harness.py``):

1. a fresh database ``keyshift_bench_<pid>`` (dropped at the end), ``catalog/`` published and
   ``--licenses`` keys issued on the ``--plan`` (``seat``: each activated on one machine);
2. ``keyshift serve --workers N`` on a free port; one key must answer ``VALID``;
3. **warm-up** until every worker's cache holds every key (``validation_cache.py``); each
   measurement reports the cache hit ratio it saw;
4. **throughput (closed loop)**: ``wrk`` with a random key per request, and against
   ``GET /healthz`` (the app's no-op route: the stack's ceiling), ``--repeats`` times, the
   endpoints alternating; the median and min–max of requests/s, and the ratio;
5. **latency at fixed rates (open loop)**: ``loadgen.py`` at ``--rates``, both endpoints;
6. ``pgbench -S`` on the same database, as context;
7. with ``--tracing on`` the server traces (``OTEL_EXPORTER_OTLP_ENDPOINT`` names a loopback
   receiver in this process that counts the exports and parses nothing); off by default;
8. prints the tables and writes ``results/validate-<plan>-<UTC time>.json``.

    .venv/bin/python benchmarks/validate.py [--plan seat] [--workers 2] [--licenses 10000]

``--reuse-db NAME`` keeps the seeded database (and its keys and secrets) for the next run with
the same NAME and ``--plan``. ``--endpoint readyz`` swaps validation for ``GET /readyz``: a
self-test of the harness.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import report
from harness import Bench, progress, spread
from validation_cache import Warmth, cache_counts, hit_ratio, keep_warm, warm_up

EMPTY = "empty"  # label of GET /healthz
PLANS = {"usage": "bench-usage@1", "seat": "bench-seat@1"}


@dataclass(frozen=True)
class Target:
    label: str
    method: str
    path: str
    keys_file: Path | None  # POST {"key": random line} when set

    def wrk_args(self) -> list[object]:
        return [self.method, self.path, *([self.keys_file] if self.keys_file else [])]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(parser, quiet_wait=15.0)
    add = parser.add_argument
    add("--licenses", type=int, default=10_000, help="license keys to issue")
    add("--connections", default="16,64", help="wrk connection counts, comma-separated")
    add("--rates", default="500,1000,2000,4000", help="open-loop rates (req/s), comma-separated")
    add("--loadgen-connections", type=int, default=32)
    add("--plan", choices=["usage", "seat"], default="usage", help="see the docstring")
    add("--batch", type=int, default=500, help="licenses per seeding transaction")
    add("--endpoint", choices=["validate", "readyz"], default="validate")
    add("--no-pgbench", action="store_true", help="skip the pgbench context run")
    add(
        "--tracing",
        choices=["off", "on"],
        default="off",
        help="on: the server exports a span per request over OTLP/HTTP to a loopback sink",
    )
    add("--warm-target", type=float, default=0.99, help="warm-up: stop at this hit ratio ...")
    add("--warm-max", type=float, default=240.0, help="... or after this many seconds")
    add("--reuse-db", metavar="NAME", help="keep the seeded database NAME for the next run")
    add("--seed-only", action="store_true", help="with --reuse-db: seed, measure nothing")
    args = parser.parse_args(argv)
    harness.check_common_arguments(parser, args)
    args.connection_counts = [int(c) for c in args.connections.split(",") if c.strip()]
    args.rate_list = [int(r) for r in args.rates.split(",") if r.strip()]
    env = {**os.environ, **args.extra_env}
    args.cache_ttl = max(  # how long a cached entry lives while the invalidation listener is up
        float(env.get("KEYSHIFT_VALIDATION_CACHE_TTL", "1")),
        float(env.get("KEYSHIFT_VALIDATION_CACHE_TTL_LISTENING", "300")),
    )
    if args.seed_only and not args.reuse_db:
        parser.error("--seed-only needs --reuse-db")
    if args.reuse_db and not re.fullmatch(r"[a-z0-9_]{1,40}", args.reuse_db):
        parser.error("--reuse-db takes a name of a-z, 0-9 and _")
    if not 1 <= args.licenses <= 1_000_000:
        parser.error("--licenses must be in 1..1000000")
    if any(not 1 <= c <= 1024 for c in args.connection_counts):
        parser.error("--connections must be in 1..1024")
    if any(not 1 <= r <= 50_000 for r in args.rate_list):
        parser.error("--rates must be in 1..50000")
    return args


# --------------------------------------------------------------------------- the run


def measure(args: argparse.Namespace, bench: Bench, work: Target, empty: Target) -> dict:
    """Every measurement, as the JSON record's ``runs``."""
    runs: dict[str, Any] = {"closed": [], "open": [], "warm_up": []}

    def load(t: Target, connections: int = 0, rate: int = 0, seconds: float = 0) -> dict:
        if rate:
            return harness.run_loadgen(
                bench,
                t.method,
                t.path,
                t.keys_file,
                rate=rate,
                duration=args.duration,
                connections=args.loadgen_connections,
            )
        return harness.run_wrk(
            bench,
            "random.lua",
            t.wrk_args(),
            connections=connections,
            threads=args.wrk_threads,
            duration=seconds or args.duration,
        )

    progress("warm-up (unrecorded): 3 s of wrk on each endpoint")
    for target in (work, empty):
        load(target, connections=16, seconds=3)
    warmth = Warmth(ttl=args.cache_ttl, rounds=runs["warm_up"])
    if work.keys_file is not None:
        progress("warm-up (unrecorded): every key, until the caches hold them")
        warm_up(bench, work.path, work.keys_file, args, warmth)

    def measured(target: Target, rep: int, **labels: int) -> dict[str, Any]:
        if target is work:
            keep_warm(bench, work.path, work.keys_file, args, warmth)
        background = harness.wait_for_quiet(args.quiet_threshold, args.quiet_wait)
        before = cache_counts(bench) if target is work else None
        result = {"endpoint": target.label, **labels, "repeat": rep, **load(target, **labels)}
        result["background_before"] = background
        result["cache_hit_ratio"] = hit_ratio(before, cache_counts(bench)) if before else None
        return result

    def hits(result: dict[str, Any]) -> str:
        ratio = result["cache_hit_ratio"]
        return f"  cache hits {ratio:.1%}" if ratio is not None else ""

    for c in args.connection_counts:
        for rep, t in harness.alternate((work, empty), args.repeats):
            runs["closed"].append(r := measured(t, rep, connections=c))
            progress(
                f"wrk  {t.label:8} c={c:<3} run {rep + 1}: {r['rps']:>9,.0f} req/s  "
                f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  non-2xx {r['non_2xx']}  "
                f"cpu {r['cpu']}{hits(r)}"
            )
    for rate in args.rate_list:
        for rep, t in harness.alternate((work, empty), args.repeats):
            runs["open"].append(r := measured(t, rep, rate=rate))
            progress(
                f"open {t.label:8} {rate:>5}/s run {rep + 1}: achieved "
                f"{r['achieved_rate']:>8,.0f}/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                f"non-200 {r['non_200']}  errors {r['errors']}  dropped {r['dropped']}  "
                f"sched-lag p99 {r['scheduler_lag_p99_ms']} ms  cpu {r['cpu']}{hits(r)}"
            )
    if args.profile and bench.server is not None:
        keep_warm(bench, work.path, work.keys_file, args, warmth)
        progress(f"py-spy profile of the workers under {work.label} load")
        seconds = max(2, round(args.duration))
        runs["profile"] = harness.profile_while(
            bench.server.process.pid,
            args.profile,
            "validate-profile",
            seconds,
            lambda: load(work, connections=max(args.connection_counts), seconds=seconds),
        )
    return runs


def summarise(args: argparse.Namespace, runs: dict[str, Any], work: Target) -> dict[str, Any]:
    """The tables of docs/benchmarks.md: medians and min–max over the repeats."""

    def of(kind: str, endpoint: str, **labels: int) -> list[dict[str, Any]]:
        return [
            r
            for r in runs[kind]
            if r["endpoint"] == endpoint and all(r[k] == v for k, v in labels.items())
        ]

    def row(rs: list[dict[str, Any]], **labels: object) -> dict[str, Any]:
        summaries = {k: spread(r[k] for r in rs) for k in ("p50_ms", "p99_ms", "cache_hit_ratio")}
        return labels | summaries | {"cpu_cores": harness.cpu_median(rs)}

    closed, ratios, open_loop = [], [], []
    for c in args.connection_counts:
        for label in (work.label, EMPTY):
            rs = of("closed", label, connections=c)
            errors = sum(r["non_2xx"] + r["socket_errors"] for r in rs)
            rps = spread(r["rps"] for r in rs)
            closed.append(row(rs, endpoint=label, connections=c, rps=rps, errors=errors))
        w = [r["rps"] for r in of("closed", work.label, connections=c)]
        e = [r["rps"] for r in of("closed", EMPTY, connections=c)]
        pairs = [a / b for a, b in zip(w, e, strict=True) if b]
        ratio = statistics.median(w) / statistics.median(e) if statistics.median(e) else 0.0
        ratios.append(dict(connections=c, ratio=ratio, pairs_min=min(pairs), pairs_max=max(pairs)))
    for rate in args.rate_list:
        for label in (work.label, EMPTY):
            rs = of("open", label, rate=rate)
            achieved = spread(r["achieved_rate"] for r in rs)
            failed = sum(r["non_200"] + r["errors"] + r["dropped"] for r in rs)
            lag = statistics.median(r["scheduler_lag_p99_ms"] or 0.0 for r in rs)
            open_loop.append(
                row(rs, endpoint=label, rate=rate, achieved_rate=achieved, failed=failed)
                | {"generator_lateness_p99_ms": lag}
            )
    best = max(r["ratio"] for r in ratios)
    targets = [
        {
            "target": "Throughput ≥ 50 % of the empty endpoint",
            "measure": "best median ratio",
            "value": best,
            "unit": "ratio",
            "met": best >= 0.5,
        }
    ]
    if rs := of("open", work.label, rate=2000):
        p99 = statistics.median(r["p99_ms"] or math.inf for r in rs)
        achieved = statistics.median(r["achieved_rate"] for r in rs)
        failed = sum(r["non_200"] + r["errors"] + r["dropped"] for r in rs)
        targets.append(
            {
                "target": "p99 under 10 ms at 2,000 req/s",
                "measure": "median p99",
                "value": p99 if p99 < math.inf else None,
                "unit": "ms",
                "achieved_rate": achieved,
                "failed": failed,
                "met": p99 < 10 and achieved >= 0.98 * 2000 and failed == 0,
            }
        )
    pgbench = runs.get("pgbench") or []
    return {
        "closed_loop": closed,
        "ratios": ratios,
        "open_loop": open_loop,
        "pgbench_select": pgbench
        and {
            "command": pgbench[0]["command"],
            "tps": spread(r["tps"] for r in pgbench),
            "latency_ms": spread(r["latency_ms"] for r in pgbench),
        },
        "warm_up_hit_ratios": [r["hit_ratio"] for r in runs["warm_up"]],
        "seed_seconds": args.seed_seconds,
        "targets": targets,
    }


# --------------------------------------------------------------------------- main


def seed(args: argparse.Namespace, bench: Bench, kept: Path | None) -> tuple[list[str], Path]:
    """The keys and the secrets directory: seeded now, or kept from a run with --reuse-db."""
    if kept is not None and (kept / "keys.txt").exists():
        keys = (kept / "keys.txt").read_text().splitlines()[: args.licenses]
        args.seed_seconds = float((kept / "seed_seconds").read_text())
        progress(f"reusing database {bench.database} and its {len(keys):,} keys (--reuse-db)")
        return keys, kept / "secrets"
    progress(f"creating database {bench.database} and seeding {args.licenses:,} licenses")
    harness.pg(args.pg_url, f'DROP DATABASE IF EXISTS "{bench.database}" WITH (FORCE)')
    harness.pg(args.pg_url, f'CREATE DATABASE "{bench.database}"')
    started = time.monotonic()
    keys = asyncio.run(
        harness.seed_licenses(
            bench.driver_url,
            bench.tmp / "secrets",
            PLANS[args.plan],
            args.licenses,
            args.batch,
            activate=args.plan == "seat",
        )
    )
    args.seed_seconds = round(time.monotonic() - started, 1)
    progress(f"seeded in {args.seed_seconds:.1f} s")
    if kept is None:
        return keys, bench.tmp / "secrets"
    kept.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bench.tmp / "secrets", kept / "secrets", dirs_exist_ok=True)
    (kept / "seed_seconds").write_text(f"{args.seed_seconds:.1f}")
    (kept / "keys.txt").write_text("\n".join(keys) + "\n")
    return keys, kept / "secrets"


def probe(bench: Bench, work: Target, keys: list[str]) -> str | None:
    """One request to the endpoint under test; the problem, if it does not answer as it must."""
    assert bench.server is not None
    if work.keys_file is None:
        status, body = harness.http(work.method, bench.server.port, work.path)
        return None if status == 200 else f"{work.path} answered {status}: {body[:500]!r}"
    key, _, fingerprint = keys[0].partition("\t")
    request = {"key": key, **({"fingerprint": fingerprint} if fingerprint else {})}
    status, body = harness.http("POST", bench.server.port, work.path, request)
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status == 200 and isinstance(answer, dict) and answer.get("valid") is True:
        return None if answer.get("code") == "VALID" else f"code {answer.get('code')}"
    return f"POST {work.path} with a fresh key answered {status}: {body[:500]!r}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    name, kept = f"keyshift_bench_{os.getpid()}", None
    if args.reuse_db:
        name = f"keyshift_bench_{args.reuse_db}_{args.plan}"
        kept = Path(tempfile.gettempdir()) / f"keyshift-bench-{args.reuse_db}-{args.plan}"
    with harness.bench_run(args.pg_url, name) as bench, contextlib.ExitStack() as stack:
        sink = None
        if args.tracing == "on":
            sink = stack.enter_context(harness.otlp_sink())
            args.extra_env = {
                **args.extra_env,
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
                "OTEL_SERVICE_NAME": "keyshift-bench",
            }
        bench.drop_database = kept is None
        keys, secrets = seed(args, bench, kept)
        keys_file = bench.tmp / "keys.txt"
        keys_file.write_text("\n".join(keys) + "\n")
        if args.seed_only:
            return 0
        bench.server = harness.start_server(
            args.workers, bench.driver_url, secrets, bench.tmp, args.extra_env
        )
        progress(f"server up on {harness.HOST}:{bench.server.port}, pids {bench.server.pids()}")
        work = (
            Target("validate", "POST", "/v1/licenses/validate", keys_file)
            if args.endpoint == "validate"
            else Target("readyz", "GET", "/readyz", None)
        )
        if problem := probe(bench, work, keys):
            print(f"{problem}\nnot benchmarking.", file=sys.stderr)
            return 3
        benchmark = f"validate-{args.plan}" if work.label == "validate" else "validate-readyz"
        if sink is not None:
            benchmark += "-traced"
        record = harness.Record(
            benchmark,
            "validate.py",
            argv,
            harness.parameters(args, "connection_counts", "rate_list", "seed_seconds"),
            harness.machine(args.pg_url),
        )
        record.runs = measure(args, bench, work, Target(EMPTY, "GET", "/healthz", None))
        bench.server.stop()
        bench.server = None
        if sink is not None:  # the workers sent their last spans as they stopped
            record.runs["otlp_sink"] = {"requests": sink.requests, "bytes": sink.bytes}
            progress(f"OTLP sink: {sink.requests:,} exports, {sink.bytes:,} bytes")
            if not sink.requests:
                print("tracing was on but no span arrived", file=sys.stderr)
                return 3
        if not args.no_pgbench:
            progress("pgbench -S on the same database (context)")
            seconds = str(max(1, round(min(args.duration, 10))))
            if harness.pgbench(bench, "-i", "-s", "1", "-q", timeout=120):
                record.runs["pgbench"] = [
                    run
                    for _ in range(args.repeats)
                    if (
                        run := harness.pgbench(
                            bench,
                            "-S",
                            "-c",
                            "8",
                            "-j",
                            "2",
                            "-T",
                            seconds,
                            "-n",
                            timeout=int(seconds) + 60,
                        )
                    )
                ]
        record.results = summarise(args, record.runs, work)
        print(report.render(record.as_json()))
        if record.runs.get("profile"):
            harness.print_profile(record.runs["profile"])
        if not args.no_record:
            progress(f"recorded {record.write(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
