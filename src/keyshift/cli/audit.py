"""`keyshift audit verify|list`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from keyshift.cli.output import emit_json
from keyshift.cli.runtime import run

if TYPE_CHECKING:
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

    async def work(_settings: Settings, db: Database) -> bool:
        from keyshift.audit import service as audit_service

        async with db.transaction() as session:
            report = await audit_service.verify(session)
        for problem in report.problems:
            typer.echo(f"BROKEN {problem}", err=True)
        typer.echo(f"checked {report.checked} event(s): {'ok' if report.ok else 'CHAIN BROKEN'}")
        return report.ok

    if not run(work):
        raise typer.Exit(1)


@group.command("list")
def list_events(
    account: str | None = typer.Option(None, help="Only this account's events."),
    after: int = typer.Option(0, help="Events after this sequence number."),
    limit: int = typer.Option(50, min=1, max=1000),
) -> None:
    """Print events as JSON."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.audit import service as audit_service

        async with db.transaction() as session:
            events = await audit_service.list_events(
                session, account_id=account, after_seq=after, limit=limit
            )
            emit_json(
                [
                    {
                        c: getattr(ev, c)
                        for c in (
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
                    }
                    for ev in events
                ]
            )

    run(work)
