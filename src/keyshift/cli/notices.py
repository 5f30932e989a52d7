"""`keyshift notices …`: customer notices over signed webhooks — the endpoint, the templates,
an account's history, the dead-letter list, replay, announcing a run, and the deliverer
(docs/notices.md)."""

from __future__ import annotations

import asyncio
import os
import re
import tomllib
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from keyshift.cli.output import emit_json
from keyshift.cli.runtime import run

if TYPE_CHECKING:
    from keyshift.config import Settings
    from keyshift.db.engine import Database
    from keyshift.db.tables import Notice

group = typer.Typer(
    help="Customer notices over signed webhooks: endpoint, templates, history, delivery.",
    no_args_is_help=True,
)
endpoint_group = typer.Typer(help="The webhook endpoint notices are sent to.", no_args_is_help=True)
templates_group = typer.Typer(help="The text of each kind of notice.", no_args_is_help=True)
group.add_typer(endpoint_group, name="endpoint")
group.add_typer(templates_group, name="templates")

#: The most bytes a template or secret file may have.
MAX_FILE_BYTES = 256 * 1024


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(group, name="notices")


def _die(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _read(path: Path) -> str:
    if not path.is_file():
        _die(f"{path}: no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        _die(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        _die(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    raise AssertionError("unreachable")


def _row(row: Notice) -> dict[str, Any]:
    return {
        c: getattr(row, c)
        for c in (
            "id",
            "account_id",
            "kind",
            "state",
            "migration_id",
            "run_id",
            "created_at",
            "next_attempt_at",
            "attempts",
            "last_status",
            "last_error",
            "last_attempt_at",
            "delivered_at",
            "payload",
        )
    }


# -- endpoint ----------------------------------------------------------------------------------


@endpoint_group.command("set")
def endpoint_set(
    url: str = typer.Option(..., help="Where notices are POSTed (http:// or https://)."),
    secret_file: Path | None = typer.Option(
        None,
        help="A file holding the signing secret (whsec_…); default: a new one, printed once.",
    ),
    disabled: bool = typer.Option(False, "--disabled", help="Keep notices queued, send none."),
) -> None:
    """Set the webhook endpoint and its signing secret (sealed at rest)."""
    secret = _read(secret_file).strip() if secret_file is not None else None

    async def work(settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.notices import service
        from keyshift.security.secrets_store import load_secrets

        keyring = load_secrets(settings.secrets_dir).keyring
        info, made = await service.set_endpoint(
            db, keyring, cli_actor(), url, secret=secret, enabled=not disabled
        )
        emit_json(
            {"url": info.url, "enabled": info.enabled, "updated_at": info.updated_at}
            | ({"secret": made} if made else {})
        )

    run(work)


@endpoint_group.command("show")
def endpoint_show() -> None:
    """Print the endpoint (never its secret)."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.notices import service
        from keyshift.notices.errors import NoticeNotFound

        async with db.transaction() as session:
            info = await service.endpoint_info(session)
        if info is None:
            raise NoticeNotFound("no webhook endpoint is set; `keyshift notices endpoint set`")
        emit_json(info.__dict__)

    run(work)


# -- templates ---------------------------------------------------------------------------------


def _line_of(text: str, variable: str | None) -> int:
    if variable:
        match = re.search(
            r"\$(\{" + re.escape(variable) + r"\}|" + re.escape(variable) + r"\b)", text
        )
        if match:
            return text.count("\n", 0, match.start()) + 1
    return 1


@templates_group.command("set")
def templates_set(
    kind: str = typer.Argument(
        ..., help="scheduled, started, completed, rolled_back, grace_ending"
    ),
    file: Path = typer.Option(..., "--file", help='A TOML file: subject = "…", body = """…""".'),
) -> None:
    """Store the text of one kind of notice; an unknown $variable is refused, named."""
    from keyshift.notices.kinds import NoticeKind

    try:
        which = NoticeKind(kind)
    except ValueError:
        _die(f"unknown kind {kind!r}; one of: {', '.join(k.value for k in NoticeKind)}")
    text = _read(file)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        _die(f"{file}: {exc}")
    for name in ("subject", "body"):
        if not isinstance(doc.get(name), str):
            _die(f"{file}:1: {name}: missing, or not a string")
    extra = sorted(set(doc) - {"subject", "body"})
    if extra:
        _die(f"{file}:1: unknown key(s): {', '.join(extra)}; a template has subject and body")

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.notices import service
        from keyshift.notices.errors import TemplateInvalid

        try:
            info = await service.set_template(db, cli_actor(), which, doc["subject"], doc["body"])
        except TemplateInvalid as error:
            variable = error.details.get("variable")
            _die(f"{file}:{_line_of(text, variable)}: {error.field}: {error.message}", 1)
        emit_json(info.__dict__)

    run(work)


@templates_group.command("list")
def templates_list() -> None:
    """Print each kind's text and the variables it may use."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.notices import service

        async with db.transaction() as session:
            emit_json([t.__dict__ for t in await service.list_templates(session)])

    run(work)


@templates_group.command("reset")
def templates_reset(
    kind: str = typer.Argument(..., help="The kind whose text goes back to the built-in one."),
) -> None:
    """Drop the vendor's text for one kind: the built-in one applies again."""
    from keyshift.notices.kinds import NoticeKind

    try:
        which = NoticeKind(kind)
    except ValueError:
        _die(f"unknown kind {kind!r}; one of: {', '.join(k.value for k in NoticeKind)}")

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.notices import service

        emit_json((await service.reset_template(db, cli_actor(), which)).__dict__)

    run(work)


# -- history, dead letters, replay -------------------------------------------------------------


@group.command("list")
def list_notices(
    account: str = typer.Option(..., help="The account whose notices to print."),
    limit: int = typer.Option(100, min=1, max=500),
) -> None:
    """Print an account's notices, newest first, with how each delivery went."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.notices import service

        async with db.transaction() as session:
            emit_json([_row(r) for r in await service.history(session, account, limit=limit)])

    run(work)


@group.command("dead")
def dead(limit: int = typer.Option(100, min=1, max=500)) -> None:
    """Print the dead-letter list: notices every attempt failed for."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.notices import service

        async with db.transaction() as session:
            emit_json([_row(r) for r in await service.dead_letters(session, limit=limit)])

    run(work)


@group.command("replay")
def replay(notice_id: str = typer.Argument(..., help="The notice to send again.")) -> None:
    """Send a dead (or delivered) notice again, with the same webhook id."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.notices import service

        emit_json(_row(await service.replay(db, cli_actor(), notice_id)))

    run(work)


@group.command("announce")
def announce(
    run_id: str = typer.Argument(..., help="The run (reported or approved)."),
    on: datetime = typer.Option(
        ...,
        formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d"],
        help="The date the run moves the accounts (UTC if no zone).",
    ),
    lead_days: int | None = typer.Option(
        None,
        min=0,
        max=365,
        help="Days before --on the notices go out (default: KEYSHIFT_NOTICE_LEAD_DAYS).",
    ),
) -> None:
    """Tell the run's customers when it moves them and what changes (`scheduled` notices)."""
    from datetime import UTC

    when = on if on.tzinfo is not None else on.replace(tzinfo=UTC)

    async def work(settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.runs.announce import announce as announcing

        lead = lead_days if lead_days is not None else settings.notice_lead_days
        done = await announcing(db, cli_actor(), run_id, when, lead_days=lead)
        emit_json(done.__dict__)

    run(work)


# -- delivery ----------------------------------------------------------------------------------


@group.command("deliver")
def deliver(
    loop: bool = typer.Option(False, "--loop", help="Keep delivering until stopped (SIGTERM)."),
    interval: float = typer.Option(
        1.0, min=0.05, max=3600, help="Seconds between passes (--loop)."
    ),
    limit: int = typer.Option(100, min=1, max=1000, help="Notices claimed per pass."),
    metrics_port: int | None = typer.Option(
        None, min=1, max=65535, help="Serve this deliverer's Prometheus metrics on this port."
    ),
    metrics_host: str = typer.Option("127.0.0.1", help="Address the metrics listener binds."),
) -> None:
    """Deliver due notices as signed webhooks; without --loop, until nothing is due."""
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # one process: its samples are its own
    stop_metrics = None
    if metrics_port is not None:
        from keyshift.cli.worker import _serve_metrics

        stop_metrics = _serve_metrics(metrics_host, metrics_port)

    async def work(settings: Settings, db: Database) -> None:
        from keyshift.cli.runs import stop_on_signals
        from keyshift.notices.delivery import Deliverer, Policy, Report, deliver_until_idle
        from keyshift.security.secrets_store import load_secrets

        deliverer = Deliverer(
            db, load_secrets(settings.secrets_dir).keyring, Policy.from_settings(settings)
        )
        total = Report()
        warned = False
        stopping = asyncio.Event()
        with stop_on_signals(stopping):
            while True:
                report = await deliver_until_idle(deliverer, limit=limit)
                for name in ("claimed", "delivered", "failed", "dead"):
                    setattr(total, name, getattr(total, name) + getattr(report, name))
                if report.no_endpoint and not warned:
                    typer.echo("no webhook endpoint is set: nothing delivered", err=True)
                    warned = True
                if not loop:
                    break
                try:
                    await asyncio.wait_for(stopping.wait(), timeout=interval)
                    break
                except TimeoutError:
                    continue
        emit_json(
            {
                "delivered": total.delivered,
                "failed": total.failed,
                "dead": total.dead,
                "no_endpoint": report.no_endpoint,
            }
        )

    try:
        run(work)
    finally:
        if stop_metrics is not None:
            stop_metrics()
