"""`keyshift runs …`: move a cohort of accounts as one operation — create, report, approve,
start, watch, pause, resume, abort, roll back, cut over, finalize, verify (docs/runs.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from keyshift.cli.output import emit_json
from keyshift.cli.remote import segment
from keyshift.cli.rules import RULES_HELP, checked, checked_remotely
from keyshift.cli.runtime import run
from keyshift.errors import KeyshiftError

if TYPE_CHECKING:
    from keyshift.cli.remote import Api
    from keyshift.config import Settings
    from keyshift.db.engine import Database
    from keyshift.runs.model import Cohort, RunOptions

group = typer.Typer(
    help="Move a cohort of accounts as one run: report, approve, roll out, watch, roll back.",
    no_args_is_help=True,
)

#: The most bytes an id file or a cohort/options file may have.
MAX_FILE_BYTES = 64 * 1024 * 1024


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(group, name="runs")


def _die(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _read_ids(path: Path) -> tuple[list[str], dict[str, int]]:
    """One account id per line (blank lines and ``#`` comments skipped); a bad line is an
    error naming the file and line. Returns the ids and the line of each."""
    if not path.is_file():
        _die(f"{path}: no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        _die(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    ids: list[str] = []
    lines: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        _die(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    for number, raw in enumerate(text.splitlines(), 1):
        value = raw.split("#", 1)[0].strip()
        if not value:
            continue
        if len(value) > 36 or not value.isprintable() or " " in value:
            _die(f"{path}:{number}: not an account id: {value[:40]!r}")
        if value in lines:
            _die(f"{path}:{number}: duplicate of line {lines[value]}: {value}")
        lines[value] = number
        ids.append(value)
    if not ids:
        _die(f"{path}: no account ids")
    return ids, lines


def _document(path: Path | None) -> dict[str, Any]:
    """A TOML or JSON file holding a cohort or options document."""
    if path is None:
        return {}
    if not path.is_file():
        _die(f"{path}: no such file")
    text = path.read_bytes()
    value: Any = None
    try:
        value = json.loads(text) if path.suffix == ".json" else tomllib.loads(text.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        _die(f"{path}: {exc}")
    if not isinstance(value, dict):
        _die(f"{path}: expected a table/object at the top")
    return dict(value)


def _models(
    cohort_file: Path | None,
    plans: list[str],
    ids_file: Path | None,
    sample_count: int | None,
    sample_percent: float | None,
    seed: int,
    options_file: Path | None,
    overrides: dict[str, Any],
) -> tuple[Cohort, RunOptions, dict[str, int]]:
    from pydantic import ValidationError

    from keyshift.runs.model import Cohort, RunOptions

    cohort = _document(cohort_file)
    lines: dict[str, int] = {}
    if plans:
        cohort["plans"] = plans
    if ids_file is not None:
        cohort["ids"], lines = _read_ids(ids_file)
    if sample_count is not None or sample_percent is not None:
        cohort["sample"] = {"count": sample_count, "percent": sample_percent, "seed": seed}
        cohort["sample"] = {k: v for k, v in cohort["sample"].items() if v is not None}
    options = {**_document(options_file), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return Cohort.model_validate(cohort), RunOptions.model_validate(options), lines
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        _die(f"{where}: {first['msg']}")
    raise AssertionError("unreachable")


@group.command("create")
def create(
    rules_path: Path = typer.Option(..., "--rules", help=RULES_HELP),
    name: str | None = typer.Option(None, help="A name for people (default: rules and date)."),
    plans: list[str] = typer.Option(
        [], "--plan", help="Accounts on this plan (key@version); repeat. Default: the rules' from."
    ),
    ids_file: Path | None = typer.Option(None, "--ids", help="A file of account ids, one a line."),
    cohort_file: Path | None = typer.Option(
        None, "--cohort", help="A cohort document (TOML or JSON; docs/runs.md)."
    ),
    sample_count: int | None = typer.Option(None, help="A random sample of N accounts."),
    sample_percent: float | None = typer.Option(None, help="A random sample of N %."),
    seed: int = typer.Option(0, help="The sample's seed."),
    options_file: Path | None = typer.Option(
        None, "--options", help="An options document (TOML or JSON; docs/runs.md)."
    ),
    strategy: str | None = typer.Option(None, help="progressive (default) or blue_green."),
    canary: int | None = typer.Option(None, help="Canary size in accounts."),
    canary_percent: float | None = typer.Option(None, help="Canary size in % of the cohort."),
    wave_size: int | None = typer.Option(None, help="Accounts per wave after the canary."),
    batch_size: int | None = typer.Option(None, help="Accounts a worker claims at a time."),
    rate: float | None = typer.Option(None, help="Accounts per second over all workers."),
    json_out: bool = typer.Option(False, "--json", help="Print the run as JSON."),
) -> None:
    """Create a draft run: the rules and every account the cohort selects, held by it."""
    cohort, options, lines = _models(
        cohort_file,
        plans,
        ids_file,
        sample_count,
        sample_percent,
        seed,
        options_file,
        {
            "strategy": strategy,
            "canary": canary,
            "canary_percent": canary_percent,
            "wave_size": wave_size,
            "batch_size": batch_size,
            "rate": rate,
        },
    )

    def explain(error: KeyshiftError) -> None:
        """Each unknown id of an ids file on its line, before the one-line error."""
        from keyshift.runs.errors import CohortInvalid

        unknown = error.details.get("unknown") or []
        if error.code == CohortInvalid.code and ids_file is not None and unknown:
            for account_id in unknown:
                typer.echo(
                    f"{ids_file}:{lines.get(account_id, '?')}: unknown account id {account_id}",
                    err=True,
                )

    async def work(settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.context import cli_actor
        from keyshift.runs import service

        rules = await checked(db, rules_path)
        try:
            row = await service.create(db, cli_actor(), rules, cohort, options, name=name)
        except KeyshiftError as error:
            explain(error)
            raise
        return await _status(db, row.id)

    async def remote(api: Api) -> dict[str, Any]:
        _, text = await checked_remotely(api, rules_path)
        body: dict[str, Any] = {
            "rules": text,
            "cohort": cohort.model_dump(mode="json", exclude_unset=True),
            "options": options.model_dump(mode="json", exclude_unset=True),
        }
        if name is not None:
            body["name"] = name
        try:
            created: dict[str, Any] = await api.post("/v1/runs", body)
        except KeyshiftError as error:
            explain(error)
            raise
        return created

    shown = run(work, remote=remote)
    if json_out:
        emit_json(shown)
    else:
        typer.echo(
            f"run {shown['id']} created ({shown['total']} accounts, {shown['strategy']}); next:"
        )
        typer.echo(f"  keyshift runs report {shown['id']}")


async def _status(db: Database, run_id: str) -> dict[str, Any]:
    from keyshift.api.routes.runs import ProgressOut, RunOut
    from keyshift.runs import service

    async with db.transaction() as session:
        row = await service.get(session, run_id)
        progress = await service.progress(session, row, _now())
    return {
        **RunOut.model_validate(row).model_dump(mode="json"),
        "progress": ProgressOut.model_validate(progress).model_dump(mode="json"),
    }


def _now() -> Any:
    from keyshift.db.types import utcnow

    return utcnow()


@group.command("report")
def report(
    run_id: str = typer.Argument(..., help="The run id."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Dry-run every account of the run and print what would happen (writes no account state)."""

    async def work(settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.context import cli_actor
        from keyshift.runs import service

        async with db.transaction() as session:
            throughput = await service.measured_throughput(session)
        await service.report(db, cli_actor(), run_id, throughput=throughput)
        # As stored (and as the API answers): PostgreSQL's jsonb keeps its own key order.
        async with db.transaction() as session:
            row = await service.get(session, run_id)
        assert row.report is not None
        return row.report

    async def remote(api: Api) -> dict[str, Any]:
        await api.post(f"/v1/runs/{segment(run_id)}/report")
        body: dict[str, Any] = await api.get(f"/v1/runs/{segment(run_id)}/report")
        return body

    body = run(work, remote=remote)
    if json_out:
        emit_json(body)
    else:
        print_report(run_id, body)


def print_report(run_id: str, body: dict[str, Any], *, hints: bool = True) -> None:
    """A report as tables; ``hints``: the estimated duration and the next command too."""
    from rich.console import Console
    from rich.table import Table

    def titled(title: str) -> Table:
        """A table at least as wide as its title: Rich wraps a title to the table's width."""
        return Table(title=title, min_width=len(title) + 2)

    console = Console()
    outcomes = titled(f"run {run_id}: {body['total']} accounts")
    outcomes.add_column("outcome")
    outcomes.add_column("accounts", justify="right")
    for name, count in body["outcomes"].items():
        outcomes.add_row(name, str(count))
    console.print(outcomes)
    if body["ineligible_reasons"]:
        reasons = titled("not migrating, by reason")
        reasons.add_column("reason")
        reasons.add_column("accounts", justify="right")
        for reason, count in body["ineligible_reasons"].items():
            reasons.add_row(reason, str(count))
        console.print(reasons)
    if body["conflict_policies"]:
        policies = titled("quota conflicts, by policy")
        policies.add_column("policy")
        policies.add_column("accounts", justify="right")
        for policy, count in body["conflict_policies"].items():
            policies.add_row(policy, str(count))
        console.print(policies)
    if body["risks"]:
        risks = titled("accounts at risk")
        risks.add_column("risk")
        risks.add_column("accounts", justify="right")
        risks.add_column("first ones")
        for risk, item in body["risks"].items():
            risks.add_row(risk, str(item["count"]), ", ".join(item["accounts"][:3]))
        console.print(risks)
    if not hints:
        return
    estimate = body["estimate"]
    if estimate["seconds"] is not None:
        console.print(
            f"estimated duration: {estimate['seconds']:.0f} s at"
            f" {estimate['accounts_per_second']} accounts/s (the last completed run's rate)"
        )
    else:
        console.print("estimated duration: unknown until a run has completed on this database")
    console.print(f"next: keyshift runs approve {run_id}")


@group.command("approve")
def approve(run_id: str = typer.Argument(..., help="The run id.")) -> None:
    """Approve a reported run as reported (pinned to its rules and catalog hashes)."""

    async def work(settings: Settings, db: Database) -> tuple[str, str | None]:
        from keyshift.context import cli_actor
        from keyshift.runs import service

        row = await service.approve(db, cli_actor(), run_id, four_eyes=settings.runs_four_eyes)
        return row.id, row.approved_by

    async def remote(api: Api) -> tuple[str, str | None]:
        body = await api.post(f"/v1/runs/{segment(run_id)}/approve")
        return body["id"], body["approved_by"]

    approved, by = run(work, remote=remote)
    typer.echo(f"run {approved} approved by {by}")


def _move(
    move: str, run_id: str, *, wait: bool = False, body: dict[str, Any] | None = None, **kwargs: Any
) -> None:
    """Drive the run one step (``move``: the service function, and the API's path); ``body``:
    what the API takes for the ``kwargs`` the service takes. ``wait``: until the run stops —
    worked here on a local database, by the server's workers through a server."""

    async def work(settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.runs import service

        row = await getattr(service, move)(db, cli_actor(), run_id, **kwargs)
        typer.echo(f"run {row.id} is {row.state}")
        if wait:
            processed = await _work_in_process(settings, db, run_id)
            async with db.transaction() as session:
                row = await service.get(session, run_id)
            _stopped(row.id, row.state, f"{processed} accounts processed here", row.halted_reason)

    async def remote(api: Api) -> None:
        from keyshift.runs.model import CLAIMABLE

        path = f"/v1/runs/{segment(run_id)}"
        moved = await api.post(f"{path}/{move}", body)
        typer.echo(f"run {moved['id']} is {moved['state']}")
        if not wait:
            return
        typer.echo("waiting for the server's workers (Ctrl-C stops waiting, not the run)", err=True)
        while moved["state"] in CLAIMABLE:
            await asyncio.sleep(POLL_SECONDS)
            moved = await api.get(path)
        done = moved["progress"]["done"]
        how = f"{done} accounts done by the server's workers"
        _stopped(moved["id"], moved["state"], how, moved["halted_reason"])

    run(work, remote=remote)


#: How often `--wait` through a server looks at the run.
POLL_SECONDS = 1.0


def _stopped(run_id: str, state: str, how: str, halted_reason: str | None) -> None:
    """The end of a ``--wait``: the state the run stopped in; exit 5 if it halted."""
    typer.echo(f"run {run_id} is {state} ({how})")
    if halted_reason:
        typer.echo(f"halted: {halted_reason}", err=True)
        raise typer.Exit(5)


async def _work_in_process(settings: Settings, db: Database, run_id: str) -> int:
    """One worker inside the CLI until the run stops being claimable (SQLite's way to run)."""
    from keyshift.context import cli_actor
    from keyshift.migration.executor import Executor
    from keyshift.runs.worker import Worker
    from keyshift.security.secrets_store import load_secrets

    worker = Worker(Executor(db, load_secrets(settings.secrets_dir).signing), cli_actor())
    with stop_on_signals(worker.stopping):
        return await worker.run(run_id=run_id, until_idle=True)


@contextlib.contextmanager
def stop_on_signals(stopping: asyncio.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stopping`` (the worker finishes the batch in hand and gives
    back what it has not started). Outside the main thread (an embedding program) signals stay
    with their owner."""
    import signal

    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stopping.set)
        except (RuntimeError, ValueError, NotImplementedError):
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


WAIT_HELP = (
    "Wait until the run stops: on a local database, work it in this process (no separate"
    " worker needed); through a server, wait for its workers."
)


@group.command("start")
def start(
    run_id: str = typer.Argument(..., help="The run id."),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Start an approved run: workers take its accounts from now on."""
    _move("start", run_id, wait=wait)


@group.command("pause")
def pause(run_id: str = typer.Argument(..., help="The run id.")) -> None:
    """Pause a running run: nothing new starts."""
    _move("pause", run_id)


@group.command("resume")
def resume(
    run_id: str = typer.Argument(..., help="The run id."),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Resume a paused or halted run."""
    _move("resume", run_id, wait=wait)


@group.command("abort")
def abort(run_id: str = typer.Argument(..., help="The run id.")) -> None:
    """Stop a run for good and release its accounts (moved ones stay moved)."""
    _move("abort", run_id)


@group.command("rollback")
def rollback(
    run_id: str = typer.Argument(..., help="The run id."),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Roll the whole run back, newest account first (resumable)."""
    _move("rollback", run_id, wait=wait)


@group.command("cutover")
def cutover(
    run_id: str = typer.Argument(..., help="The run id."),
    at: str | None = typer.Option(None, help="The cutoff (RFC 3339; default now)."),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Blue-green: flip every prepared account; the cutoff is each receipt's time."""
    when = None
    if at is not None:
        from datetime import datetime

        from keyshift import dates
        from keyshift.errors import InvalidInput

        try:
            when = dates.checked(datetime.fromisoformat(at.replace("Z", "+00:00")), field="--at")
        except ValueError:
            _die(f"--at: not an RFC 3339 time: {at!r}")
        except InvalidInput as error:
            _die(f"--at: {error.message}")
    _move(
        "cutover",
        run_id,
        wait=wait,
        body=None if when is None else {"at": when.isoformat()},
        at=when,
    )


@group.command("finalize")
def finalize(run_id: str = typer.Argument(..., help="The run id.")) -> None:
    """Release old copies and retire snapshots of every migrated account: no rollback after."""

    async def work(settings: Settings, db: Database) -> tuple[str, str]:
        from keyshift.context import cli_actor
        from keyshift.migration.executor import Executor
        from keyshift.migration.rollback import finalize_many
        from keyshift.runs import service
        from keyshift.security.secrets_store import load_secrets

        executor = Executor(db, load_secrets(settings.secrets_dir).signing)
        actor = cli_actor()

        async def many(migration_ids: list[str]) -> Any:
            return await finalize_many(executor, actor, migration_ids)

        row = await service.finalize(db, actor, run_id, many)
        return row.id, row.state

    async def remote(api: Api) -> tuple[str, str]:
        body = await api.post(f"/v1/runs/{segment(run_id)}/finalize")
        return body["id"], body["state"]

    finalized, state = run(work, remote=remote)
    typer.echo(f"run {finalized} is {state}")


@group.command("status")
def status(
    run_id: str = typer.Argument(..., help="The run id."),
    watch: bool = typer.Option(False, "--watch", help="A live progress bar until the run stops."),
    json_out: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """A run's progress: done/total, rate, ETA, failures, quarantined, held, rolled back."""

    async def work(settings: Settings, db: Database) -> None:
        await show(lambda: _status(db, run_id))

    async def remote(api: Api) -> None:
        async def fetch() -> dict[str, Any]:
            body: dict[str, Any] = await api.get(f"/v1/runs/{segment(run_id)}")
            return body

        await show(fetch)

    async def show(fetch: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        if not watch:
            body = await fetch()
            if json_out:
                emit_json(body)
            else:
                typer.echo(_line(body))
            return
        await _watch(fetch)

    run(work, remote=remote)


def _line(body: dict[str, Any]) -> str:
    p = body["progress"]
    states = p["by_state"]
    rate = f"{p['rate']:.1f}/s" if p["rate"] else "-"
    eta = f"{p['eta_seconds']:.0f}s" if p["eta_seconds"] else "-"
    extra = ", ".join(f"{k} {v}" for k, v in states.items())
    halted = f"  halted: {body['halted_reason']}" if body["halted_reason"] else ""
    return (
        f"run {body['id']} {body['state']} ({body['phase']}): {p['done']}/{p['total']} done,"
        f" rate {rate}, eta {eta}; {extra}{halted}"
    )


async def _watch(fetch: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    from rich.progress import BarColumn, Progress, TextColumn

    from keyshift.runs.model import CLAIMABLE, AccountState

    columns = [
        TextColumn("[bold]{task.fields[state]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[rate]}  eta {task.fields[eta]}"),
        TextColumn("{task.fields[detail]}"),
    ]
    with Progress(*columns) as bar:
        task = bar.add_task("run", total=1, state="", rate="", eta="", detail="")
        while True:
            body = await fetch()
            p = body["progress"]
            s = p["by_state"]
            bar.update(
                task,
                total=p["total"],
                completed=p["done"],
                state=body["state"],
                rate=f"{p['rate']:.1f}/s" if p["rate"] else "-/s",
                eta=f"{p['eta_seconds']:.0f}s" if p["eta_seconds"] else "-",
                detail=(
                    f"failed {p['failed_attempts']}"
                    f" quarantined {s.get(AccountState.QUARANTINED, 0)}"
                    f" held {s.get(AccountState.HELD, 0)}"
                    f" rolled back {s.get(AccountState.ROLLED_BACK, 0)}"
                ),
            )
            if body["state"] not in CLAIMABLE:
                break
            await asyncio.sleep(1)
    typer.echo(_line(body))


@group.command("list")
def list_runs(limit: int = typer.Option(20, min=1, max=200, help="How many.")) -> None:
    """The most recent runs."""

    async def work(settings: Settings, db: Database) -> list[dict[str, Any]]:
        from keyshift.api.routes.runs import RunOut
        from keyshift.runs import service

        async with db.transaction() as session:
            rows = await service.list_runs(session, limit=limit)
        return [RunOut.model_validate(row).model_dump(mode="json") for row in rows]

    async def remote(api: Api) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await api.get("/v1/runs", limit=limit)
        return rows

    for row in run(work, remote=remote):
        typer.echo(
            f"{row['id']}  {row['state']:<12} {row['total']:>9}  {row['rules']}  {row['name']}"
        )


#: The page `runs accounts` asks a server for (the API's largest).
ACCOUNTS_PAGE = 500


@group.command("accounts")
def accounts(
    run_id: str = typer.Argument(..., help="The run id."),
    state: str | None = typer.Option(None, help="Only accounts in this state (e.g. held)."),
    limit: int = typer.Option(100, min=1, max=10_000, help="How many."),
) -> None:
    """The run's accounts with their state, attempts and error, as JSON lines."""

    from keyshift.runs.model import AccountState

    if state is not None and state not in set(AccountState):
        _die(f"--state: one of {', '.join(AccountState)}")

    async def work(settings: Settings, db: Database) -> list[dict[str, Any]]:
        from keyshift.api.routes.runs import RunAccountOut
        from keyshift.runs import service

        async with db.transaction() as session:
            await service.get(session, run_id)
            rows = await service.accounts(session, run_id, state=state, limit=limit)
        return [
            RunAccountOut.model_validate(row).model_dump(mode="json", exclude={"ledger"})
            for row in rows
        ]

    async def remote(api: Api) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = -1
        while len(out) < limit:
            page = await api.get(
                f"/v1/runs/{segment(run_id)}/accounts",
                state=state,
                after=after,
                limit=min(ACCOUNTS_PAGE, limit - len(out)),
            )
            out += [{k: v for k, v in item.items() if k != "ledger"} for item in page["accounts"]]
            if page["next_after"] is None:
                break
            after = page["next_after"]
        return out

    for item in run(work, remote=remote):
        typer.echo(json.dumps(item))


@group.command("verify")
def verify(
    run_id: str = typer.Argument(..., help="The run id."),
    sample: int = typer.Option(100, min=1, max=1_000_000, help="Accounts to check."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1, help="The sample's seed."),
) -> None:
    """Re-verify a random sample of migrated accounts against their expected state."""

    async def work(settings: Settings, db: Database) -> list[dict[str, Any]]:
        from dataclasses import asdict

        from keyshift.runs import service

        return [asdict(v) for v in await service.verify_sample(db, run_id, sample, seed=seed)]

    async def remote(api: Api) -> list[dict[str, Any]]:
        body = await api.get(f"/v1/runs/{segment(run_id)}/verify", sample=sample, seed=seed)
        accounts: list[dict[str, Any]] = body["accounts"]
        return accounts

    checked_ = run(work, remote=remote)
    bad = [v for v in checked_ if v["problems"]]
    for item in bad:
        for problem in item["problems"]:
            typer.echo(f"{item['account_id']}: {problem}", err=True)
    typer.echo(f"{len(checked_)} account(s) checked, {len(bad)} with differences")
    if bad:
        raise typer.Exit(1)
