"""`keyshift tokens …`: API tokens from the command line."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import typer

from keyshift.cli.output import emit_json, fail
from keyshift.cli.runtime import run
from keyshift.errors import InvalidInput

if TYPE_CHECKING:
    from keyshift.config import Settings
    from keyshift.db.engine import Database

group = typer.Typer(help="API tokens (bearer secrets with scopes).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="tokens")


@group.command("create")
def create(
    name: str = typer.Option(..., help="What the token is for."),
    scope: list[str] = typer.Option(..., "--scope", help="Repeat for several scopes."),
    ttl_days: int | None = typer.Option(None, min=1, help="Expire after this many days."),
    ttl_minutes: int | None = typer.Option(
        None, min=1, help="Expire after this many minutes (short-lived tokens for workers)."
    ),
) -> None:
    """Mint a token and print its secret once. Without a TTL it lives until revoked."""
    if ttl_days and ttl_minutes:
        fail(InvalidInput("give --ttl-days or --ttl-minutes, not both", field="ttl"))
    ttl = (
        timedelta(days=ttl_days)
        if ttl_days
        else timedelta(minutes=ttl_minutes)
        if ttl_minutes
        else None
    )

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.security import tokens as token_service

        async with db.transaction() as session:
            issued = await token_service.create_token(
                session,
                cli_actor(),
                name=name,
                scopes=scope,
                ttl=ttl,
            )
        expiry = issued.token.expires_at
        until = f", expires {expiry.isoformat(timespec='seconds')}" if expiry else ""
        typer.echo(
            f"token {issued.token.id} ({', '.join(issued.token.scopes['scopes'])}{until}):",
            err=True,
        )
        typer.echo(issued.plaintext)

    run(work)


@group.command("list")
def list_tokens() -> None:
    """List tokens (never their secrets)."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.security import tokens as token_service

        async with db.transaction() as session:
            emit_json(
                [
                    {
                        "id": t.id,
                        "name": t.name,
                        "scopes": t.scopes["scopes"],
                        "expires_at": t.expires_at,
                        "revoked_at": t.revoked_at,
                    }
                    for t in await token_service.list_tokens(session)
                ]
            )

    run(work)


@group.command("revoke")
def revoke(token_id: str) -> None:
    """Revoke a token; it fails authentication from now on."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.security import tokens as token_service

        async with db.transaction() as session:
            await token_service.revoke_token(session, cli_actor(), token_id)
        typer.echo(f"revoked {token_id}")

    run(work)


@group.command("scopes")
def scopes(
    markdown: bool = typer.Option(
        False, "--markdown", help="As the table in docs/security.md, markers included."
    ),
) -> None:
    """Print what each API route asks of its caller; needs no database.

    Nothing, the license key, or a token with one of the scopes named (``admin`` holds them
    all), as read from the routes."""
    from keyshift.api import access

    table = access.route_table(access.app_routes())
    if markdown:
        typer.echo(access.markdown(table))
        return
    emit_json(
        [
            {"method": r.method, "path": r.path, "credential": r.credential, "scopes": r.scopes}
            for r in table
        ]
    )
