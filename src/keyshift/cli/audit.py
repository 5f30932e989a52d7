"""`keyshift audit verify|list`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from keyshift.cli.output import emit_json
from keyshift.cli.runtime import run

if TYPE_CHECKING:
    from keyshift.cli.remote import Api
    from keyshift.config import Settings
    from keyshift.db.engine import Database

group = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="audit")


@group.command("verify")
def verify() -> None:
    """Walk the hash chain and name the first broken row; exit 1 if any.

    A row is broken when its content or its link is wrong; any later, independent break is
    named too."""

    async def work(_settings: Settings, db: Database) -> tuple[int, list[str]]:
        from keyshift.audit import service as audit_service

        async with db.transaction() as session:
            report = await audit_service.verify(session)
        return report.checked, [str(problem) for problem in report.problems]

    async def remote(api: Api) -> tuple[int, list[str]]:
        from keyshift.audit.chain import Problem, ProblemKind

        report = await api.get("/v1/audit/verify")
        problems = [
            Problem(p["seq"], ProblemKind(p["kind"]), p["message"], p["details"])
            for p in report["problems"]
        ]
        return int(report["checked"]), [str(problem) for problem in problems]

    checked, problems = run(work, remote=remote)
    for problem in problems:
        typer.echo(f"BROKEN {problem}", err=True)
    typer.echo(f"checked {checked} event(s): {'CHAIN BROKEN' if problems else 'ok'}")
    if problems:
        raise typer.Exit(1)


@group.command("list")
def list_events(
    account: str | None = typer.Option(None, help="Only this account's events."),
    after: int = typer.Option(0, min=0, help="Events after this sequence number."),
    limit: int = typer.Option(50, min=1, max=1000),
) -> None:
    """Print events as JSON."""

    async def work(_settings: Settings, db: Database) -> list[dict[str, Any]]:
        from keyshift.api.routes.audit import AuditEventOut
        from keyshift.audit import service as audit_service

        async with db.transaction() as session:
            events = await audit_service.list_events(
                session, account_id=account, after_seq=after, limit=limit
            )
            return [AuditEventOut.model_validate(ev).model_dump(mode="json") for ev in events]

    async def remote(api: Api) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = await api.get(
            "/v1/audit/events", account_id=account, after_seq=after, limit=limit
        )
        return events

    emit_json([{c: event[c] for c in COLUMNS} for event in run(work, remote=remote)])


#: What `audit list` prints of each event (the API's answer has its id and link too).
COLUMNS = (
    "seq",
    "occurred_at",
    "actor",
    "action",
    "target_type",
    "target_id",
    "account_id",
    "request_id",
    "details",
    "hash",
)
