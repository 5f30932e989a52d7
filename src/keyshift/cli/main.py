"""`keyshift`: the command-line entry point. Each top-level command or group lives in the module
named after it (`keyshift license-file` in ``license_file.py``), which is imported only when one
of its commands runs (or `--help` lists them all): a command pays for its own imports, not for
every group's."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
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
    "tokens": "tokens",
    "audit": "audit",
}

_SETTINGS = {"pretty_exceptions_enable": False, "add_completion": False}


class _Commands(Mapping[str, Any]):
    """``COMMANDS`` as the root group's command table: a command is built from its module when
    it is looked up (listing the names imports nothing)."""

    def __iter__(self) -> Iterator[str]:
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)

    def __getitem__(self, name: str) -> Any:
        module = importlib.import_module(f"keyshift.cli.{COMMANDS[name]}")
        holder = typer.Typer(**_SETTINGS)
        module.register(holder)
        return get_group(holder).commands[name]


class _LazyGroup(TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _Commands()  # type: ignore[assignment]


app = typer.Typer(
    cls=_LazyGroup,
    name="keyshift",
    help="License server and edition-migration engine.",
    no_args_is_help=True,
    **_SETTINGS,
)


@app.callback()
def _root() -> None:
    # Makes the root a group (its commands come from _Commands); it has no options.
    pass


def main() -> None:
    app()
