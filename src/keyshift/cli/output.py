"""The one place that turns domain errors into CLI messages and exit codes."""

from __future__ import annotations

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


def fail_unexpected(error: BaseException, *, debug: bool = False) -> NoReturn:
    """One line and an exit code for ``error``; with ``debug`` (``KEYSHIFT_DEBUG``) its
    traceback first."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    message, code = describe_unexpected(error)
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


#: Instants as every answer writes them (``keyshift.dates.rfc3339``): UTC with ``Z``; a naive
#: value (as SQLite returns a stored instant) is UTC.
_JSON_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC


def emit_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=_JSON_OPTIONS, default=str).decode() + "\n")


def readable(value: Any) -> str:
    """A value from a plan or a report as a person reads it, not a Python repr: a feature grant
    as ``enabled`` or ``throttled 10/day``, a change as ``before → after``, a mapping as
    ``name: value, …`` (nested ones in parentheses), nothing as ``none``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        if set(value) == {"from", "to"}:
            return f"{readable(value['from'])} → {readable(value['to'])}"
        if "mode" in value and set(value) <= {"mode", "limit", "period"}:
            if value["mode"] == "throttled":
                return f"throttled {value.get('limit')}/{value.get('period')}"
            return str(value["mode"])
        if not value:
            return "none"
        return ", ".join(f"{name}: {_nested(item)}" for name, item in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_nested(item) for item in value) if value else "none"
    return str(value)


def _nested(value: Any) -> str:
    text = readable(value)
    nested = isinstance(value, dict | list | tuple) and ("," in text or ": " in text)
    return f"({text})" if nested else text
