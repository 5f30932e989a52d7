"""What the OpenAPI spec says about errors: the one error body (``ErrorBody``) and, for every
route, the error statuses it can answer, worked out in one place from what the route is
(bearer-authenticated, authenticated by a license key, public; with a body or not; naming a
stored row or not) rather than written route by route. ``tests/api/test_openapi.py`` checks
the spec against the routes and the hostile-input suite checks real answers against it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from keyshift.api.deps import client_rate_limit


class RequestProblem(BaseModel):
    """One problem of a malformed request (every one is listed; the first is also on top)."""

    field: str
    message: str
    type: str


class ManifestProblem(BaseModel):
    """One problem of a manifest or rules file: where it is and why."""

    file: str
    field: str
    reason: str
    line: int | None


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="Stable, machine-readable: `not_found`, `invalid_request` …")
    message: str = Field(description="For a person; may change between versions.")
    field: str | None = Field(
        default=None,
        description="The input at fault: a body field (`events.0.timestamp`), `path.<name>`,"
        " `query.<name>`, `body`, or a header (`content-type`).",
    )
    problems: list[RequestProblem | ManifestProblem | str] | None = Field(
        default=None, description="422: every problem found (request, manifest or rules)."
    )
    details: dict[str, Any] | None = Field(
        default=None, description="More about the error, per code (e.g. `validation_code`)."
    )


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {"code", "message", "field"?, …}}``."""

    error: ErrorDetail


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 1},
    }
}
_MEANING: dict[int, tuple[str, dict[str, Any]]] = {
    401: (
        "No bearer token, or one that is unknown, expired or revoked.",
        {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    ),
    403: ("The token lacks the scope this route needs.", {}),
    404: ("What the request names (an id, a key, a plan) does not exist.", {}),
    409: ("The request contradicts stored state (a migration holds the account, …).", {}),
    413: ("The body is larger than `KEYSHIFT_MAX_BODY_BYTES`.", {}),
    415: ("The body is not `application/json`.", {}),
    422: (
        "Malformed input: the field, path or query parameter at fault is named"
        " (docs/security.md, “Input limits”).",
        {},
    ),
    429: ("Rate limited (per address, key or token).", _RETRY_AFTER),
    503: ("The database or the server's configuration is unavailable.", _RETRY_AFTER),
}


def error_response(status: int) -> dict[str, Any]:
    description, headers = _MEANING[status]
    response: dict[str, Any] = {"model": ErrorBody, "description": description}
    if headers:
        response["headers"] = headers
    return response


#: Reached without any credential.
PUBLIC = {"/healthz", "/readyz", "/v1/keys/signing"}
#: Answer a closed code set (NOT_FOUND included) or check text: nothing looked up can be missing.
NOTHING_TO_FIND = {"/v1/licenses/validate", "/v1/rules/validate"}
#: Record with a license key, or with an account id and a bearer token.
KEY_OR_BEARER = {"/v1/usage", "/v1/usage/batch"}
_BODY_METHODS = {"POST", "PUT", "PATCH"}
#: Body fields and query parameters that name a stored row (a key, an account, a plan).
_NAMING_FIELDS = {"key", "account_id", "plan"}
_NAMING_QUERY = {"from", "to"}


def _dependency_calls(route: APIRoute) -> set[Any]:
    calls, stack = set(), [route.dependant]
    while stack:
        current = stack.pop()
        if current.call is not None:
            calls.add(current.call)
        stack.extend(current.dependencies)
    return calls


def _body_fields(route: APIRoute) -> set[str]:
    field = route.body_field
    if field is None:
        return set()
    annotation = field.field_info.annotation
    names: set[str] = set()
    for candidate in getattr(annotation, "__args__", (annotation,)):
        names |= set(getattr(candidate, "model_fields", {}))
    return names


def documented_errors(route: APIRoute) -> dict[int | str, dict[str, Any]]:
    """The error statuses ``route`` can answer, each with the error body's schema."""
    path, methods = route.path, set(route.methods or ())
    statuses = {422}  # any route: an unknown or malformed query parameter
    if path != "/healthz":
        statuses.add(503)
    if methods & _BODY_METHODS:
        statuses |= {413, 415}
    by_key = client_rate_limit in _dependency_calls(route)
    if path in KEY_OR_BEARER or (not by_key and path not in PUBLIC):
        statuses |= {401, 403, 429}
    if by_key:
        statuses.add(429)
    query = {field.alias for field in route.dependant.query_params}
    names_something = (
        "{" in path or bool(_body_fields(route) & _NAMING_FIELDS) or bool(query & _NAMING_QUERY)
    )
    if names_something and path not in NOTHING_TO_FIND:
        statuses.add(404)
    if methods - {"GET"} and path not in NOTHING_TO_FIND | PUBLIC:
        statuses.add(409)
    return {status: error_response(status) for status in sorted(statuses)}


def document(router: APIRouter) -> None:
    """Add the documented errors to each of ``router``'s routes (before the app includes it);
    what a route declares itself wins."""
    for route in router.routes:
        if isinstance(route, APIRoute):
            route.responses = {**documented_errors(route), **route.responses}
