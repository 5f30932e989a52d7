"""`keyshift init`: the schema, the signing key and the keyring, and a first admin token."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from keyshift.cli.output import emit_json
from keyshift.cli.runtime import run

if TYPE_CHECKING:
    from keyshift.config import Settings
    from keyshift.db.engine import Database


def register(app: typer.Typer) -> None:
    app.command("init")(init)


def init(
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print one JSON object on stdout: the files created, the database and the first"
        " admin token (null when tokens exist already).",
    ),
) -> None:
    """Create the schema, the signing key and the keyring if missing; print a first admin token.

    The schema is made by Alembic. The token is printed once, alone on stdout (messages go to
    stderr), so `TOKEN=$(keyshift init)` captures it."""

    async def work(settings: Settings, db: Database) -> None:
        from sqlalchemy import func, select

        from keyshift.context import cli_actor
        from keyshift.db.migrate import upgrade_to_head
        from keyshift.db.tables import ApiToken
        from keyshift.security import tokens
        from keyshift.security.secrets_store import ensure_secrets

        _, created = ensure_secrets(settings.secrets_dir)
        for name in created:
            typer.echo(f"created {settings.secrets_dir / name}", err=True)
        await upgrade_to_head(db.engine)
        database = db.engine.url.render_as_string(hide_password=True)
        typer.echo(f"schema is current on {database}", err=True)
        token: str | None = None
        async with db.transaction() as session:
            if (await session.execute(select(func.count()).select_from(ApiToken))).scalar_one():
                typer.echo(
                    "tokens exist already; mint more with `keyshift tokens create`", err=True
                )
            else:
                issued = await tokens.create_token(
                    session, cli_actor(), name="first admin", scopes=["admin"]
                )
                token = issued.plaintext
        if as_json:
            emit_json(
                {
                    "created": [str(settings.secrets_dir / name) for name in created],
                    "database": database,
                    "admin_token": token,
                }
            )
        elif token is not None:
            typer.echo("first admin token (shown once, store it now):", err=True)
            typer.echo(token)

    run(work)
