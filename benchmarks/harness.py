"""What every benchmark script shares: the bench database, the server on a loopback port,
load generation (wrk, ``loadgen.py``), CPU accounting of the processes involved, py-spy
profiles, statistics and the machine's description."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"  # loopback only, by the machine's rules
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


@dataclass(frozen=True)
class Target:
    label: str
    method: str
    path: str
    keys_file: Path | None  # POST {"key": random line} when set


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


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cpu_cell(runs: list[dict[str, Any]]) -> str:
    cpu = {k: statistics.median(r["cpu"][k] for r in runs) for k in runs[0]["cpu"]}
    return (
        f"{cpu['server']:.2f} / {cpu['postgres']:.2f} / {cpu['generator']:.2f} / {cpu['other']:.2f}"
    )
