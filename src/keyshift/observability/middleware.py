"""One pure-ASGI middleware for every request: a request id, the body-size and content-type
limits. (Pure ASGI rather than ``BaseHTTPMiddleware``: it stays off the hot path's budget.)"""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-request-id"
_SAFE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,100}$")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


async def _send_error(send: Send, status: int, body: dict[str, Any], request_id: str) -> None:
    payload = orjson.dumps({"error": body})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (REQUEST_ID_HEADER, request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        incoming = headers.get(REQUEST_ID_HEADER, b"")
        # Accept a caller's id only if it is short and plain; otherwise mint one.
        request_id = incoming.decode() if _SAFE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        if scope["method"] in _BODY_METHODS:
            declared = headers.get(b"content-length")
            if declared is not None and (
                not declared.isdigit() or int(declared) > self.max_body_bytes
            ):
                await _send_error(send, 413, self._too_large(), request_id)
                return
            body, too_large = await self._read_body(receive)
            if too_large:
                await _send_error(send, 413, self._too_large(), request_id)
                return
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if body and content_type != b"application/json":
                await _send_error(
                    send,
                    415,
                    {
                        "code": "unsupported_media_type",
                        "message": "request bodies must be application/json",
                        "field": "content-type",
                    },
                    request_id,
                )
                return
            receive = _replay(body, receive)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)

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
