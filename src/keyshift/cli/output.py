"""The one place that turns domain errors into CLI messages and exit codes."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import orjson
import typer

from keyshift import errors as e

EXIT: list[tuple[type[e.KeyshiftError], int]] = [
    (e.AuthenticationFailed, 4),
    (e.PermissionDenied, 4),
    (e.NotFound, 3),
    (e.Conflict, 5),
    (e.InvalidInput, 2),
    (e.ConfigurationError, 6),
]


def exit_code_for(error: e.KeyshiftError) -> int:
    for cls, code in EXIT:
        if isinstance(error, cls):
            return code
    return 1


def fail(error: e.KeyshiftError) -> NoReturn:
    where = f" [{error.field}]" if error.field else ""
    typer.echo(f"error: {error.message}{where}", err=True)
    for problem in (
        getattr(error, "problems", [])[1:] if len(getattr(error, "problems", [])) > 1 else []
    ):
        typer.echo(f"  {problem}", err=True)
    raise typer.Exit(exit_code_for(error))


def emit_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
