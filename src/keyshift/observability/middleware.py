"""One pure-ASGI middleware for every request: a request id, the body-size and content-type
limits, the request metrics and the access log line, and a JSON 500 for a bug.

(Pure ASGI rather than ``BaseHTTPMiddleware``: it stays off the hot path's budget — no extra
task, no Request object, one dict lookup per label set.)
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keyshift.observability import metrics
from keyshift.observability.logging import request_id_var

REQUEST_ID_HEADER = b"x-request-id"
_SAFE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,100}$")
_BODY_METHODS = {"POST", "PUT", "PATCH"}

access_log = logging.getLogger("keyshift.access")
error_log = logging.getLogger("keyshift.api")


def _error_payload(status: int, body: dict[str, Any], request_id: str) -> tuple[Message, Message]:
    payload = orjson.dumps({"error": body})
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (REQUEST_ID_HEADER, request_id.encode()),
        ],
    }
    return start, {"type": "http.response.body", "body": payload}


def route_label(scope: Scope) -> str:
    """The matched route's template (``/v1/tokens/{token_id}``), so the label set stays
    bounded; ``unmatched`` when routing found nothing or never ran."""
    route = scope.get("route")
    path = getattr(route, "path", None) if route is not None else None
    return path if isinstance(path, str) else metrics.UNMATCHED


#: Looks at a JSON body before any route does: the 422 error body if it is refused, else None.
BodyCheck = Callable[[bytes], dict[str, Any] | None]


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        check_body: BodyCheck | None = None,
        form_paths: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.check_body = check_body
        #: Paths under these prefixes (the dashboard's HTML forms) take form bodies instead.
        self.form_paths = form_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        incoming = headers.get(REQUEST_ID_HEADER, b"")
        # Accept a caller's id only if it is short and plain; otherwise mint one.
        request_id = incoming.decode() if _SAFE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, rid_bytes)]
            await send(message)

        rid_bytes = request_id.encode()
        try:
            refusal = None
            if scope["method"] in _BODY_METHODS:
                form = scope["path"].startswith(self.form_paths) if self.form_paths else False
                refusal, receive = await self._check_body(headers, receive, form=form)
            if refusal is not None:
                status = refusal[0]["status"]
                await send(refusal[0])
                await send(refusal[1])
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            # A bug, not a user error: the traceback goes to the log, never to the caller.
            error_log.exception(
                "unhandled error", extra={"path": scope.get("path"), "request_id": request_id}
            )
            if response_started:
                raise
            status = 500
            start, body = _error_payload(
                500, {"code": "internal_error", "message": "internal server error"}, request_id
            )
            await send(start)
            await send(body)
        finally:
            elapsed = time.perf_counter() - started
            route = route_label(scope)
            method = scope["method"]
            metrics.record_request(route, method, status, elapsed)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": method,
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )
            request_id_var.reset(token)

    async def _check_body(
        self, headers: dict[bytes, bytes], receive: Receive, *, form: bool = False
    ) -> tuple[tuple[Message, Message] | None, Receive]:
        """Read the whole body (it is small by contract) and refuse it if too large, not JSON
        (a form, if ``form``) or refused by ``check_body``; else hand back a ``receive`` that
        replays it."""
        request_id = request_id_var.get() or ""
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return _error_payload(413, self._too_large(), request_id), receive
        body, too_large = await self._read_body(receive)
        if too_large:
            return _error_payload(413, self._too_large(), request_id), receive
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        wanted = b"application/x-www-form-urlencoded" if form else b"application/json"
        if body and content_type != wanted:
            return _error_payload(
                415,
                {
                    "code": "unsupported_media_type",
                    "message": f"request bodies must be {wanted.decode()}",
                    "field": "content-type",
                },
                request_id,
            ), receive
        if body and self.check_body is not None and not form:
            refused = self.check_body(body)
            if refused is not None:
                return _error_payload(422, refused, request_id), receive
        return None, _replay(body, receive)

    def _too_large(self) -> dict[str, Any]:
        return {
            "code": "body_too_large",
            "message": f"request body exceeds {self.max_body_bytes} bytes",
            "field": "body",
        }

    async def _read_body(self, receive: Receive) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), False


def _replay(body: bytes, original: Receive) -> Receive:
    """Hand the buffered body to the app once, then pass through (to see a disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive
