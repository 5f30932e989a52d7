"""The HTTP/1.1 protocol `keyshift serve` runs: uvicorn's httptools protocol with a cap on the
request head (request line and headers), refused with 431.

uvicorn's httptools protocol has no such cap (a head of megabytes is buffered and served), and
its h11 protocol answers 400; ``serve`` names this class so the cap holds whichever parser
uvicorn would otherwise pick. The cap travels in uvicorn's ``h11_max_incomplete_event_size``
setting, which means the same thing for h11.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

#: Request line plus headers, in bytes (KEYSHIFT_MAX_HEADER_BYTES).
DEFAULT_MAX_HEADER_BYTES = 32 * 1024

PROTOCOL = "keyshift.api.protocol:HeaderCappedProtocol"

#: How long a refused connection is read (and discarded) after the 431 before it is closed.
DRAIN_SECONDS = 2.0


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing; answered 431."""


class HeaderCappedProtocol(HttpToolsProtocol):
    """Counts the head two ways, so it is never over-counted and never buffered unbounded: the
    request line and headers the parser has completed, and the raw bytes of chunks that arrive
    wholly inside a head (a header still being received sits in the parser's buffer)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.max_head_bytes = config.h11_max_incomplete_event_size or DEFAULT_MAX_HEADER_BYTES
        self._head_parsed = 0
        self._head_received = 0
        self._in_head = False
        self._head_began_here = False
        self._refusing = False

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return  # draining what the client still sends after the 431
        in_head_before = self._in_head
        self._head_began_here = False
        super().data_received(data)
        if self._refusing or not self._in_head:
            return
        # Still inside a head: this chunk was all head, unless the head began in it (then the
        # parsed count holds what of it is complete).
        if in_head_before and not self._head_began_here:
            self._head_received += len(data)
            if self._head_received > self.max_head_bytes:
                self._refuse()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_began_here = True, True
        self._head_parsed = self._head_received = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)  # "name: value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def _count(self, size: int) -> None:
        self._head_parsed += size
        if self._head_parsed > self.max_head_bytes:
            self._refusing = True
            raise _HeadTooLarge  # the parser stops; uvicorn calls send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._refusing:
            self._send_431()
        else:
            super().send_400_response(msg)

    def _refuse(self) -> None:
        self._refusing = True
        self._send_431()

    def _send_431(self) -> None:
        body = orjson.dumps(
            {
                "error": {
                    "code": "headers_too_large",
                    "message": f"the request line and headers exceed {self.max_head_bytes} bytes",
                    "field": None,
                }
            }
        )
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        head += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        # Closing at once, with the rest of the head unread, would reset the connection and
        # could destroy the 431 before the client reads it: half-close, drain a while, close.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(DRAIN_SECONDS, self.transport.close)
        else:
            self.transport.close()
