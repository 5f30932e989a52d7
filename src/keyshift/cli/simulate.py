"""`keyshift simulate …`: synthetic data at scale, to rehearse migration runs on a scratch
database (docs/runs.md, "Simulation: synthetic data")."""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from keyshift.cli.runtime import run

if TYPE_CHECKING:
    from keyshift.config import Settings
    from keyshift.db.engine import Database

#: As ``keyshift.simulation.seed.MAX_ACCOUNTS`` (not imported: `--help` stays light).
MAX_ACCOUNTS = 10_000_000
DEFAULT_CATALOG = Path("examples/catalog")

group = typer.Typer(
    help="Synthetic accounts at scale, and the state checksum, for rehearsing runs.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(group, name="simulate")


def _bad(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


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
        formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S"],
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
        from datetime import UTC

        from keyshift.context import cli_actor
        from keyshift.db.migrate import upgrade_to_head
        from keyshift.security.secrets_store import ensure_secrets
        from keyshift.simulation.checksum import state_checksum
        from keyshift.simulation.seed import seed as seed_accounts

        anchor = None if at is None else at if at.tzinfo else at.replace(tzinfo=UTC)
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
