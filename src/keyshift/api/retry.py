"""Run a request again, whole, when the database rolled its transaction back to break a
deadlock or serialization conflict.

A route that takes the request's transaction (``deps.Session``) writes nothing else, and that
transaction commits before the response starts: when the database chose it as a deadlock's
victim, nothing of the request was kept and the request itself is the unit to run again.
(Work made of several transactions — the migration engine's steps, usage batches — retries
each of its transactions itself, through ``Database.run``; a request never re-runs those.)
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keyshift.api import errors
from keyshift.db import failures
from keyshift.errors import DatabaseBusy


class RetryRequest(Exception):
    """Raised by the request's transaction when the database rolled it back as a conflict's
    victim (``busy``: the ``DatabaseBusy``)."""

    def __init__(self, busy: DatabaseBusy) -> None:
        super().__init__(busy.message)
        self.busy = busy


class RetryRolledBackRequests:
    """ASGI middleware: on ``RetryRequest`` before the response started, replay the request's
    body and run it again (``failures.retry_whole``: bounded, jittered); if every try was
    rolled back, answer 503 with ``Retry-After``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def once() -> None:
            pending = list(received)

            async def replaying_receive() -> Message:
                if pending:
                    return pending.pop(0)
                message = await receive()
                received.append(message)
                return message

            try:
                await self.app(scope, replaying_receive, tracking_send)
            except RetryRequest as exc:
                if started:  # cannot happen: the transaction commits before the response
                    raise exc.busy from exc
                raise exc.busy from None

        try:
            await failures.retry_whole(once)
        except DatabaseBusy as exc:
            if started:
                raise
            status, body, headers = errors.domain_error(exc)
            response = errors.error_response(status, body, headers)
            await response(scope, receive, send)
