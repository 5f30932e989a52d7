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
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS = ROOT / "docs" / "benchmarks.md"
HOST = "127.0.0.1"  # loopback only, by the machine's rules
EMPTY = "empty"  # label of GET /healthz
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- arguments


def add_load_arguments(parser: argparse.ArgumentParser, *, quiet_wait: float) -> None:
    """The options both benchmark scripts take for waiting out other load and for the
    server's environment."""
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.3,
        help="before each measurement wait until other load is below this many cores ...",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=quiet_wait, help="... for at most this many seconds"
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server, e.g. KEYSHIFT_VALIDATION_CACHE_TTL=300",
    )


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


def database_urls(admin_url: str, name: str) -> tuple[str, str]:
    """(the bench database's libpq URL, its SQLAlchemy asyncpg URL)."""
    from sqlalchemy.engine import make_url

    url = make_url(admin_url).set(database=name)
    plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
    driver = url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    return plain, driver


async def create_database(admin_url: str, name: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        version: str = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return version


async def server_version(admin_url: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        version: str = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return version


async def drop_database(admin_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http(
    method: str, port: int, path: str, body: dict[str, Any] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def worker_pids(self) -> list[int]:
        return children_of(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # uvicorn's master stops its workers
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            # The process group is the one this script created for the server (setsid).
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def start_server(
    workers: int, db_url: str, secrets_dir: Path, tmp: Path, extra_env: dict[str, str]
) -> Server:
    port = free_port()
    env = dict(os.environ)
    env.update(
        KEYSHIFT_DATABASE_URL=db_url,
        KEYSHIFT_SECRETS_DIR=str(secrets_dir),
        KEYSHIFT_LOG_LEVEL="WARNING",
        PROMETHEUS_MULTIPROC_DIR=str(tmp / "metrics"),
    )
    env.update(extra_env)
    log = tmp / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keyshift.cli",
                "serve",
                "--host",
                HOST,
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(process, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(OSError):
            if http("GET", port, "/healthz", timeout=1)[0] == 200:
                # All workers up: uvicorn starts them together, give the last ones a moment.
                time.sleep(1.0)
                return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"the server did not answer /healthz within 60 s:\n{log_tail(log)}")


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- CPU accounting


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def proc_cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
    return pids


def system_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds summed over all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    total = sum(values)
    idle = values[3] + values[4]
    return (total - idle) / CLK_TCK, total / CLK_TCK


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuSnapshot:
    wall: float
    server: dict[int, float]
    postgres: dict[int, float]
    generator: float
    busy: float


def cpu_snapshot(server: Server) -> CpuSnapshot:
    pids = [server.process.pid, *server.worker_pids()]
    return CpuSnapshot(
        wall=time.monotonic(),
        server={p: proc_cpu_seconds(p) for p in pids},
        postgres={p: proc_cpu_seconds(p) for p in postgres_pids()},
        generator=children_cpu(),
        busy=system_busy_seconds()[0],
    )


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """Cores used (CPU seconds per wall second) by the server, PostgreSQL, the generator, all."""
    wall = max(1e-9, after.wall - before.wall)

    def delta(a: dict[int, float], b: dict[int, float]) -> float:
        return sum(v - a.get(p, 0.0) for p, v in b.items())

    used = {
        "server": delta(before.server, after.server) / wall,
        "postgres": delta(before.postgres, after.postgres) / wall,
        "generator": (after.generator - before.generator) / wall,
        "all": (after.busy - before.busy) / wall,
    }
    # Whatever else ran meanwhile (other people's tests on a shared machine): interference.
    used["other"] = max(0.0, used["all"] - used["server"] - used["postgres"] - used["generator"])
    return {k: round(v, 2) for k, v in used.items()}


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until the machine's busy cores drop to ``threshold``;
    returns the last reading. The server is idle between measurements, so this is others' load."""
    deadline = time.monotonic() + max_wait
    while True:
        busy0, wall0 = system_busy_seconds()[0], time.monotonic()
        time.sleep(1.0)
        busy = (system_busy_seconds()[0] - busy0) / (time.monotonic() - wall0)
        if busy <= threshold or time.monotonic() >= deadline:
            return round(busy, 2)


# --------------------------------------------------------------------------- load drivers


@dataclass(frozen=True)
class Target:
    label: str
    method: str
    path: str
    keys_file: Path | None  # POST {"key": random line} when set


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


def run_wrk(
    server: Server, script: Path, connections: int, threads: int, duration: float
) -> dict[str, Any]:
    command = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        f"http://{HOST}:{server.port}",
    ]
    before = cpu_snapshot(server)
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    after = cpu_snapshot(server)
    match = re.search(r"^KSJSON (.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    ok = raw["requests"] - raw["status_errors"]
    return {
        "rps": round(ok / seconds, 1),
        "requests": raw["requests"],
        "non_2xx": raw["status_errors"],
        "socket_errors": raw["socket_errors"],
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "cpu": cpu_usage(before, after),
    }


def run_loadgen(
    server: Server, target: Target, rate: int, duration: float, connections: int
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(HERE / "loadgen.py"),
        "--host",
        HOST,
        "--port",
        str(server.port),
        "--method",
        target.method,
        "--path",
        target.path,
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--connections",
        str(connections),
    ]
    if target.keys_file:
        command += ["--keys-file", str(target.keys_file)]
    before = cpu_snapshot(server)
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    after = cpu_snapshot(server)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["cpu"] = cpu_usage(before, after)
    return result


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


def profile_while(
    pid: int, directory: Path, name: str, seconds: int, drive: Callable[[], object]
) -> dict[str, Any] | None:
    """Sample ``pid`` and its subprocesses with py-spy for ``seconds`` while ``drive()`` puts
    the load on; write ``<name>.txt`` (raw) and ``<name>-summary.json`` into ``directory`` and
    return the summary (None, with a message, if py-spy is missing or recorded nothing).
    Shared by this script and ``ingest.py``."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found (pip install py-spy); profile skipped", file=sys.stderr)
        return None
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / f"{name}.txt"
    spy_process = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--nonblocking",
            "--rate",
            "250",
            "--duration",
            str(seconds),
            "--format",
            "raw",
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    drive()
    try:
        _, err = spy_process.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        spy_process.kill()
        _, err = spy_process.communicate()
    if not raw.exists():
        print(f"py-spy produced nothing: {err.decode(errors='replace')}", file=sys.stderr)
        return None
    summary = summarise_profile(raw.read_text())
    (directory / f"{name}-summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarise_profile(collapsed: str, top: int = 25) -> dict[str, Any]:
    """From py-spy's collapsed ("raw") output: the sample share of each keyshift function
    (inclusive: it or anything it called), the self share of the top frames, and self time by
    package (asyncpg, sqlalchemy, uvicorn ...)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    package: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        package[frame_package(frames[-1])] += count
        for frame in set(frames):
            if "(keyshift/" in frame:
                inclusive[frame] += count

    def shares(counter: Counter[str], n: int = top) -> list[tuple[str, float]]:
        return [(f, round(100 * c / max(1, total), 1)) for f, c in counter.most_common(n)]

    return {
        "samples": total,
        "self_pct": shares(own),
        "keyshift_inclusive_pct": shares(inclusive),
        "self_by_package_pct": shares(package, 15),
    }


def frame_package(frame: str) -> str:
    """``execute (asyncpg/connection.py:377)`` → ``asyncpg``; stdlib modules by file name."""
    match = re.search(r"\(([^/():]+)(/[^():]*)?\.py:\d+\)$", frame)
    if not match:
        return "other"
    return match.group(1) if match.group(2) else f"stdlib {match.group(1)}"


# --------------------------------------------------------------------------- statistics


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(values: list[float], digits: int = 0) -> str:
    med, lo, hi = spread(values)
    if digits == 0:
        return f"{med:,.0f} ({lo:,.0f}–{hi:,.0f})"
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def fmt_some(values: list[float | None], digits: int = 0) -> str:
    """``fmt`` over the runs that produced a value; says how many did not."""
    present = [v for v in values if v is not None]
    if not present:
        return "— (no response)"
    missing = len(values) - len(present)
    return fmt(present, digits) + (f" [{missing} run(s): no response]" if missing else "")


def machine_info(pg_version: str) -> dict[str, str]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    ram = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        ram = f"{kib / 1024 / 1024:.1f} GiB"
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        commit = head + (" (src has uncommitted changes)" if dirty else "")
    versions = []
    for package in ("fastapi", "uvicorn", "sqlalchemy", "asyncpg", "uvloop", "httptools"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions.append(f"{package} {version(package)}")
    wrk_version = "not found"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
        wrk_version = (out.stdout + out.stderr).split("[")[0].strip() or "wrk"
    return {
        "cpus": str(len(os.sched_getaffinity(0))),
        "cpu_model": cpu_model,
        "ram": ram,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "packages": ", ".join(versions),
        "wrk": wrk_version,
        "commit": commit,
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


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


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


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


def cpu_cell(runs: list[dict[str, Any]]) -> str:
    cpu = {k: statistics.median(r["cpu"][k] for r in runs) for k in runs[0]["cpu"]}
    return (
        f"{cpu['server']:.2f} / {cpu['postgres']:.2f} / {cpu['generator']:.2f} / {cpu['other']:.2f}"
    )


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
