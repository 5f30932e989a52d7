"""What the benchmark scripts share: a bench database seeded through the services, the server
on a loopback port, load (wrk with the scripts in ``wrk/``, ``loadgen.py``, pgbench), the CPU
each process used, py-spy profiles, and the record of a run as JSON under ``results/``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
WRK_DIR = HERE / "wrk"
CATALOG = HERE / "catalog"
HOST = "127.0.0.1"  # loopback only, by the machine's rules
T = TypeVar("T")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- arguments


def add_common_arguments(parser: argparse.ArgumentParser, *, quiet_wait: float) -> None:
    """The options every benchmark script takes."""
    add = parser.add_argument
    add("--workers", type=int, default=2, help="uvicorn worker processes")
    add("--duration", type=float, default=10.0, help="seconds per measurement")
    add("--repeats", type=int, default=3, help="runs of each measurement (>= 3 for a spread)")
    add(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="an admin URL of the PostgreSQL server (the bench database is created beside it)",
    )
    add("--wrk-threads", type=int, default=1)
    add(
        "--quiet-threshold",
        type=float,
        default=0.3,
        help="before each measurement wait until other load is below this many cores ...",
    )
    add("--quiet-wait", type=float, default=quiet_wait, help="... for at most this many seconds")
    add(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server, e.g. KEYSHIFT_VALIDATION_CACHE_TTL=300",
    )
    add("--profile", type=Path, metavar="DIR", help="also record a py-spy profile into DIR")
    add("--no-record", action="store_true", help="print only; write no JSON result")
    add("--results", type=Path, default=RESULTS, help="where the JSON result is written")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        args.extra_env = dict(item.split("=", 1) for item in args.server_env)
    except ValueError:
        parser.error("--server-env takes NAME=VALUE")
    if not 1 <= args.workers <= 16:
        parser.error("--workers must be in 1..16")
    if not 1 <= args.duration <= 120:
        parser.error("--duration must be in 1..120 seconds")
    if not 1 <= args.repeats <= 10:
        parser.error("--repeats must be in 1..10")


def alternate(items: Sequence[T], repeats: int) -> Iterator[tuple[int, T]]:
    """Every item once per repeat, the order reversed every other repeat (ABBA…), so a drift
    in background load spreads evenly over them."""
    for rep in range(repeats):
        for item in items if rep % 2 == 0 else items[::-1]:
            yield rep, item


# --------------------------------------------------------------------------- the database


def database_urls(admin_url: str, name: str) -> tuple[str, str]:
    """(the bench database's libpq URL, its SQLAlchemy asyncpg URL)."""
    from sqlalchemy.engine import make_url

    url = make_url(admin_url).set(database=name)
    plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
    driver = url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    return plain, driver


def pg(url: str, statement: str, *params: object) -> Any:
    """Run one statement on a connection of its own; its first row's first value, if any."""
    import asyncpg

    async def run() -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(statement, *params)
        finally:
            await conn.close()

    return asyncio.run(run())


async def seed_licenses(
    db_url: str, secrets_dir: Path, plan_ref: str, count: int, batch: int, *, activate: bool
) -> list[str]:
    """Migrate, publish ``catalog/``, issue ``count`` licenses on ``plan_ref`` (one account
    each, ``batch`` per transaction); returns their plaintext keys. With ``activate`` each is
    activated on one machine, and the line is ``KEY<TAB>FINGERPRINT``."""
    from keyshift.accounts import service as accounts
    from keyshift.catalog.loader import load
    from keyshift.catalog.service import publish
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
            await publish(session, SYSTEM, load(CATALOG))
        keys: list[str] = []
        while len(keys) < count:
            async with db.transaction() as session:
                for _ in range(min(batch, count - len(keys))):
                    account = await accounts.create_account(
                        session, SYSTEM, name=f"bench account {len(keys)}"
                    )
                    await accounts.subscribe(session, SYSTEM, account.id, plan_ref)
                    issued = await licensing.issue_license(
                        session, SYSTEM, secrets.keyring, account_id=account.id
                    )
                    if not activate:
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


def http(
    method: str, port: int, path: str, body: dict[str, Any] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    response = httpx.request(method, f"http://{HOST}:{port}{path}", json=body, timeout=timeout)
    return response.status_code, response.content


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def pids(self) -> list[int]:
        """The master and its workers."""
        with contextlib.suppress(psutil.Error):
            return [self.process.pid, *(c.pid for c in psutil.Process(self.process.pid).children())]
        return []

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
    """``keyshift serve`` on a free loopback port; returns once ``/healthz`` answers."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = int(sock.getsockname()[1])
    env = {
        **os.environ,
        "KEYSHIFT_DATABASE_URL": db_url,
        "KEYSHIFT_SECRETS_DIR": str(secrets_dir),
        "KEYSHIFT_LOG_LEVEL": "WARNING",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp / "metrics"),
        **extra_env,
    }
    log = tmp / "server.log"
    command = [sys.executable, "-m", "keyshift.cli", "serve", "--host", HOST, "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--workers", str(workers)],
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
        with contextlib.suppress(httpx.HTTPError):
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


@dataclass
class Bench:
    """One run's resources: its database, its temporary directory and the server."""

    admin_url: str
    database: str
    tmp: Path
    server: Server | None = None
    drop_database: bool = True

    @property
    def plain_url(self) -> str:
        return database_urls(self.admin_url, self.database)[0]

    @property
    def driver_url(self) -> str:
        return database_urls(self.admin_url, self.database)[1]


@contextlib.contextmanager
def bench_run(admin_url: str, database: str, *, needs_wrk: bool = True) -> Iterator[Bench]:
    """A temporary directory; on leaving (also on Ctrl-C or SIGTERM, then exit status 130)
    the server stopped, the database dropped unless ``drop_database`` was turned off, and the
    directory removed."""
    if needs_wrk and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(admin_url, database, Path(tempfile.mkdtemp(prefix=f"{database}-")))
    try:
        yield bench
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if bench.server is not None:
            bench.server.stop()
        if bench.drop_database:
            with contextlib.suppress(Exception):
                pg(admin_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        shutil.rmtree(bench.tmp, ignore_errors=True)


# --------------------------------------------------------------------------- CPU accounting


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            found[pid] = times.user + times.system
    return found


def postgres_pids(database: str) -> list[int]:
    """The PostgreSQL processes working for ``database`` alone: its backends and autovacuum
    workers (their title names it). The server's shared background processes (WAL writer,
    checkpointer …) and other databases' backends (other people's tests on a shared machine)
    count as "other"."""
    pids = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] != "postgres":
            continue
        title = f" {' '.join(process.info['cmdline'] or [])} "
        if f" {database} " in title:
            pids.append(process.pid)
    return pids


def busy_seconds() -> float:
    """CPU seconds all CPUs have been busy since boot (not idle, not waiting for I/O)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


@dataclass
class CpuSnapshot:
    wall: float
    server: dict[int, float]
    postgres: dict[int, float]
    generator: float
    busy: float


def cpu_snapshot(bench: Bench) -> CpuSnapshot:
    children = psutil.Process().cpu_times()  # the generators are our waited-for children
    return CpuSnapshot(
        wall=time.monotonic(),
        server=cpu_seconds(bench.server.pids() if bench.server else []),
        postgres=cpu_seconds(postgres_pids(bench.database)),
        generator=children.children_user + children.children_system,
        busy=busy_seconds(),
    )


@contextlib.contextmanager
def cpu_sampled(bench: Bench) -> Iterator[dict[str, float]]:
    """Fills the yielded dict, on leaving, with the cores (CPU seconds per wall second) the
    server, the bench database's PostgreSQL processes, the load generator and everything
    else used meanwhile. A process that exits meanwhile (a pgbench client's backend) counts
    under "other"."""
    before = cpu_snapshot(bench)
    used: dict[str, float] = {}
    yield used
    after = cpu_snapshot(bench)
    wall = max(1e-9, after.wall - before.wall)

    def delta(a: dict[int, float], b: dict[int, float]) -> float:
        return sum(v - a.get(p, 0.0) for p, v in b.items())

    used["server"] = delta(before.server, after.server) / wall
    used["postgres"] = delta(before.postgres, after.postgres) / wall
    used["generator"] = (after.generator - before.generator) / wall
    used["all"] = (after.busy - before.busy) / wall
    # Whatever else ran meanwhile (other people's tests on a shared machine): interference.
    used["other"] = max(0.0, used["all"] - used["server"] - used["postgres"] - used["generator"])
    used.update({k: round(v, 3) for k, v in used.items()})


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until the machine's busy cores drop to ``threshold``;
    returns the last reading. The server is idle between measurements, so this is others' load."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = psutil.cpu_percent(interval=1.0) / 100 * psutil.cpu_count()
        if busy <= threshold or time.monotonic() >= deadline:
            return round(busy, 2)


# --------------------------------------------------------------------------- load


def run_wrk(
    bench: Bench,
    script: str,
    script_args: Sequence[object],
    *,
    connections: int,
    threads: int,
    duration: float,
    timeout: int = 5,
) -> dict[str, Any]:
    """wrk with ``wrk/<script>`` against the server: requests/s of 2xx answers, errors,
    latency percentiles, and the CPU split."""
    assert bench.server is not None
    command = [
        *("wrk", f"-t{min(threads, connections)}", f"-c{connections}"),
        *(f"-d{max(1, round(duration))}s", "--timeout", f"{timeout}s", "-s", script),
        f"http://{HOST}:{bench.server.port}",
        *("--", *map(str, script_args)),
    ]
    with cpu_sampled(bench) as cpu:
        done = subprocess.run(
            command, cwd=WRK_DIR, capture_output=True, text=True, timeout=duration + 60
        )
    match = re.search(r"^KSJSON (.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    ok = raw["requests"] - raw["status_errors"]
    return {
        "rps": round(ok / seconds, 1),
        "ok": ok,
        "seconds": seconds,
        "requests": raw["requests"],
        "non_2xx": raw["status_errors"],
        "socket_errors": raw["socket_errors"],
        **{f"{p}_ms": raw[f"{p}_us"] / 1000 for p in ("p50", "p90", "p99", "max")},
        "cpu": cpu,
    }


def run_loadgen(
    bench: Bench,
    method: str,
    path: str,
    keys_file: Path | None,
    *,
    rate: int,
    duration: float,
    connections: int,
) -> dict[str, Any]:
    """``loadgen.py`` at a fixed rate (open loop): its JSON result, and the CPU split."""
    assert bench.server is not None
    command = [sys.executable, str(HERE / "loadgen.py"), "--host", HOST]
    command += ["--port", str(bench.server.port), "--method", method, "--path", path]
    command += ["--rate", str(rate), "--duration", str(duration)]
    command += ["--connections", str(connections)]
    command += ["--keys-file", str(keys_file)] if keys_file else []
    with cpu_sampled(bench) as cpu:
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["cpu"] = cpu
    return result


def pgbench_binary() -> str | None:
    found = shutil.which("pgbench")
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"))
    return found or (str(candidates[-1]) if candidates else None)


def pgbench(bench: Bench, *options: str, timeout: float) -> dict[str, Any] | None:
    """One pgbench run on the bench database: transactions/s (without the initial connection
    time), average latency and the CPU split; None, with the reason, if it failed."""
    binary = pgbench_binary()
    if binary is None:
        print("pgbench not found; skipped", file=sys.stderr)
        return None
    with cpu_sampled(bench) as cpu:
        run = subprocess.run(
            [binary, *options, bench.plain_url], capture_output=True, text=True, timeout=timeout
        )
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", run.stdout)
    latency = re.search(r"latency average = ([\d.]+) ms", run.stdout)
    if run.returncode != 0 or (tps is None and "-i" not in options):
        print(f"pgbench failed, skipped: {run.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return {
        "command": shlex.join(["pgbench", *options]),
        "tps": float(tps.group(1)) if tps else None,
        "latency_ms": float(latency.group(1)) if latency else None,
        "cpu": cpu,
    }


# --------------------------------------------------------------------------- profile


def profile_while(
    pid: int, directory: Path, name: str, seconds: int, drive: Callable[[], object]
) -> dict[str, Any] | None:
    """Sample ``pid`` and its subprocesses with py-spy for ``seconds`` while ``drive()`` puts
    the load on; write ``<name>.txt`` (raw) and ``<name>-summary.json`` into ``directory`` and
    return the summary (None, with a message, if py-spy is missing or recorded nothing)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found (pip install py-spy); profile skipped", file=sys.stderr)
        return None
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / f"{name}.txt"
    spy_process = subprocess.Popen(
        [
            *(spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking"),
            *("--rate", "250", "--duration", str(seconds), "--format", "raw", "--output", str(raw)),
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


def print_profile(profile: dict[str, Any]) -> None:
    for title, key in (
        ("keyshift functions, inclusive", "keyshift_inclusive_pct"),
        ("self time by package", "self_by_package_pct"),
        ("top frames by self time", "self_pct"),
    ):
        print(f"py-spy, {title} (% of samples):")
        for frame, pct in profile[key][:15]:
            print(f"  {pct:5.1f}  {frame}")


# --------------------------------------------------------------------------- statistics


def spread(values: Iterable[float | None]) -> dict[str, Any] | None:
    """Median, min and max of the runs that produced a value (how many did not, if any)."""
    values = list(values)
    present = [v for v in values if v is not None]
    if not present:
        return None
    out: dict[str, Any] = {
        "median": statistics.median(present),
        "min": min(present),
        "max": max(present),
    }
    if len(present) < len(values):
        out["missing"] = len(values) - len(present)
    return out


def cpu_median(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Each party's median cores over the runs."""
    return {k: round(statistics.median(r["cpu"][k] for r in runs), 3) for k in runs[0]["cpu"]}


# --------------------------------------------------------------------------- recording


def package_versions(*names: str) -> dict[str, str]:
    versions = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def git_commit() -> str:
    """HEAD, marked when ``src`` has uncommitted changes (the server runs the working tree)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):

        def git(*args: str) -> str:
            run = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
            return run.stdout.strip()

        head = git("rev-parse", "--short", "HEAD")
        if git("status", "--porcelain", "--untracked-files=no", "src"):
            return f"{head} (src has uncommitted changes)"
        return head
    return "unknown"


def machine(admin_url: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu_model = found.group(1).strip() if found else cpu_model
    wrk = None
    if shutil.which("wrk") is not None:
        run = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        wrk = (run.stdout + run.stderr).split("[")[0].strip() or "wrk"
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": pg(admin_url, "SHOW server_version"),
        "packages": package_versions(
            "fastapi", "uvicorn", "sqlalchemy", "asyncpg", "uvloop", "httptools"
        ),
        "wrk": wrk,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }


@dataclass
class Record:
    """A run's JSON record: what, where, when, with which parameters; the summaries shown in
    docs/benchmarks.md (``results``) and every measurement behind them (``runs``)."""

    benchmark: str
    script: str
    argv: list[str]
    parameters: dict[str, Any]
    machine: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, Any] = field(default_factory=dict)
    date: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def as_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "source": f"measured by benchmarks/{self.script}",
            "date": f"{self.date:%Y-%m-%dT%H:%M:%SZ}",
            "commit": git_commit(),
            "command": shlex.join([".venv/bin/python", f"benchmarks/{self.script}", *self.argv]),
            "machine": self.machine,
            "parameters": self.parameters,
            "results": self.results,
            "runs": self.runs,
        }

    def write(self, directory: Path) -> Path:
        """``<directory>/<benchmark>-<UTC time>.json``."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.benchmark}-{self.date:%Y%m%dT%H%M%SZ}.json"
        path.write_text(json.dumps(self.as_json(), indent=2, default=str) + "\n")
        return path


def parameters(args: argparse.Namespace, *skip: str) -> dict[str, Any]:
    """The run's options as JSON values (paths as text), without the derived ones."""
    drop = {"no_record", "results", "server_env", *skip}
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in drop}


@dataclass
class OtlpSink:
    """What a loopback OTLP/HTTP receiver took: export requests and their bytes."""

    endpoint: str
    requests: int = 0
    bytes: int = 0


@contextlib.contextmanager
def otlp_sink() -> Iterator[OtlpSink]:
    """A receiver for the server's spans (``OTEL_EXPORTER_OTLP_ENDPOINT``) in a thread: it
    reads each export and answers 200 with an empty response (a valid empty protobuf),
    counting what arrived but parsing nothing, so it costs the machine little."""
    sink = OtlpSink("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            sink.requests += 1
            sink.bytes += len(body)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((HOST, 0), Handler)
    sink.endpoint = f"http://{HOST}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
