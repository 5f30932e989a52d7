"""A real webhook receiver for the tests: an HTTP server on a loopback port, in a thread,
that records every request it gets and answers each as its ``answer`` function says — a
status, a redirect, or a wait longer than the deliverer's timeout."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook


@dataclass(frozen=True)
class Answer:
    status: int = 204
    location: str | None = None
    wait: float = 0.0


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")


#: The answer to the ``n``-th request (1-based) carrying a webhook id.
Policy = Callable[[str, int], Answer]


def always(status: int = 204) -> Policy:
    return lambda _id, _n: Answer(status)


def fail_first(failures: int, status: int = 500) -> Policy:
    """Each notice's first ``failures`` deliveries fail, the next one succeeds."""
    return lambda _id, n: Answer(status) if n <= failures else Answer(204)


@dataclass
class Receiver:
    url: str
    policy: Policy
    received: list[Received] = field(default_factory=list)
    _counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> Answer:
        with self._lock:
            webhook_id = headers.get("webhook-id", "")
            self._counts[webhook_id] = self._counts.get(webhook_id, 0) + 1
            n = self._counts[webhook_id]
        answer = self.policy(webhook_id, n) if path == "/hook" else Answer(204)
        with self._lock:
            self.received.append(Received(path, headers, body, answer.status))
        return answer

    def accepted(self) -> list[Received]:
        """The deliveries it answered 2xx, at /hook."""
        with self._lock:
            return [r for r in self.received if r.path == "/hook" and 200 <= r.answered < 300]

    def to(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def verified(self, secret: str) -> list[dict[str, object]]:
        """Every accepted delivery's body, each checked against its signature (raises if one
        does not verify)."""
        hook = Webhook(secret)
        return [hook.verify(r.body, r.headers) for r in self.accepted()]

    def verified_at(self, secret: str, now: datetime) -> list[dict[str, object]]:
        """``verified`` for deliveries signed at a moved clock: each body is checked by
        recomputing its signature (the library's own check refuses a timestamp more than
        five minutes from the real now)."""
        hook = Webhook(secret)
        out = []
        for r in self.accepted():
            assert r.headers["webhook-timestamp"] == str(int(now.timestamp()))
            expected = hook.sign(r.webhook_id, now, r.body.decode())
            assert expected in r.headers["webhook-signature"].split(" ")
            out.append(json.loads(r.body))
        return out


@contextlib.contextmanager
def receiving(policy: Policy) -> Iterator[Receiver]:
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            answer = holder[0].answer(self.path, headers, body)
            if answer.wait:
                time.sleep(answer.wait)
            try:
                self.send_response(answer.status)
                if answer.location:
                    self.send_header("Location", answer.location)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the deliverer gave up waiting

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    holder.append(Receiver(f"http://127.0.0.1:{server.server_address[1]}/hook", policy))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()
