"""Benchmark usage ingest on PostgreSQL: ``POST /v1/usage`` (one event per request) and
``POST /v1/usage/batch`` (100 and 1,000 events per request), against ``pgbench`` on the same
database in the same run.

All on this machine, on loopback (the steps' helpers are in ``harness.py``):

1. a fresh PostgreSQL database ``keyshift_ingest_<pid>`` (dropped at the end), migrated,
   ``catalog/`` published and ``--accounts`` licenses issued on ``ingest-usage@1`` (one
   ``sum`` meter that allows everything: nothing refused, no notice fires);
2. ``keyshift serve --workers N`` with ``KEYSHIFT_MAX_BODY_BYTES`` raised so that 1,000-event
   batches fit; one event and one batch must be accepted;
3. ``--repeats`` rounds, each scenario in turn (the order alternating): ``wrk`` (closed loop,
   ``wrk/ingest.lua``: a random license key per request, fresh idempotency keys, so every
   event is new) for ``--duration`` seconds;
4. then as many rounds of ``pgbench`` on the same database: TPC-B (the write-transaction
   ceiling) and ``pgbench/insert-events.sql`` (1,000 event-shaped rows per transaction into a
   copy of ``usage_events``: the row ceiling). After the ingest rounds, because the gigabytes
   pgbench writes (and the checkpoints after them) would slow the ingest rounds that follow;
5. checks that the stored events and the counters agree (every event counted once);
6. prints the tables and the ratios to pgbench, and writes ``results/ingest-<UTC time>.json``.

    .venv/bin/python benchmarks/ingest.py [--workers 2] [--duration 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import report
from harness import Bench, progress, spread

METER = "api_calls"
PGBENCH_ROWS = 1000  # rows per transaction of the insert script
TARGET = 20_000  # events/s, batched (issue #4)


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


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark usage ingest against pgbench.")
    harness.add_common_arguments(parser, quiet_wait=10.0)
    add = parser.add_argument
    add("--accounts", type=int, default=200, help="accounts (one license each)")
    add(
        "--scenarios",
        default="single:1:16,batch100:100:8,batch1000:1000:8",
        help="label:events-per-request:connections, comma-separated (1 event = POST /v1/usage)",
    )
    add("--pgbench-duration", type=float, default=15.0, help="seconds per pgbench run")
    add("--no-pgbench", action="store_true", help="skip the pgbench runs")
    add(
        "--gc-freeze",
        type=float,
        metavar="SECONDS",
        help="experiment: SECONDS after each worker starts, move every object it has to the "
        "GC's permanent generation (what gc.freeze() at worker start would do)",
    )
    args = parser.parse_args(argv)
    harness.check_common_arguments(parser, args)
    try:
        args.scenario_list = [
            Scenario(label, int(batch) if int(batch) > 1 else 0, int(connections))
            for label, batch, connections in (s.split(":") for s in args.scenarios.split(","))
        ]
    except ValueError:
        parser.error("--scenarios takes label:events:connections")
    if not 1 <= args.accounts <= 100_000:
        parser.error("--accounts must be in 1..100000")
    if not 1 <= args.pgbench_duration <= 120:
        parser.error("--pgbench-duration must be in 1..120 seconds")
    for s in args.scenario_list:
        if not 0 <= s.batch <= 1000 or not 1 <= s.connections <= 256:
            parser.error("a scenario has 1..1000 events per request and 1..256 connections")
    return args


def checkpoints(bench: Bench) -> int:
    """Checkpoints the PostgreSQL server has started (anyone's: a CREATE or DROP DATABASE of
    other people's tests forces one). After each, the first change to every page writes the
    whole page to the WAL, so PostgreSQL's CPU per event rises for a while."""
    query = "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
    return int(harness.pg(bench.plain_url, query))


def stored_totals(bench: Bench) -> dict[str, int]:
    """Events stored, the sum of their quantities and the sum of the counters."""
    query = """SELECT json_build_object('events', count(*), 'quantity', coalesce(sum(quantity), 0),
        'counters', (SELECT coalesce(sum(used), 0) FROM usage_counters)) FROM usage_events"""
    return {k: int(v) for k, v in json.loads(harness.pg(bench.plain_url, query)).items()}


def run_scenario(
    bench: Bench, args: argparse.Namespace, s: Scenario, tag: str, duration: float
) -> dict[str, Any]:
    """wrk on one scenario: events/s, latency per request, the CPU split (PostgreSQL: this
    database's backends), and the CPU milliseconds server and PostgreSQL spent per 1,000
    events."""
    started = checkpoints(bench)
    result = harness.run_wrk(
        bench,
        "ingest.lua",
        [s.path, s.batch, tag, bench.tmp / "keys.txt", METER],
        connections=s.connections,
        threads=args.wrk_threads,
        duration=duration,
        timeout=10,
    )
    events = result["ok"] * s.events_per_request
    per_thousand = 1000 * result["seconds"] / max(1, events) * 1000  # ms of a core / 1,000
    return result | {
        "events_per_s": round(events / result["seconds"], 1),
        "server_ms_per_1000": round(result["cpu"]["server"] * per_thousand, 1),
        "postgres_ms_per_1000": round(result["cpu"]["postgres"] * per_thousand, 1),
        "checkpoints": checkpoints(bench) - started,
    }


def run_pgbench(bench: Bench, label: str, duration: float) -> dict[str, Any] | None:
    """One pgbench run: TPC-B, or the insert script (rows/s = transactions/s × its rows)."""
    seconds = str(max(1, round(duration)))
    script = ["-f", str(harness.HERE / "pgbench" / "insert-events.sql")]
    script += ["-D", f"rows={PGBENCH_ROWS}"]
    options = ["-n", "-c", "8", "-j", "2", "-T", seconds, *(script if label == "insert" else [])]
    run = harness.pgbench(bench, *options, timeout=int(seconds) + 120)
    if run is not None:
        run["rows_per_s"] = run["tps"] * (PGBENCH_ROWS if label == "insert" else 1)
    return run


def measure(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    """Every measurement, as the JSON record's ``runs``."""
    runs: dict[str, Any] = {"ingest": [], "tpcb": [], "insert": []}
    progress("warm-up (unrecorded): 3 s of each scenario")
    for s in args.scenario_list:
        run_scenario(bench, args, s, f"w{s.label}", 3)
    for rep, s in harness.alternate(args.scenario_list, args.repeats):
        background = harness.wait_for_quiet(args.quiet_threshold, args.quiet_wait)
        r = run_scenario(bench, args, s, f"r{rep}{s.label}", args.duration)
        runs["ingest"].append({"scenario": s.label, "round": rep, **r, "background": background})
        progress(
            f"{s.label:10} round {rep + 1}: {r['events_per_s']:>9,.0f} events/s "
            f"({r['rps']:,.0f} req/s)  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
            f"non-2xx {r['non_2xx']}  cpu {r['cpu']}  ms/1000 events: server "
            f"{r['server_ms_per_1000']} pg {r['postgres_ms_per_1000']}  "
            f"checkpoints {r['checkpoints']}"
        )
    if args.profile and bench.server is not None:
        last = args.scenario_list[-1]
        progress(f"py-spy profile of the workers under {last.label} load")
        seconds = max(2, round(args.duration))
        runs["profile"] = harness.profile_while(
            bench.server.process.pid,
            args.profile,
            f"ingest-{last.label}-profile",
            seconds,
            lambda: run_scenario(bench, args, last, f"prof{os.getpid()}", seconds),
        )
    # pgbench after every ingest round, not between them: its -i and its inserts write
    # gigabytes into the same database (and the checkpoints after them make every page
    # touched again cost a full-page image), which would land in the ingest rounds.
    if args.no_pgbench:
        return runs
    progress("pgbench -i and a copy of usage_events for the insert script")
    if harness.pgbench(bench, "-i", "-s", "8", "-q", timeout=300) is None:
        return runs  # scale 8: one branch per client, or TPC-B's updates serialise them
    harness.pg(bench.plain_url, "CREATE TABLE bench_usage_events (LIKE usage_events INCLUDING ALL)")
    for rep, label in harness.alternate(["tpcb", "insert"], args.repeats):
        harness.wait_for_quiet(args.quiet_threshold, args.quiet_wait)
        if (run := run_pgbench(bench, label, args.pgbench_duration)) is not None:
            runs[label].append(run)
            progress(
                f"pgbench {label:6} round {rep + 1}: {run['tps']:>9,.0f} tps "
                f"({run['rows_per_s']:,.0f} rows/s)  latency {run['latency_ms']} ms  "
                f"cpu {run['cpu']}"
            )
    return runs


def check_sample(bench: Bench, key: str) -> str | None:
    """One event and one batch of 3 must be accepted; returns a problem or None."""
    assert bench.server is not None
    single = {"key": key, "meter": METER, "quantity": 1, "idempotency_key": "probe-0"}
    status, body = harness.http("POST", bench.server.port, "/v1/usage", single)
    if status != 200 or json.loads(body).get("counted") != 1:
        return f"POST /v1/usage answered {status}: {body[:300]!r}"
    events = [{"meter": METER, "quantity": 1, "idempotency_key": f"probe-{i}"} for i in range(1, 4)]
    status, body = harness.http(
        "POST", bench.server.port, "/v1/usage/batch", {"key": key, "events": events}
    )
    if status != 200 or json.loads(body).get("count") != 3:
        return f"POST /v1/usage/batch answered {status}: {body[:300]!r}"
    return None


def summarise(args: argparse.Namespace, runs: dict[str, Any], totals: dict[str, int]) -> dict:
    """The tables of docs/benchmarks.md: medians and min–max over the rounds."""
    scenarios, ratios = [], []
    for s in args.scenario_list:
        rs = [r for r in runs["ingest"] if r["scenario"] == s.label]
        scenarios.append(
            {
                "label": s.label,
                "events_per_request": s.events_per_request,
                "connections": s.connections,
            }
            | {k: spread(r[k] for r in rs) for k in ("events_per_s", "rps", "p50_ms", "p99_ms")}
            | {k: spread(r[k] for r in rs) for k in ("server_ms_per_1000", "postgres_ms_per_1000")}
            | {"errors": sum(r["non_2xx"] + r["socket_errors"] for r in rs)}
            | {"cpu_cores": harness.cpu_median(rs), "checkpoints": [r["checkpoints"] for r in rs]}
        )
        ceiling, unit = (
            (runs["tpcb"], "TPC-B transactions/s")
            if s.batch == 0
            else (runs["insert"], "pgbench insert rows/s")
        )
        if ceiling:
            pairs = [
                r["events_per_s"] / c["rows_per_s"]
                for r, c in zip(rs, ceiling, strict=False)
                if c["rows_per_s"]
            ]
            ratio = statistics.median(r["events_per_s"] for r in rs) / statistics.median(
                c["rows_per_s"] for c in ceiling
            )
            ratios.append(
                {
                    "scenario": s.label,
                    "ceiling": unit,
                    "ratio": ratio,
                    "rounds_min": min(pairs, default=0),
                    "rounds_max": max(pairs, default=0),
                }
            )
    pgbench = [
        {
            "label": label,
            **{k: spread(r[k] for r in rs) for k in ("tps", "rows_per_s", "latency_ms")},
            "cpu_cores": {
                k: statistics.median(r["cpu"][k] for r in rs) for k in ("all", "generator")
            },
        }
        for label, rs in (
            ("TPC-B (default script, scale 8)", runs["tpcb"]),
            (f"insert {PGBENCH_ROWS:,} event-shaped rows per transaction", runs["insert"]),
        )
        if rs
    ]
    batched = [x for x in scenarios if x["events_per_request"] > 1]
    best = max(batched, key=lambda x: x["events_per_s"]["median"], default=None)
    targets = [
        {
            "target": f"Batched ingest ≥ {TARGET:,} events/s",
            "measure": "best median",
            "unit": "events/s",
            "value": best and best["events_per_s"]["median"],
            "scenario": best and best["label"],
            "met": bool(best) and best["events_per_s"]["median"] >= TARGET,
        }
    ]
    return {
        "scenarios": scenarios,
        "stored": totals,
        "pgbench_command": f"pgbench -n -c 8 -j 2 -T {max(1, round(args.pgbench_duration))}",
        "pgbench": pgbench,
        "ratios": ratios,
        "targets": targets,
    }


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with harness.bench_run(args.pg_url, f"keyshift_ingest_{os.getpid()}") as bench:
        progress(
            f"creating database {bench.database}, {args.accounts} accounts with a license each"
        )
        harness.pg(args.pg_url, f'CREATE DATABASE "{bench.database}"')
        keys = asyncio.run(
            harness.seed_licenses(
                bench.driver_url,
                bench.tmp / "secrets",
                "ingest-usage@1",
                args.accounts,
                500,
                activate=False,
            )
        )
        (bench.tmp / "keys.txt").write_text("\n".join(keys) + "\n")
        env = {"KEYSHIFT_MAX_BODY_BYTES": str(1024 * 1024), **args.extra_env}
        if args.gc_freeze is not None:
            env.update(gc_freeze_env(bench.tmp, args.gc_freeze))
        bench.server = harness.start_server(
            args.workers, bench.driver_url, bench.tmp / "secrets", bench.tmp, env
        )
        progress(f"server up on {harness.HOST}:{bench.server.port}, pids {bench.server.pids()}")
        if problem := check_sample(bench, keys[0]):
            print(f"{problem}\nnot benchmarking.", file=sys.stderr)
            return 3
        record = harness.Record(
            "ingest",
            "ingest.py",
            argv,
            harness.parameters(args, "scenario_list"),
            harness.machine(args.pg_url),
        )
        record.runs = measure(args, bench)
        bench.server.stop()
        bench.server = None
        record.results = summarise(args, record.runs, stored_totals(bench))
        print(report.render(record.as_json()))
        if record.runs.get("profile"):
            harness.print_profile(record.runs["profile"])
        if not args.no_record:
            progress(f"recorded {record.write(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
