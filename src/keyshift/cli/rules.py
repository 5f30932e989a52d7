"""`keyshift rules …`: check migration rules files, alone or against the published catalog."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer

from keyshift.cli.output import exit_code_for
from keyshift.cli.runtime import run

if TYPE_CHECKING:
    from keyshift.cli.remote import Api
    from keyshift.config import Settings
    from keyshift.db.engine import Database
    from keyshift.migration.errors import RulesInvalid
    from keyshift.migration.rules import MigrationRules

T = TypeVar("T")

rules_group = typer.Typer(help="Migration rules manifests.", no_args_is_help=True)

RULES_HELP = "A migration rules file (TOML; see docs/migration-rules.md)."


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(rules_group, name="rules")


def print_problems(error: RulesInvalid, path: Path) -> None:
    for problem in error.problems:
        typer.echo(str(problem), err=True)
    typer.echo(f"{len(error.problems)} problem(s) in {path}", err=True)


def load(path: Path) -> tuple[MigrationRules, str]:
    from keyshift.migration.errors import RulesInvalid
    from keyshift.migration.loader import load_rules

    try:
        return load_rules(path)
    except RulesInvalid as error:
        print_problems(error, path)
        raise typer.Exit(exit_code_for(error)) from None


async def checked(db: Database, path: Path) -> MigrationRules:
    """The rules, cross-checked with the published catalog (problems on their lines)."""
    from keyshift.migration.errors import RulesInvalid
    from keyshift.migration.executor import check_rules
    from keyshift.migration.loader import catalog_problems

    rules, text = load(path)
    async with db.transaction() as session:
        problems = await check_rules(session, rules)
    if problems:
        error = RulesInvalid(catalog_problems(str(path), text, problems), source=str(path))
        print_problems(error, path)
        raise typer.Exit(exit_code_for(error))
    return rules


async def sending(path: Path, request: Awaitable[T]) -> T:
    """The answer to ``request``, which sends the rules of ``path`` to a server; the problems
    the server finds in them (against its catalog) printed on the lines of ``path``, as
    ``checked`` prints them."""
    from keyshift.catalog.loader import Problem
    from keyshift.migration.errors import RulesInvalid

    try:
        return await request
    except RulesInvalid as error:
        # The server names the text after the request field it came in; here it is the file.
        placed = [
            Problem(str(path), p.field, p.reason, p.line) if isinstance(p, Problem) else p
            for p in error.problems
        ]
        print_problems(RulesInvalid(placed, source=str(path)), path)
        raise typer.Exit(exit_code_for(error)) from None


async def checked_remotely(api: Api, path: Path) -> tuple[MigrationRules, str]:
    """``checked`` through a server: the schema here, the catalog there. Returns the rules and
    their text. (A route that checks the rules itself needs only ``load`` and ``sending``.)"""
    rules, text = load(path)
    await sending(path, api.post("/v1/rules/validate", {"rules": text}))
    return rules, text


@rules_group.command("validate")
def validate(
    path: Path = typer.Argument(..., help=RULES_HELP),
    offline: bool = typer.Option(
        False, "--offline", help="Check the schema only, without the published catalog."
    ),
) -> None:
    """Check a rules file's schema and, unless --offline, the published plans it names.

    Every problem is printed as `file:line: field: reason`."""
    if offline:
        rules, _ = load(path)
        typer.echo(f"ok  rules {rules.ref}  {rules.content_hash()}  (schema only)")
        return

    async def work(settings: Settings, db: Database) -> MigrationRules:
        return await checked(db, path)

    async def remote(api: Api) -> MigrationRules:
        rules, _ = await checked_remotely(api, path)
        return rules

    rules = run(work, remote=remote)
    typer.echo(f"ok  rules {rules.ref}  {rules.content_hash()}")
