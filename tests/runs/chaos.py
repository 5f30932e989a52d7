"""The chaos harness of ``tests/runs/test_chaos.py`` and ``benchmarks/chaos.py``: a seeded run
on a private PostgreSQL, worked by `keyshift worker` processes while a driver SIGKILLs a
random busy worker every few seconds (starting a replacement) and restarts PostgreSQL once;
then what the run left, read back to be compared with an undisturbed twin's.

Imports nothing from pytest: the benchmark runs it as a script.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from sqlalchemy import func, select

from keyshift.audit import service as audit
from keyshift.context import SYSTEM, Actor
from keyshift.db.engine import Database
from keyshift.db.migrate import upgrade_to_head
from keyshift.db.tables import Migration, MigrationStep, RunAccount
from keyshift.migration.loader import load_rules
from keyshift.runs import service
from keyshift.runs.model import Cohort, RunOptions
from keyshift.security.secrets_store import Secrets
from keyshift.simulation.checksum import state_checksum
from keyshift.simulation.seed import seed
from keyshift.states import Step, StepOutcome
from tests.private_postgres import PrivatePostgres

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "examples" / "migrations" / "pro-2023-to-2025.toml"
CATALOG = ROOT / "examples" / "catalog"
#: The seeded data's anchor: both databases hold the same accounts in the same state.
AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
APPROVER = Actor(id="chaos-approver", scopes=frozenset({"admin"}))


def chaos_options(batch_size: int) -> RunOptions:
    """Small batches (a kill lands inside one), the shortest lease (a dead worker's batch is
    taken again after 5 s), never halting, and as many attempts as allowed: nothing the chaos
    does may quarantine an account (the test says so)."""
    return RunOptions(batch_size=batch_size, lease_seconds=5, failure_threshold=1, max_attempts=20)


async def prepare_run(
    url: str, secrets: Secrets, *, accounts: int, options: RunOptions, seed_value: int = 1
) -> tuple[str, int]:
    """Migrate the schema, seed ``accounts`` synthetic accounts, and create, report, approve
    and start a run of the example Pro 2023 → 2025 rules over every account on pro-seat@2023.
    Returns the run's id and its number of accounts."""
    db = Database(url)
    try:
        await upgrade_to_head(db.engine)
        await seed(
            db,
            accounts=accounts,
            seed=seed_value,
            keyring=secrets.keyring,
            actor=SYSTEM,
            catalog_dir=CATALOG,
            at=AT,
        )
        rules, _ = load_rules(RULES)
        run = await service.create(db, SYSTEM, rules, Cohort(), options)
        await service.report(db, SYSTEM, run.id)
        await service.approve(db, APPROVER, run.id)
        await service.start(db, SYSTEM, run.id)
        return run.id, run.total
    finally:
        await db.dispose()


def worker_env(url: str, secrets_dir: Path) -> dict[str, str]:
    return {**os.environ, "KEYSHIFT_DATABASE_URL": url, "KEYSHIFT_SECRETS_DIR": str(secrets_dir)}


def spawn_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A `keyshift worker --until-idle` process, its stderr appended to ``log``."""
    with log.open("ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "keyshift.cli", "worker", "--until-idle", "--poll", "0.2"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def undisturbed(env: dict[str, str], workers: int, log_dir: Path, timeout: float) -> float:
    """Work the run with ``workers`` processes and nothing in their way; seconds taken."""
    started = time.monotonic()
    processes = [spawn_worker(env, log_dir / f"twin-{i}.log") for i in range(workers)]
    try:
        for process in processes:
            process.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    bad = [p.returncode for p in processes if p.returncode != 0]
    if bad:
        raise RuntimeError(f"an undisturbed worker failed ({bad}); see {log_dir}")
    return time.monotonic() - started


@dataclass
class Chaos:
    """What the driver did and saw."""

    seconds: float = 0.0
    #: Kills, each of a worker that held claimed accounts at that moment (a batch in hand).
    kills: int = 0
    #: Settled accounts when PostgreSQL was restarted (None: never restarted).
    restarted_at_settled: int | None = None
    restart_seconds: float = 0.0
    #: Workers that exited by themselves with a failure: (pid, exit status, their log).
    crashed: list[tuple[int, int, str]] = field(default_factory=list)
    final_state: str | None = None
    timed_out: bool = False
    spawned: int = 0


def _raw_url(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _peek(url: str, run_id: str) -> tuple[str, int, dict[str, int]] | None:
    """The run's state, its settled accounts, and the claimed accounts per worker pid
    (None while the database is down)."""
    try:
        connection = await asyncpg.connect(_raw_url(url), timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        state = await connection.fetchval("SELECT state FROM migration_runs WHERE id = $1", run_id)
        settled = await connection.fetchval(
            "SELECT count(*) FROM run_accounts WHERE run_id = $1"
            " AND state NOT IN ('pending', 'claimed')",
            run_id,
        )
        holders = await connection.fetch(
            "SELECT lease_owner, count(*) AS n FROM run_accounts WHERE run_id = $1"
            " AND state = 'claimed' AND lease_owner IS NOT NULL GROUP BY lease_owner",
            run_id,
        )
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
    by_pid = {}
    for row in holders:
        parts = str(row["lease_owner"]).split(":")
        if len(parts) >= 3 and parts[-2].isdigit():
            by_pid[int(parts[-2])] = int(row["n"])
    return str(state), int(settled), by_pid


async def _moved_since(url: str, moment: datetime) -> bool:
    """Whether a migration step was recorded after ``moment`` (False while the database is
    down)."""
    try:
        connection = await asyncpg.connect(_raw_url(url), timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        return bool(
            await connection.fetchval(
                "SELECT EXISTS (SELECT 1 FROM migration_ledger WHERE at > $1)", moment
            )
        )
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


def unleash(
    pg: PrivatePostgres,
    url: str,
    env: dict[str, str],
    run_id: str,
    total: int,
    *,
    log_dir: Path,
    workers: int = 4,
    kill_every: tuple[float, float] = (2.0, 3.0),
    max_kills: int | None = None,
    restart_at: float = 0.3,
    deadline: float = 180.0,
    rng: random.Random | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> Chaos:
    """Work the run with ``workers`` worker processes while SIGKILLing one every
    ``kill_every`` seconds (a random one of those holding a batch; none while all are starting
    up), at most ``max_kills`` times, and starting a replacement each time; and restart
    PostgreSQL (``immediate``: as a crash) once, when ``restart_at`` of the run is settled.
    A kill waits until the run has moved on since the last one (a new ledger row): on a
    machine too loaded to finish a step between kills, there would be nothing but chaos.
    Until the run completes or ``deadline`` seconds pass (bounded); then the workers are left
    to exit by themselves (``--until-idle``)."""
    rng = rng or random.Random()
    chaos = Chaos()
    live: list[subprocess.Popen[bytes]] = []
    logs: dict[int, Path] = {}

    def spawn() -> None:
        log = log_dir / f"worker-{chaos.spawned}.log"
        process = spawn_worker(env, log)
        live.append(process)
        logs[process.pid] = log
        chaos.spawned += 1

    started = time.monotonic()
    for _ in range(workers):
        spawn()
    next_kill = started + rng.uniform(*kill_every)
    last_kill = datetime.now(UTC)
    try:
        while True:
            now = time.monotonic()
            if now - started > deadline:
                chaos.timed_out = True
                break
            for process in list(live):  # a worker that exits by itself mid-run crashed
                if process.poll() is not None:
                    live.remove(process)
                    if process.returncode != 0:
                        tail = logs[process.pid].read_text(errors="replace")[-3000:]
                        chaos.crashed.append((process.pid, process.returncode, tail))
                    spawn()
            peek = asyncio.run(_peek(url, run_id))
            if peek is not None:
                state, settled, holders = peek
                chaos.final_state = state
                if state != "running":
                    break
                if chaos.restarted_at_settled is None and settled >= restart_at * total:
                    say(f"restarting PostgreSQL at {settled}/{total} settled")
                    began = time.monotonic()
                    pg.restart(mode="immediate")
                    chaos.restart_seconds = time.monotonic() - began
                    chaos.restarted_at_settled = settled
                    continue
                busy = [p for p in live if holders.get(p.pid)]
                if (
                    now >= next_kill
                    and busy  # one still starting up would be no news
                    and (max_kills is None or chaos.kills < max_kills)
                    and asyncio.run(_moved_since(url, last_kill))
                ):
                    last_kill = datetime.now(UTC)
                    victim = rng.choice(busy)
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    live.remove(victim)
                    chaos.kills += 1
                    say(f"killed worker {victim.pid} holding {holders[victim.pid]} accounts")
                    spawn()
                    next_kill = time.monotonic() + rng.uniform(*kill_every)
            time.sleep(0.2)
    finally:
        chaos.seconds = time.monotonic() - started
        for process in live:  # --until-idle: they leave once the run is done
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.returncode not in (0, -signal.SIGKILL):
                tail = logs[process.pid].read_text(errors="replace")[-3000:]
                chaos.crashed.append((process.pid, process.returncode, tail))
    return chaos


@dataclass
class Outcome:
    """What a run left, to be compared with another run's."""

    run_state: str
    #: Each run account's state.
    states: dict[str, str]
    #: Each account's cutover ledger rows (any migration, any run): (all, those done).
    cutovers: dict[str, tuple[int, int]]
    #: Each account's migrations made by the run.
    migrations: dict[str, int]
    #: Run accounts that carry an error (a failed attempt).
    errors: dict[str, str]
    checksum: str
    audit_ok: bool
    audit_checked: int
    audit_problem: str | None


async def outcome(url: str, run_id: str) -> Outcome:
    db = Database(url)
    try:
        async with db.transaction() as session:
            run = await service.get(session, run_id)
            accounts = (
                await session.execute(
                    select(RunAccount.account_id, RunAccount.state, RunAccount.error).where(
                        RunAccount.run_id == run_id
                    )
                )
            ).all()
            cutover_rows = (
                await session.execute(
                    select(
                        MigrationStep.account_id,
                        func.count(),
                        func.count().filter(MigrationStep.outcome == StepOutcome.DONE),
                    )
                    .where(MigrationStep.step == Step.CUTOVER)
                    .group_by(MigrationStep.account_id)
                )
            ).all()
            migration_rows = (
                await session.execute(
                    select(Migration.account_id, func.count())
                    .where(Migration.run_id == run_id)
                    .group_by(Migration.account_id)
                )
            ).all()
            report = await audit.verify(session)
        checksum = await state_checksum(db, at=AT, across_runs=True)
    finally:
        await db.dispose()
    return Outcome(
        run_state=str(run.state),
        states={a: str(s) for a, s, _ in accounts},
        cutovers={a: (int(n), int(done)) for a, n, done in cutover_rows},
        migrations={a: int(n) for a, n in migration_rows},
        errors={a: e for a, _, e in accounts if e},
        checksum=checksum,
        audit_ok=report.ok,
        audit_checked=report.checked,
        audit_problem=str(report.first) if report.first else None,
    )


def problems(chaos: Outcome, twin: Outcome) -> list[str]:
    """Every way the chaotic run differs from the undisturbed one, or broke exactly-once (an
    empty list: none). A double cutover shows as an account with two cutover rows (two
    migrations of it each cut over: the ledger's key is (migration, step), so one migration
    cannot hold two) or, if the second was not recorded, as a checksum that differs."""
    found = []
    if chaos.run_state != "completed":
        found.append(f"the run is {chaos.run_state}, not completed")
    if chaos.states != twin.states:
        differ = {
            a: (s, twin.states.get(a)) for a, s in chaos.states.items() if twin.states.get(a) != s
        }
        found.append(f"{len(differ)} accounts ended otherwise than undisturbed: {_some(differ)}")
    stuck = {a: s for a, s in chaos.states.items() if s not in ("migrated", "skipped")}
    if stuck:
        found.append(f"{len(stuck)} accounts neither migrated nor skipped: {_some(stuck)}")
    migrated = [a for a, s in chaos.states.items() if s == "migrated"]
    not_once = {
        a: chaos.cutovers.get(a, (0, 0)) for a in migrated if chaos.cutovers.get(a) != (1, 1)
    }
    if not_once:
        found.append(
            f"{len(not_once)} migrated accounts without exactly one cutover (rows, done):"
            f" {_some(not_once)}"
        )
    others = {a: n for a, n in chaos.cutovers.items() if chaos.states.get(a) != "migrated"}
    if others:
        found.append(
            f"{len(others)} accounts not migrated by the run were cut over: {_some(others)}"
        )
    if chaos.cutovers != twin.cutovers:
        found.append("the cutover rows differ from the undisturbed run's")
    many = {a: n for a, n in chaos.migrations.items() if n != 1}
    if many:
        found.append(f"{len(many)} accounts with more than one migration: {_some(many)}")
    if chaos.checksum != twin.checksum:
        found.append(f"checksum {chaos.checksum} != undisturbed {twin.checksum}")
    for name, result in (("chaos", chaos), ("undisturbed", twin)):
        if not result.audit_ok:
            found.append(f"the {name} run's audit chain does not verify: {result.audit_problem}")
    return found


def _some(items: dict[str, object], n: int = 5) -> str:
    shown = ", ".join(f"{k}: {v}" for k, v in list(items.items())[:n])
    return shown + (" …" if len(items) > n else "")
