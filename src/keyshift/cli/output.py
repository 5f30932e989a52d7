"""The one place that turns domain errors into CLI messages and exit codes."""

from __future__ import annotations

import os
import sys
import traceback
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
    (e.Unavailable, 6),
]


def exit_code_for(error: e.KeyshiftError) -> int:
    for cls, code in EXIT:
        if isinstance(error, cls):
            return code
    return 1


def fail(error: e.KeyshiftError) -> NoReturn:
    problems = getattr(error, "problems", None)
    if problems:
        # Manifest problems: one line each, `file:line: field: reason`, like a compiler.
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
    else:
        where = f" [{error.field}]" if error.field else ""
        cause = error.__cause__
        if isinstance(error, e.Unavailable) and cause is not None:
            # The operator's own terminal: name what failed (the API never tells a client).
            from keyshift.db.failures import describe

            where += f" ({describe(cause)})"
        typer.echo(f"error: {error.message}{where}", err=True)
    raise typer.Exit(exit_code_for(error))


def describe_unexpected(error: BaseException) -> tuple[str, int]:
    """A one-line message and an exit code for an error the domain did not raise on purpose."""
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    if isinstance(error, DBAPIError):
        first = str(error.orig).strip().splitlines()[0] if str(error.orig).strip() else ""
        detail = f"{type(error.orig).__name__}: {first}" if first else type(error.orig).__name__
        hint = (
            " (run `keyshift init` first?)"
            if "no such table" in first or "does not exist" in first
            else ""
        )
        return f"database error: {detail}{hint}", 6
    if isinstance(error, SQLAlchemyError | OSError | ConnectionError):
        first = (str(error).strip().splitlines() or [""])[0]
        return f"cannot reach the database: {type(error).__name__}: {first}", 6
    first = (str(error).strip().splitlines() or [""])[0]
    return f"unexpected {type(error).__name__}: {first} (KEYSHIFT_DEBUG=1 shows the traceback)", 1


def fail_unexpected(error: BaseException) -> NoReturn:
    if os.environ.get("KEYSHIFT_DEBUG"):
        traceback.print_exception(error, file=sys.stderr)
    message, code = describe_unexpected(error)
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def emit_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
