"""`keyshift simulate …`: synthetic data at scale, and a whole migration run rehearsed on it in a
scratch database (docs/runs.md, "Simulation")."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from keyshift.cli.runtime import run

if TYPE_CHECKING:
    from keyshift.config import Settings
    from keyshift.db.engine import Database
    from keyshift.runs.model import RunOptions

#: As ``keyshift.simulation.seed.MAX_ACCOUNTS`` (not imported: `--help` stays light).
MAX_ACCOUNTS = 10_000_000
DEFAULT_CATALOG = Path("examples/catalog")
AT_FORMATS = ["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S"]
#: Seconds between a rehearsal's progress lines while its workers run.
PROGRESS_SECONDS = 5.0

group = typer.Typer(no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(group, name="simulate")


def _bad(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _instant(at: datetime | None) -> datetime | None:
    """``--at`` as an aware instant (UTC if it has no offset)."""
    from datetime import UTC

    return None if at is None else at if at.tzinfo else at.replace(tzinfo=UTC)


def _checked_url(url: str | None) -> str:
    """The database URL to seed: the given one (normalised), or a new temporary SQLite file."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from keyshift.config import normalise_database_url

    if url is None:
        path = Path(tempfile.mkdtemp(prefix="keyshift-simulate-")) / "keyshift.db"
        return f"sqlite+aiosqlite:///{path}"
    try:
        parsed = make_url(normalise_database_url(url))
    except ArgumentError:
        _bad(f"--database-url {url!r} is not a database URL (postgresql://… or sqlite:///…)")
    if parsed.drivername not in ("postgresql+asyncpg", "sqlite+aiosqlite"):
        _bad(f"--database-url must be PostgreSQL or SQLite, not {parsed.drivername!r}")
    if not parsed.database:
        _bad("--database-url names no database")
    return parsed.render_as_string(hide_password=False)


@group.command("seed")
def seed_command(
    accounts: int = typer.Option(..., "--accounts", help="How many accounts to create."),
    seed: int = typer.Option(1, "--seed", help="The same seed gives the same accounts."),
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        help="A scratch database (PostgreSQL or SQLite), migrated to the current schema first. "
        "Default: a new temporary SQLite file.",
    ),
    at: datetime | None = typer.Option(
        None,
        "--at",
        formats=AT_FORMATS,
        help="The instant the data is anchored on (UTC if no offset); default now. The same "
        "seed and --at give the same checksum.",
    ),
    catalog_dir: Path = typer.Option(
        DEFAULT_CATALOG, "--catalog", help="The example catalog, published first if absent."
    ),
) -> None:
    """Create N synthetic accounts from a seed, in bulk, and print counts and the checksum."""
    if not 1 <= accounts <= MAX_ACCOUNTS:
        _bad(f"--accounts must be between 1 and {MAX_ACCOUNTS:,}, got {accounts:,}")
    url = _checked_url(database_url)
    if not catalog_dir.is_dir():
        _bad(f"{catalog_dir} is not a directory; run from the repository root or pass --catalog")

    async def work(settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.db.migrate import upgrade_to_head
        from keyshift.security.secrets_store import ensure_secrets
        from keyshift.simulation.checksum import state_checksum
        from keyshift.simulation.seed import seed as seed_accounts

        anchor = _instant(at)
        secrets, _ = ensure_secrets(settings.secrets_dir)
        await upgrade_to_head(db.engine)
        typer.echo(f"database {db.engine.url.render_as_string(hide_password=True)}")
        summary = await seed_accounts(
            db,
            accounts=accounts,
            seed=seed,
            keyring=secrets.keyring,
            actor=cli_actor(),
            catalog_dir=catalog_dir,
            at=anchor,
        )
        typer.echo(
            f"seeded {summary.accounts:,} accounts (seed {seed}, at {summary.anchor:%Y-%m-%dT%H:%M:%SZ})"
            f" in {summary.seconds:.1f} s: {summary.accounts_per_second:,.0f} accounts/s"
        )
        typer.echo("rows: " + ", ".join(f"{n} {c:,}" for n, c in summary.rows.items()))
        typer.echo("plans: " + ", ".join(f"{n} {c:,}" for n, c in summary.plans.items()))
        typer.echo("spread: " + ", ".join(f"{n} {c:,}" for n, c in summary.tallies.items()))
        checksum = await state_checksum(db, at=summary.anchor)
        typer.echo(f"checksum sha256 {checksum}")

    run(work, database_url=url)


# -- the whole lifecycle ------------------------------------------------------------------------

#: The most worker processes a rehearsal starts (each holds a few database connections).
MAX_WORKERS = 16
#: The exit status of a run that did not complete (it halted), as `keyshift runs start --wait`.
EXIT_HALTED = 5


@dataclass(frozen=True)
class Scratch:
    """Where a rehearsal runs: a new PostgreSQL database on ``server`` (its maintenance URL),
    or a new SQLite file in ``directory``."""

    url: str
    name: str
    server: str | None = None
    directory: Path | None = None


def _scratch(server_url: str | None) -> Scratch:
    """A new scratch database's place: on the PostgreSQL server of ``server_url``, or a
    temporary SQLite file. Nothing is created yet."""
    if server_url is None:
        directory = Path(tempfile.mkdtemp(prefix="keyshift-simulate-"))
        path = directory / "keyshift.db"
        return Scratch(f"sqlite+aiosqlite:///{path}", str(path), directory=directory)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from keyshift.config import normalise_database_url

    try:
        parsed = make_url(normalise_database_url(server_url))
    except ArgumentError:
        _bad(f"--database-url {server_url!r} is not a PostgreSQL URL (postgresql://…)")
    if parsed.drivername != "postgresql+asyncpg":
        _bad(
            "--database-url must be a PostgreSQL server (postgresql://…); leave it out for a "
            "temporary SQLite file"
        )
    name = f"keyshift_sim_{secrets.token_hex(4)}"
    server = parsed.set(database=parsed.database or "postgres")
    return Scratch(
        url=parsed.set(database=name).render_as_string(hide_password=False),
        name=name,
        server=server.render_as_string(hide_password=False),
    )


async def _on_server(scratch: Scratch, statement: str) -> None:
    """Run one statement on the scratch database's server, outside a transaction."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    assert scratch.server is not None
    engine = create_async_engine(scratch.server, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def _create(scratch: Scratch) -> None:
    """Create the scratch PostgreSQL database, C collation (the checksum's id order)."""
    from sqlalchemy.engine import make_url

    shown = make_url(scratch.server or "").set(drivername="postgresql").render_as_string()
    try:
        await _on_server(
            scratch,
            f"CREATE DATABASE \"{scratch.name}\" TEMPLATE template0 ENCODING 'UTF8' "
            "LC_COLLATE 'C' LC_CTYPE 'C'",
        )
    except Exception as error:
        cause = getattr(error, "orig", None) or error  # a DBAPIError wraps the driver's
        first = (str(cause).strip().splitlines() or [""])[0]
        _bad(f"cannot create a scratch database on {shown}: {type(cause).__name__}: {first}", 6)


async def _drop(scratch: Scratch) -> None:
    await _on_server(scratch, f'DROP DATABASE IF EXISTS "{scratch.name}" WITH (FORCE)')


@group.callback(invoke_without_command=True)
def rehearse(
    ctx: typer.Context,
    accounts: int | None = typer.Option(None, "--accounts", help="How many accounts to create."),
    rules_path: Path | None = typer.Option(
        None, "--rules", help="The migration rules to rehearse (TOML; required)."
    ),
    seed: int = typer.Option(1, "--seed", help="The same seed and --at give the same accounts."),
    workers: int = typer.Option(
        1,
        "--workers",
        help="Worker processes. Above 1 needs PostgreSQL: on SQLite one worker runs in this "
        "process.",
    ),
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        help="A PostgreSQL server: a temporary database keyshift_sim_… is created on it and "
        "dropped at the end. Default: a temporary SQLite file.",
    ),
    canary: int | None = typer.Option(
        None, "--canary", help="Canary size in accounts (default: 1 % of the run, at least 1)."
    ),
    batch_size: int = typer.Option(50, "--batch-size", help="Accounts a worker claims at a time."),
    at: datetime | None = typer.Option(
        None,
        "--at",
        formats=AT_FORMATS,
        help="The instant the data is anchored on (UTC if no offset); default now, to the "
        "second. Pass the printed one to repeat a rehearsal.",
    ),
    catalog_dir: Path = typer.Option(
        DEFAULT_CATALOG, "--catalog", help="The example catalog, published first."
    ),
    keep: bool = typer.Option(False, "--keep", help="Keep the scratch database."),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Rehearse a whole migration run on synthetic accounts in a scratch database.

    Seeds N accounts, reports, approves (as a second person), rolls out with K workers (the canary, then the rest), verifies every account, and prints the throughput, the failures and the final state's checksum.

    Exit status 0 only if the run completed and every account checks out. `keyshift simulate seed` only seeds."""
    if ctx.invoked_subcommand is not None:
        return
    if accounts is None:
        _bad("--accounts is required")
    assert accounts is not None
    if not 1 <= accounts <= MAX_ACCOUNTS:
        _bad(f"--accounts must be between 1 and {MAX_ACCOUNTS:,}, got {accounts:,}")
    if rules_path is None:
        _bad("--rules is required: a migration rules file (examples/migrations/ has some)")
    assert rules_path is not None
    if not rules_path.is_file():
        _bad(f"{rules_path}: no such rules file")
    if not 1 <= workers <= MAX_WORKERS:
        _bad(f"--workers must be between 1 and {MAX_WORKERS}, got {workers}")
    if canary is not None and canary < 0:
        _bad(f"--canary must be 0 or more, got {canary}")
    if not 1 <= batch_size <= 1000:
        _bad(f"--batch-size must be between 1 and 1,000, got {batch_size}")
    if not catalog_dir.is_dir():
        _bad(f"{catalog_dir} is not a directory; run from the repository root or pass --catalog")
    if database_url is None and workers > 1:
        _bad(
            "--workers above 1 needs PostgreSQL (--database-url): SQLite has one writer, so a "
            "rehearsal on it runs one worker in this process"
        )
    from keyshift.cli.rules import load
    from keyshift.runs.model import RunOptions

    load(rules_path)  # the schema, before anything is created (problems on their lines)
    scratch = _scratch(database_url)
    rehearsal = _Rehearsal(
        accounts=accounts,
        rules_path=rules_path,
        seed=seed,
        workers=workers,
        options=RunOptions(
            canary=canary or 0,
            canary_percent=1.0 if canary is None else None,
            batch_size=batch_size,
        ),
        anchor=_instant(at),
        catalog_dir=catalog_dir,
        scratch=scratch,
        keep=keep,
        json_out=json_out,
    )
    try:
        run(rehearsal.work, database_url=scratch.url)
    finally:
        if scratch.directory is not None and not keep:
            shutil.rmtree(scratch.directory, ignore_errors=True)


@dataclass
class _Rehearsal:
    """One `keyshift simulate` run: its parameters, and what it found, printed at the end."""

    accounts: int
    rules_path: Path
    seed: int
    workers: int
    options: RunOptions
    anchor: datetime | None
    catalog_dir: Path
    scratch: Scratch
    keep: bool
    json_out: bool
    found: dict[str, Any] = field(default_factory=dict)

    def say(self, line: str) -> None:
        if not self.json_out:
            typer.echo(line)

    async def work(self, settings: Settings, db: Database) -> None:
        if self.scratch.server is not None:
            await _create(self.scratch)
        try:
            code = await self._lifecycle(settings, db)
        finally:
            await db.dispose()
            if self.scratch.server is not None and not self.keep:
                await _drop(self.scratch)
        if self.keep:
            where = self.scratch.url if self.scratch.server is None else self.scratch.name
            typer.echo(f"kept the scratch database: {where}", err=True)
        if code:
            raise typer.Exit(code)

    async def _lifecycle(self, settings: Settings, db: Database) -> int:
        from keyshift.cli.output import emit_json
        from keyshift.cli.rules import checked
        from keyshift.context import cli_actor
        from keyshift.db.migrate import upgrade_to_head
        from keyshift.security.secrets_store import ensure_secrets
        from keyshift.simulation import rehearsal
        from keyshift.simulation.checksum import outcome_checksum, state_checksum
        from keyshift.simulation.seed import seed as seed_accounts

        actor = cli_actor()
        found = self.found
        secrets_, _ = ensure_secrets(settings.secrets_dir)
        await upgrade_to_head(db.engine)
        kind = "SQLite file" if self.scratch.server is None else "PostgreSQL database"
        self.say(f"scratch {kind} {self.scratch.name}")
        summary = await seed_accounts(
            db,
            accounts=self.accounts,
            seed=self.seed,
            keyring=secrets_.keyring,
            actor=actor,
            catalog_dir=self.catalog_dir,
            at=self.anchor,
        )
        anchor = summary.anchor
        found.update(
            seed=self.seed,
            at=anchor,
            accounts=self.accounts,
            workers=self.workers,
            database="sqlite" if self.scratch.server is None else "postgresql",
            scratch=self.scratch.name,
            seeded_checksum=await state_checksum(db, at=anchor),
        )
        self.say(
            f"seeded {self.accounts:,} accounts (seed {self.seed}, at {anchor:%Y-%m-%dT%H:%M:%SZ})"
            f" in {summary.seconds:.1f} s; checksum sha256 {found['seeded_checksum']}"
        )
        rules = await checked(db, self.rules_path)
        run_id, report = await rehearsal.create_and_report(db, actor, rules, self.options)
        found.update(run=run_id, rules=rules.ref, report=report["outcomes"])
        if not self.json_out:
            from keyshift.cli.runs import print_report

            print_report(run_id, report, hints=False)
        before = await rehearsal.state_hashes(db, anchor)
        await rehearsal.approve_and_start(db, actor, run_id)
        self.say(f"run {run_id} approved by {rehearsal.APPROVER.id} and started")

        started = time.perf_counter()
        if self.scratch.server is None:
            from keyshift.cli.runs import _work_in_process

            await _work_in_process(settings, db, run_id)
        else:
            failed = await self._worker_processes(settings, db, run_id)
            if failed:
                found["worker_failures"] = failed
        seconds = time.perf_counter() - started

        from keyshift.runs.model import AccountState

        ended = await rehearsal.outcome(db, run_id)
        verified = await rehearsal.verify_every_account(db, run_id, before, anchor)
        migrated = ended.by_state.get(AccountState.MIGRATED, 0)
        processed = ended.total - sum(
            ended.by_state.get(s, 0) for s in (AccountState.PENDING, AccountState.CLAIMED)
        )
        found.update(
            state=ended.state,
            halted_reason=ended.halted_reason,
            total=ended.total,
            by_state=ended.by_state,
            retried=ended.retried,
            seconds=round(seconds, 3),
            processed=processed,
            accounts_per_second=round(processed / seconds, 2) if seconds > 0 else None,
            migrated_per_second=round(migrated / seconds, 2) if seconds > 0 else None,
            verified={
                "migrated": verified.migrated,
                "unchanged": verified.unchanged,
                "problems": verified.problems,
            },
            checksum=await outcome_checksum(db, at=anchor),
        )
        code = self._verdict()
        found["ok"] = code == 0
        if self.json_out:
            emit_json(found)
        else:
            self._print()
        return code

    def _verdict(self) -> int:
        """The exit status: 0 only for a completed run, no failure, every account as expected."""
        from keyshift.runs.model import AccountState as A
        from keyshift.runs.model import RunState

        found = self.found
        if found["state"] != RunState.COMPLETED:
            return EXIT_HALTED
        troubled = sum(found["by_state"].get(s, 0) for s in (A.QUARANTINED, A.HELD))
        if found["verified"]["problems"] or troubled or found.get("worker_failures"):
            return 1
        return 0

    def _print(self) -> None:
        from keyshift.runs.model import AccountState as A

        found = self.found
        state = found["state"]
        if found.get("halted_reason"):
            typer.echo(f"run {found['run']} halted: {found['halted_reason']}", err=True)
        for line in found.get("worker_failures", []):
            typer.echo(f"worker failed: {line}", err=True)
        migrated = found["by_state"].get(A.MIGRATED, 0)
        workers = f"{found['workers']} worker{'s' if found['workers'] > 1 else ''}"
        typer.echo(
            f"run {found['run']} {state}: {found['processed']:,} of {found['total']:,} accounts"
            f" in {found['seconds']:.1f} s = {found['accounts_per_second'] or 0:,.1f} accounts/s"
            f" with {workers}; {migrated:,} migrated = {found['migrated_per_second'] or 0:,.1f}/s"
        )
        typer.echo("accounts: " + ", ".join(f"{n} {c:,}" for n, c in found["by_state"].items()))
        by_state = found["by_state"]
        typer.echo(
            f"failures: {by_state.get(A.QUARANTINED, 0):,} quarantined,"
            f" {by_state.get(A.HELD, 0):,} held, {found['retried']:,} retried"
        )
        verified = found["verified"]
        for account_id, problems in sorted(verified["problems"].items())[:20]:
            for problem in problems:
                typer.echo(f"{account_id}: {problem}", err=True)
        typer.echo(
            f"verified: {verified['migrated']:,} migrated accounts against their expected state,"
            f" {verified['unchanged']:,} others unchanged; {len(verified['problems']):,} differ"
        )
        typer.echo(f"checksum sha256 {found['checksum']}")

    async def _worker_processes(self, settings: Settings, db: Database, run_id: str) -> list[str]:
        """K `keyshift worker --run RUN --until-idle` processes, as production runs them; a
        progress line every few seconds on stderr. Returns a line per worker that failed."""
        import asyncio
        import os
        import sys

        from keyshift.runs.model import AccountState as A
        from keyshift.simulation import rehearsal

        env = {
            **os.environ,
            "KEYSHIFT_DATABASE_URL": self.scratch.url,
            "KEYSHIFT_SECRETS_DIR": str(settings.secrets_dir),
        }
        command = [sys.executable, "-m", "keyshift.cli", "worker", "--run", run_id]
        logs = Path(tempfile.mkdtemp(prefix="keyshift-simulate-workers-"))
        processes = []
        try:
            for i in range(self.workers):
                with (logs / f"worker-{i}.log").open("wb") as log:
                    processes.append(
                        await asyncio.create_subprocess_exec(
                            *command, "--until-idle", "--poll", "0.2", env=env, stderr=log,
                            stdout=asyncio.subprocess.DEVNULL,
                        )
                    )  # fmt: skip
            waiting = {asyncio.ensure_future(p.wait()) for p in processes}
            while waiting:
                _, waiting = await asyncio.wait(waiting, timeout=PROGRESS_SECONDS)
                if waiting:
                    now = await rehearsal.outcome(db, run_id)
                    settled = now.total - sum(
                        now.by_state.get(s, 0) for s in (A.PENDING, A.CLAIMED)
                    )
                    typer.echo(f"  {settled:,} of {now.total:,} accounts settled", err=True)
            failed = []
            for i, process in enumerate(processes):
                if process.returncode:
                    tail = (logs / f"worker-{i}.log").read_text(errors="replace").strip()
                    last = tail.splitlines()[-1] if tail else ""
                    failed.append(f"worker {i} exited with status {process.returncode}: {last}")
            return failed
        finally:
            for process in processes:
                if process.returncode is None:
                    process.terminate()
                    await process.wait()
            shutil.rmtree(logs, ignore_errors=True)
