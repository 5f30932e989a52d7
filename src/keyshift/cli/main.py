"""`keyshift`: the command-line entry point. Each top-level command or group lives in the module
named after it (`keyshift license-file` in ``license_file.py``), which is imported only when one
of its commands runs (or `--help` lists them all): a command pays for its own imports, not for
every group's."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import Any

import typer
from typer.core import TyperGroup
from typer.main import get_group

#: Each top-level command, and the module of ``keyshift.cli`` whose ``register(app)`` adds it,
#: in `keyshift --help` order (plain commands first, then groups). A new group is one line.
COMMANDS: dict[str, str] = {
    "init": "init",
    "serve": "serve",
    "demo": "demo",
    "validate": "validate",
    "catalog": "catalog",
    "accounts": "accounts",
    "licenses": "licenses",
    "license-file": "license_file",
    "keys": "keys",
    "usage": "usage",
    "rules": "rules",
    "migrate": "migrate",
    "runs": "runs",
    "worker": "worker",
    "simulate": "simulate",
    "notices": "notices",
    "tokens": "tokens",
    "audit": "audit",
}


def _typer(**options: Any) -> typer.Typer:
    """A Typer app as keyshift's are: errors are one line (no pretty tracebacks, no locals),
    and no shell-completion options."""
    return typer.Typer(pretty_exceptions_enable=False, add_completion=False, **options)


class _Commands(MutableMapping[str, Any]):
    """``COMMANDS`` as the root group's command table: a command is built from its module when
    it is first looked up (listing the names imports nothing). Typer annotates the table's
    values as its own ``Command`` class; ``Any`` here keeps this module free of its internals."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}

    def __iter__(self) -> Iterator[str]:
        return iter({**dict.fromkeys(COMMANDS), **self._built})

    def __len__(self) -> int:
        return len(set(COMMANDS) | set(self._built))

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            module = importlib.import_module(f"keyshift.cli.{COMMANDS[name]}")
            holder = _typer()
            module.register(holder)
            self._built[name] = get_group(holder).commands[name]
        return self._built[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        raise TypeError("keyshift's commands are fixed by COMMANDS")


class _LazyGroup(TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _Commands()


app = _typer(
    cls=_LazyGroup,
    name="keyshift",
    help="License server and edition-migration engine.",
    no_args_is_help=True,
)


@app.callback()
def _root(
    ctx: typer.Context,
    server: str | None = typer.Option(
        None,
        "--server",
        metavar="URL",
        help="Act through this keyshift server's HTTP API (default: KEYSHIFT_SERVER; the"
        " token comes from KEYSHIFT_TOKEN) instead of the local database: runs, migrate,"
        " accounts, licenses, usage, audit.",
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="Allow a plain http:// server that is not on this machine."
    ),
) -> None:
    # Makes the root a group (its commands come from _Commands). The options are read by
    # keyshift.cli.runtime when a command runs.
    from keyshift.cli.runtime import RemoteOptions, set_options

    command = ctx.invoked_subcommand or ""
    set_options(RemoteOptions(server=server, insecure=insecure, command=command))


def main() -> None:
    app()
