"""How a command reaches the services: settings from the env, one ``asyncio.run`` per command,
domain errors turned into messages (never tracebacks)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click
import typer

from keyshift.cli.output import fail, fail_unexpected
from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.errors import KeyshiftError

T = TypeVar("T")


def run(work: Callable[[Settings, Database], Awaitable[T]]) -> T:
    """Run ``work(settings, db)`` to completion and dispose of the engine."""
    settings = Settings.from_env()

    async def _main() -> T:
        db = Database(settings.database_url, report_outages=False)
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
        fail_unexpected(error)
