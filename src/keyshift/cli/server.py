"""`keyshift init` and `keyshift serve`."""

from __future__ import annotations

import os

import typer
from sqlalchemy import func, select

from keyshift.cli.runtime import run
from keyshift.config import Settings
from keyshift.context import cli_actor
from keyshift.db.engine import Database
from keyshift.db.migrate import upgrade_to_head
from keyshift.db.tables import ApiToken
from keyshift.security import tokens
from keyshift.security.secrets_store import ensure_secrets


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("serve")(serve)


def init() -> None:
    """Create the schema (Alembic), the signing key and the keyring if missing; print a first
    admin token once."""

    async def work(settings: Settings, db: Database) -> None:
        _, created = ensure_secrets(settings.secrets_dir)
        for name in created:
            typer.echo(f"created {settings.secrets_dir / name}")
        await upgrade_to_head(db.engine)
        typer.echo(f"schema is current on {db.engine.url.render_as_string(hide_password=True)}")
        async with db.transaction() as session:
            if (await session.execute(select(func.count()).select_from(ApiToken))).scalar_one():
                typer.echo("tokens exist already; mint more with `keyshift tokens create`")
                return
            issued = await tokens.create_token(
                session, cli_actor(), name="first admin", scopes=["admin"]
            )
        typer.echo("first admin token (shown once, store it now):")
        typer.echo(issued.plaintext)

    run(work)


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8080, help="Port to bind."),
    workers: int = typer.Option(1, min=1, max=64, help="Worker processes."),
) -> None:
    """Start the HTTP API (uvicorn) on the configured database."""
    import uvicorn

    from keyshift.observability.metrics import prepare_multiprocess_dir

    prepare_multiprocess_dir(workers)
    os.environ.setdefault("KEYSHIFT_DATABASE_URL", Settings.from_env().database_url)
    uvicorn.run(
        "keyshift.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        access_log=False,
    )
