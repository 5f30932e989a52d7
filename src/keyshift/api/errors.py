"""The one place that maps domain errors to HTTP. Every error body has the same shape:
``{"error": {"code": ..., "message": ..., "field": ...}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from keyshift import errors as e

log = logging.getLogger("keyshift.api")

STATUS: list[tuple[type[e.KeyshiftError], int]] = [
    (e.AuthenticationFailed, 401),
    (e.PermissionDenied, 403),
    (e.NotFound, 404),
    (e.Conflict, 409),
    (e.InvalidInput, 422),
    (e.ConfigurationError, 503),
]


def status_for(error: e.KeyshiftError) -> int:
    for cls, status in STATUS:
        if isinstance(error, cls):
            return status
    return 400


def error_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> ORJSONResponse:
    return ORJSONResponse({"error": body}, status_code=status, headers=headers)


def _field_path(loc: tuple[Any, ...]) -> str:
    # ("body", "fingerprint") → "fingerprint"; ("query", "limit") → "limit"
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(e.KeyshiftError)
    async def _domain(_request: Request, exc: e.KeyshiftError) -> ORJSONResponse:
        headers = (
            {"WWW-Authenticate": "Bearer"} if isinstance(exc, e.AuthenticationFailed) else None
        )
        return error_response(status_for(exc), exc.to_dict(), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> ORJSONResponse:
        problems = [
            {"field": _field_path(tuple(err["loc"])), "message": err["msg"], "type": err["type"]}
            for err in exc.errors()
        ]
        first = problems[0] if problems else {"field": "body", "message": "invalid request"}
        return error_response(
            422,
            {
                "code": "invalid_request",
                "message": f"{first['field']}: {first['message']}",
                "field": first["field"],
                "problems": problems,
            },
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> ORJSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, {"code": code, "message": str(exc.detail)})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> ORJSONResponse:
        # A bug, not a user error: log the traceback, never send it.
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(500, {"code": "internal_error", "message": "internal server error"})
