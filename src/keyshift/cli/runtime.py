"""How a command reaches the services: settings from the env, one ``asyncio.run`` per command,
domain errors turned into messages (never tracebacks). The settings and the database are
imported when a command runs, not when `--help` lists the commands.

A command that also works against a remote server (``--server``/``KEYSHIFT_SERVER``) gives
``run`` its second backend, ``remote``: the same result fetched through the HTTP API
(``keyshift.cli.remote``), which the command then presents as it presents the local one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import click
import typer

from keyshift.cli.output import fail, fail_unexpected
from keyshift.errors import InvalidInput, KeyshiftError

if TYPE_CHECKING:
    from keyshift.cli.remote import Api, Target
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


@dataclass(frozen=True)
class RemoteOptions:
    """The root options `keyshift --server URL [--insecure] <command> …`, and the command."""

    server: str | None = None
    insecure: bool = False
    command: str = ""


#: Set by the root command for the command it runs (a context variable: the tests run many
#: CLI invocations in one process, each in a thread of its own).
_OPTIONS: ContextVar[RemoteOptions | None] = ContextVar("keyshift_cli_options", default=None)


def set_options(options: RemoteOptions) -> None:
    _OPTIONS.set(options)


def _options() -> RemoteOptions:
    return _OPTIONS.get() or RemoteOptions()


def remote_target(settings: Settings) -> Target | None:
    """The server the command acts through (``--server``, else ``KEYSHIFT_SERVER``), checked;
    None: the local database."""
    from keyshift.cli.remote import target

    options = _options()
    server = options.server or settings.server
    if not server:
        return None
    token = settings.token.get_secret_value() if settings.token is not None else None
    try:
        return target(server, token, insecure=options.insecure)
    except KeyshiftError as error:
        fail(error)


def run(
    work: Callable[[Settings, Database], Awaitable[T]],
    *,
    remote: Callable[[Api], Awaitable[T]] | None = None,
    database_url: str | None = None,
) -> T:
    """Run ``work(settings, db)`` to completion and dispose of the engine. ``database_url``
    (normalised as ``KEYSHIFT_DATABASE_URL`` is) replaces the configured database.

    With a server given, ``remote(api)`` runs instead; a command without one refuses (it
    acts on a local database only, and the operator meant the server)."""
    from keyshift.db.engine import Database

    settings = load_settings()
    where = remote_target(settings) if database_url is None else None
    if where is not None and remote is None:
        fail(
            InvalidInput(
                f"`keyshift {_options().command}` works on a local database only; unset"
                " KEYSHIFT_SERVER (or drop --server) to run it here",
                field="--server",
            )
        )

    async def _remote_main() -> T:
        from keyshift.cli.remote import connect

        assert where is not None and remote is not None
        async with connect(where) as api:
            return await remote(api)

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
        return asyncio.run(_main() if where is None else _remote_main())
    except (click.exceptions.Exit, typer.Exit):
        raise  # a command chose its exit code (e.g. after printing every problem)
    except KeyshiftError as error:
        fail(error)
    except Exception as error:
        # Not a domain error (database unreachable, schema missing, a bug): still one line and
        # a non-zero exit, never a traceback; KEYSHIFT_DEBUG=1 shows it.
        fail_unexpected(error, debug=settings.debug)
