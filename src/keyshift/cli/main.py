"""`keyshift`: the command-line entry point. Each command group lives in its own module."""

from __future__ import annotations

import typer

from keyshift.cli import (
    accounts,
    admin,
    audit,
    catalog,
    demo,
    licenses,
    migrate,
    server,
    usage,
    validation,
)

app = typer.Typer(
    name="keyshift",
    help="License server and edition-migration engine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for module in (server, demo, catalog, accounts, licenses, validation, usage, migrate, admin, audit):
    module.register(app)


def main() -> None:
    app()
