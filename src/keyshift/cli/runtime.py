"""How a command reaches the services: settings from the env, one ``asyncio.run`` per command,
domain errors turned into messages (never tracebacks). The settings and the database are
imported when a command runs, not when `--help` lists the commands."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import click
import typer

from keyshift.cli.output import fail, fail_unexpected
from keyshift.errors import KeyshiftError

if TYPE_CHECKING:
    from keyshift.config import Settings
    from keyshift.db.engine import Database

T = TypeVar("T")


def load_settings() -> Settings:
    """Every ``KEYSHIFT_*`` setting, checked: a bad value is one line naming the variable and
    exit 6, before the command does anything."""
    from keyshift.config import Settings

    try:
        return Settings.from_env()
    except KeyshiftError as error:
        fail(error)


def run(
    work: Callable[[Settings, Database], Awaitable[T]], *, database_url: str | None = None
) -> T:
    """Run ``work(settings, db)`` to completion and dispose of the engine. ``database_url``
    (normalised as ``KEYSHIFT_DATABASE_URL`` is) replaces the configured database."""
    from keyshift.db.engine import Database

    settings = load_settings()

    async def _main() -> T:
        db = Database(
            database_url or settings.database_url,
            report_outages=False,
            read_pool_size=settings.db_read_pool_size,
        )
        try:
            return await work(settings, db)
        finally:
            await db.dispose()

    try:
        return asyncio.run(_main())
    except (click.exceptions.Exit, typer.Exit):
        raise  # a command chose its exit code (e.g. after printing every problem)
    except KeyshiftError as error:
        fail(error)
    except Exception as error:
        # Not a domain error (database unreachable, schema missing, a bug): still one line and
        # a non-zero exit, never a traceback; KEYSHIFT_DEBUG=1 shows it.
        fail_unexpected(error, debug=settings.debug)
