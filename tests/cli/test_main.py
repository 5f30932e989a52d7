"""The root command table: `keyshift.cli.main` imports a group's module only when one of its
commands runs, so the table must name every command each module registers, and no other."""

from __future__ import annotations

import importlib
import pkgutil

import typer
from typer.main import get_group

import keyshift.cli
from keyshift.cli.main import COMMANDS


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
