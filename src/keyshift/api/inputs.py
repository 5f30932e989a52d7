"""What every request's input must be before a route sees it, checked in one place for all of
them (docs/security.md, "Input limits"):

- no text holds NUL (U+0000), which PostgreSQL cannot store, or a lone surrogate
  (U+D800 to U+DFFF), which is not text in UTF-8 — in a JSON body (values and member names), a
  path parameter or a query parameter;
- no JSON integer lies outside 64 bits (signed): no column or JSON encoder here holds one;
- a query parameter the route does not declare is refused, as an unknown body field is.

Bodies are checked by the request middleware (so the bare-ASGI validation route is covered
too), path and query parameters by a dependency every API route has (``check_parameters``)
and by the validation route itself. Dates are bounded by ``keyshift.dates``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from types import UnionType
from typing import Any, Union, get_args, get_origin

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from keyshift.api.errors import invalid_request

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# A body is decoded a second time only if it could hold a problem: NUL and surrogates reach
# JSON text only as \u escapes or (decoded with "surrogatepass", as the stdlib decoder does)
# as raw surrogate bytes, an integer past 64 bits only as a run of 19 digits or more; a NUL
# byte means UTF-16 or UTF-32, which is always checked.
_SUSPECT = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])|\xed[\xa0-\xbf]|\d{19}|\x00")


def text_problem(text: str) -> tuple[str, str] | None:
    """(type, message) if ``text`` holds NUL or a lone surrogate; None if it is fine."""
    if "\x00" in text:
        return "string_nul", "may not contain NUL (U+0000)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "string_surrogate", "is not valid text (a lone surrogate, U+D800 to U+DFFF)"
    return None


def _problem(kind: str, loc: tuple[Any, ...], message: str) -> dict[str, Any]:
    # Pydantic's error-dict shape, so ``errors.invalid_request`` words these like any other.
    return {"type": kind, "loc": loc, "msg": message}


def value_problems(value: Any, loc: tuple[Any, ...] = ("body",)) -> list[dict[str, Any]]:
    """Every NUL, lone surrogate and integer beyond 64 bits in a decoded JSON value, located
    as pydantic locates a field (``("body", "attributes", "tier")``)."""
    found: list[dict[str, Any]] = []
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, loc)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            text = text_problem(item)
            if text is not None:
                found.append(_problem(text[0], where, text[1]))
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                found.append(
                    _problem("int_beyond_64_bits", where, "integers must fit in 64 bits (signed)")
                )
        elif isinstance(item, dict):
            for name, child in item.items():
                text = text_problem(name)
                if text is not None:  # located at its object: the name itself cannot be shown
                    found.append(_problem(text[0], where, f"a member name {text[1]}"))
                else:
                    stack.append((child, (*where, name)))
        elif isinstance(item, list):
            stack.extend((child, (*where, index)) for index, child in enumerate(item))
    found.reverse()  # the stack walked last-first; report in document order
    return found


def body_problems(raw: bytes) -> list[dict[str, Any]]:
    """The problems of a JSON body (none for a body that is not JSON: the route says so)."""
    if not _SUSPECT.search(raw):
        return []
    try:
        value = json.loads(raw)  # as FastAPI decodes it
    except (ValueError, RecursionError):
        return []
    return value_problems(value)


def body_error(raw: bytes) -> dict[str, Any] | None:
    """The 422 error body for a JSON body with problems (for the request middleware)."""
    problems = body_problems(raw)
    return invalid_request(problems) if problems else None


def _is_int(annotation: Any) -> bool:
    if annotation is int:
        return True
    if get_origin(annotation) in (Union, UnionType):
        return int in get_args(annotation)
    return False


_DECLARED = "_keyshift_declared_query"


class _Declared:
    """The query parameters a route declares (by the name a caller uses), and which are ints."""

    def __init__(self, route: APIRoute) -> None:
        fields = []
        dependants: list[Dependant] = [route.dependant]
        while dependants:  # the route's own and its dependencies' (auth, pagination …)
            current = dependants.pop()
            fields.extend(current.query_params)
            dependants.extend(current.dependencies)
        self.names = frozenset(f.alias for f in fields)
        self.integers = frozenset(f.alias for f in fields if _is_int(f.field_info.annotation))


def parameter_problems(
    path_params: Iterable[tuple[str, Any]],
    query: Iterable[tuple[str, str]],
    declared: frozenset[str],
    integers: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """NUL and lone surrogates in path and query parameters, query parameters not in
    ``declared``, and integers beyond 64 bits in the ``integers`` ones."""
    found = []
    for name, value in path_params:
        text = text_problem(str(value))
        if text is not None:
            found.append(_problem(text[0], ("path", name), text[1]))
    for name, value in query:
        if name not in declared:
            found.append(_problem("unknown_parameter", ("query", name), "unknown parameter"))
            continue
        text = text_problem(value)
        if text is not None:
            found.append(_problem(text[0], ("query", name), text[1]))
        elif name in integers and _beyond_64_bits(value):
            found.append(
                _problem("int_beyond_64_bits", ("query", name), "integers must fit in 64 bits")
            )
    return found


def _beyond_64_bits(text: str) -> bool:
    digits = text.strip().lstrip("+-")
    if not digits.isdigit() or len(digits) < 19:
        return False
    return not INT64_MIN <= int(text) <= INT64_MAX


async def check_parameters(request: Request) -> None:
    """The dependency every API route has: path and query parameters as the rules above say
    (422 naming the parameter, as for a body field)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    declared = getattr(route, _DECLARED, None)
    if declared is None:  # worked out once per route, kept on it (routes are not hashable)
        declared = _Declared(route)
        setattr(route, _DECLARED, declared)
    problems = parameter_problems(
        request.path_params.items(),
        request.query_params.multi_items(),
        declared.names,
        declared.integers,
    )
    if problems:
        raise RequestValidationError(problems)
