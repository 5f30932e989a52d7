"""The one place that maps domain errors to HTTP. Every error body has the same shape:
``{"error": {"code": ..., "message": ..., "field": ...}}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from keyshift import errors as e
from keyshift.api.ratelimit import RateLimited

log = logging.getLogger("keyshift.api")


class JsonResponse(Response):
    """JSON serialised by orjson, for bodies built by hand (errors, readiness). Routes with a
    response model need nothing: FastAPI serialises those to bytes itself."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


#: FastAPI's detail when reading the body raised something other than a JSON syntax error.
BODY_PARSE_ERROR = "There was an error parsing the body"

STATUS: list[tuple[type[e.KeyshiftError], int]] = [
    (RateLimited, 429),
    (e.AuthenticationFailed, 401),
    (e.PermissionDenied, 403),
    (e.NotFound, 404),
    (e.Conflict, 409),
    (e.InvalidInput, 422),
    (e.ConfigurationError, 503),
    (e.Unavailable, 503),
]


def status_for(error: e.KeyshiftError) -> int:
    for cls, status in STATUS:
        if isinstance(error, cls):
            return status
    return 400


def error_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> JsonResponse:
    return JsonResponse({"error": body}, status_code=status, headers=headers)


def _field_path(loc: tuple[Any, ...], kind: str = "") -> str:
    # ("body", "fingerprint") → "fingerprint"; ("query", "limit") → "limit";
    # unparseable JSON is located at a character offset, which names no field: "body".
    if kind == "json_invalid":
        return "body"
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def _message(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "json_invalid":
        return "body is not valid JSON"
    return str(err["msg"])


def domain_error(exc: e.KeyshiftError) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """Status, error body and headers for a domain error (every route, and the ASGI fast
    path of validation, answer through this)."""
    headers = None
    if isinstance(exc, e.AuthenticationFailed):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, RateLimited | e.Unavailable):
        headers = {"Retry-After": str(exc.retry_after)}
    return status_for(exc), exc.to_dict(), headers


def invalid_request(errors: Sequence[Any]) -> dict[str, Any]:
    """The 422 body for schema errors (pydantic's error dicts): the first problem's field
    and message on top, all of them under ``problems``."""
    problems = [
        {
            "field": _field_path(tuple(err["loc"]), err["type"]),
            "message": _message(err),
            "type": err["type"],
        }
        for err in errors
    ]
    first = problems[0] if problems else {"field": "body", "message": "invalid request"}
    return {
        "code": "invalid_request",
        "message": f"{first['field']}: {first['message']}",
        "field": first["field"],
        "problems": problems,
    }


def unparseable_body() -> dict[str, Any]:
    return {
        "code": "invalid_request",
        "message": "body: could not be parsed as JSON (nested too deeply?)",
        "field": "body",
    }


def allowed_methods(routes: Sequence[Any], scope: Mapping[str, Any]) -> set[str]:
    """Every method some route serves at the request's path, for a 405's ``Allow`` (routing
    stops at the first route whose path matches, which knows only its own methods)."""
    allowed: set[str] = set()
    for route in routes:
        included = getattr(route, "original_router", None)  # an included router's routes
        if included is not None:
            allowed |= allowed_methods(included.routes, scope)
            continue
        regex, methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and methods and regex.match(scope["path"]):
            allowed |= set(methods)
    return allowed


def install(app: FastAPI) -> None:
    @app.exception_handler(e.KeyshiftError)
    async def _domain(_request: Request, exc: e.KeyshiftError) -> JsonResponse:
        status, body, headers = domain_error(exc)
        return error_response(status, body, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JsonResponse:
        return error_response(422, invalid_request(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JsonResponse:
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:
            # FastAPI's answer when decoding the body fails other than as bad JSON syntax
            # (e.g. nested deeper than the decoder recurses): the same 422 as invalid JSON.
            return error_response(422, unparseable_body())
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(
                sorted(allowed_methods(request.app.router.routes, request.scope))
            )
        return error_response(
            exc.status_code, {"code": code, "message": str(exc.detail)}, headers or None
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JsonResponse:
        # Last resort (the request middleware answers a route's bug itself): log the
        # traceback, never send it.
        log.exception("unhandled error", extra={"path": request.url.path})
        request_id = getattr(request.state, "request_id", None)
        return error_response(
            500,
            {"code": "internal_error", "message": "internal server error"},
            {"x-request-id": request_id} if request_id else None,
        )
