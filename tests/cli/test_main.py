"""The root command table: `keyshift.cli.main` imports a group's module only when one of its
commands runs, so the table must name every command each module registers, and no other."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
from typing import Any

import typer
from typer.main import get_command, get_group

import keyshift.cli
from keyshift.cli.main import COMMANDS, app


def _registered_by(module_name: str) -> list[str]:
    holder = typer.Typer()
    importlib.import_module(f"keyshift.cli.{module_name}").register(holder)
    return list(get_group(holder).commands)


def test_every_module_with_commands_is_in_the_table_with_exactly_its_commands() -> None:
    modules = [
        info.name
        for info in pkgutil.iter_modules(keyshift.cli.__path__)
        if not info.name.startswith("_")  # __main__ runs the CLI when imported
        and hasattr(importlib.import_module(f"keyshift.cli.{info.name}"), "register")
    ]
    assert sorted(set(COMMANDS.values())) == sorted(modules)
    for module_name in modules:
        expected = [name for name, owner in COMMANDS.items() if owner == module_name]
        assert sorted(_registered_by(module_name)) == sorted(expected), module_name


def test_each_command_lives_in_the_module_named_after_it() -> None:
    assert {
        name: module for name, module in COMMANDS.items() if module != name.replace("-", "_")
    } == {}


def _every_command() -> list[tuple[str, Any]]:
    """Each command and group of the app, by its full name (the root as ``keyshift``)."""
    found: list[tuple[str, Any]] = []

    def walk(name: str, command: Any) -> None:
        found.append((name, command))
        if hasattr(command, "list_commands"):  # a group
            ctx = typer.Context(command)
            for sub in command.list_commands(ctx):
                walk(f"{name} {sub}", command.get_command(ctx, sub))

    walk("keyshift", get_command(app))
    return found


def test_every_command_summary_is_one_complete_line() -> None:
    """`--help` lists a command by its help's first paragraph, single newlines kept: a
    summary wrapped in the docstring breaks mid-sentence there. Details go after a blank line."""
    broken = {}
    for name, command in _every_command():
        summary = inspect.cleandoc(command.help or "").split("\n\n")[0]
        if "\n" in summary or not summary.endswith(".") or not summary[:1].isupper():
            broken[name] = summary
    assert broken == {}
    assert len(_every_command()) > len(COMMANDS)  # the walk reached the groups' commands


#: What a command imports when it runs, never when `--help` lists or describes it.
HEAVY = ("sqlalchemy", "fastapi", "uvicorn", "asyncpg", "aiosqlite", "pydantic_settings")

_HELP_IMPORTS = """
import contextlib, json, sys
from keyshift.cli.main import COMMANDS, app
found = {}
for args in [["--help"]] + [[name, "--help"] for name in COMMANDS]:
    with contextlib.redirect_stdout(None), contextlib.suppress(SystemExit):
        app(args)
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
    if heavy:
        found[" ".join(args)] = heavy
        break
print(json.dumps(found))
"""


def test_help_imports_none_of_the_heavy_libraries() -> None:
    """`keyshift --help` (and each command's) stays fast: the libraries a command needs are
    imported inside it. Checked in a fresh interpreter, by what it has imported."""
    result = subprocess.run(
        [sys.executable, "-c", _HELP_IMPORTS, *HEAVY],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {}


def test_license_file_export_defaults_to_the_services_ttl() -> None:
    from keyshift.cli.license_file import DEFAULT_TTL
    from keyshift.validation import license_files

    assert DEFAULT_TTL == license_files.DEFAULT_TTL
