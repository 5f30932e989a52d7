"""Delivering the outbox: claim due notices (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so
several deliverers never send one notice at once), sign each as a Standard Webhook (id,
timestamp, HMAC-SHA256 signature: the ``standardwebhooks`` package), POST it, and record the
outcome — delivered on a 2xx; otherwise retried after an exponential backoff, and after the
last attempt put on the dead-letter list.

A timeout, a non-2xx answer, a redirect (never followed) and a refused connection are all
failures. A deliverer that dies between the POST and recording it sends that notice again
when its lease expires: delivery is at least once, and the webhook id lets a receiver drop a
repeat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import httpx
import orjson
from sqlalchemy import Table, bindparam, or_, select, update
from standardwebhooks import Webhook

from keyshift.audit import service as audit
from keyshift.config import Settings
from keyshift.context import SYSTEM, Actor
from keyshift.dates import rfc3339
from keyshift.db.engine import Database
from keyshift.db.tables import Account, Notice
from keyshift.db.types import utcnow
from keyshift.notices import service, templates
from keyshift.notices.kinds import EVENT_TYPES, NoticeKind, NoticeState
from keyshift.observability.metrics import record_webhook_delivery
from keyshift.security.keyring import Keyring

log = logging.getLogger("keyshift.notices.delivery")

DELIVERED, FAILED, DEAD = "delivered", "failed", "dead"
#: At most this many deliveries in flight at once per deliverer.
CONCURRENCY = 8
#: The longest error text kept on a notice.
_ERROR_CHARS = 500


@dataclass(frozen=True)
class Policy:
    """How hard a notice is tried: the timeout of one delivery, the attempts before the
    dead-letter list, the backoff between them (doubling from ``backoff``, capped)."""

    timeout: float = 10.0
    max_attempts: int = 8
    backoff: float = 30.0
    backoff_max: float = 6 * 3600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            timeout=settings.webhook_timeout,
            max_attempts=settings.webhook_max_attempts,
            backoff=settings.webhook_backoff_seconds,
            backoff_max=settings.webhook_backoff_max_seconds,
        )

    def delay(self, attempts: int) -> timedelta:
        """The wait after the ``attempts``-th failed delivery."""
        return timedelta(seconds=min(self.backoff * 2 ** max(0, attempts - 1), self.backoff_max))

    def lease(self, count: int) -> timedelta:
        """How long a claim of ``count`` notices holds them: past the last delivery's
        timeout (``CONCURRENCY`` at a time), with time to record the outcomes."""
        rounds = -(-count // CONCURRENCY)
        return timedelta(seconds=(rounds + 1) * self.timeout + 5)


@dataclass(frozen=True)
class Outcome:
    notice_id: str
    ok: bool
    status: int | None
    error: str | None


@dataclass
class Report:
    """What one pass did."""

    claimed: int = 0
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    no_endpoint: bool = False


@dataclass(frozen=True)
class _Claimed:
    id: str
    kind: NoticeKind
    account_id: str
    account_name: str | None
    attempts: int
    created_at: datetime
    payload: dict[str, Any]


def body_of(claimed: _Claimed, text: templates.Text) -> bytes:
    """The webhook body: ``type``, ``timestamp`` (when the notice was written) and ``data``
    (the rendered subject and message, the template's values, and for a completed migration
    the signed receipt)."""
    values = {
        **claimed.payload,
        "account_id": claimed.account_id,
        "account_name": claimed.account_name,
        "notice_id": claimed.id,
    }
    rendered = templates.render(claimed.kind, text, values)
    data = {
        "notice_id": claimed.id,
        "kind": str(claimed.kind),
        "account_id": claimed.account_id,
        "account_name": claimed.account_name,
        "subject": rendered.subject,
        "message": rendered.body,
        **{k: v for k, v in claimed.payload.items() if k not in ("account_id", "notice_id")},
    }
    return orjson.dumps(
        {"type": EVENT_TYPES[claimed.kind], "timestamp": rfc3339(claimed.created_at), "data": data}
    )


def signed_headers(secret: str, notice_id: str, at: datetime, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers for one delivery."""
    signature = Webhook(secret).sign(notice_id, at, body.decode())
    return {
        "content-type": "application/json",
        "webhook-id": notice_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        "user-agent": "keyshift-notices",
    }


def _default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Deliverer:
    """Delivers due notices to the configured endpoint; ``clock`` is the time source."""

    db: Database
    keyring: Keyring
    policy: Policy = field(default_factory=Policy)
    clock: Callable[[], datetime] = field(default=utcnow)
    actor: Actor = SYSTEM
    #: Passed to httpx (tests give a transport); None: a real connection.
    transport: httpx.AsyncBaseTransport | None = None

    async def deliver_due(self, *, limit: int = 100) -> Report:
        """One pass: claim up to ``limit`` due notices, deliver them, record the outcomes."""
        report = Report()
        claimed, endpoint, texts, lease = await self._claim(limit)
        if endpoint is None:
            report.no_endpoint = True
            return report
        report.claimed = len(claimed)
        if not claimed:
            return report
        outcomes = await self._send_all(endpoint, claimed, texts)
        await self._record(claimed, outcomes, lease, report)
        return report

    async def _claim(
        self, limit: int
    ) -> tuple[list[_Claimed], service.Endpoint | None, dict[NoticeKind, templates.Text], datetime]:
        now = self.clock()
        lease = now + self.policy.lease(limit)
        async with self.db.transaction() as session:
            endpoint = await service.load_endpoint(session, self.keyring)
            if endpoint is None:
                return [], None, {}, lease
            rows = list(
                (
                    await session.execute(
                        select(Notice)
                        .where(
                            Notice.state == NoticeState.PENDING,
                            Notice.next_attempt_at <= now,
                            or_(Notice.lease_until.is_(None), Notice.lease_until < now),
                        )
                        .order_by(Notice.next_attempt_at, Notice.created_at)
                        .limit(limit)
                        .with_for_update(skip_locked=True)
                    )
                ).scalars()
            )
            if not rows:
                return [], endpoint, {}, lease
            ids = [row.id for row in rows]
            await session.execute(
                update(Notice)
                .where(Notice.id.in_(ids))
                .values(lease_until=lease)
                .execution_options(synchronize_session=False)
            )
            names = dict(
                (
                    await session.execute(
                        select(Account.id, Account.name).where(
                            Account.id.in_({row.account_id for row in rows})
                        )
                    )
                ).all()
            )
            texts = await service.texts(session)
            claimed = [
                _Claimed(
                    row.id,
                    NoticeKind(row.kind),
                    row.account_id,
                    names.get(row.account_id),
                    row.attempts,
                    row.created_at,
                    dict(row.payload),
                )
                for row in rows
            ]
        return claimed, endpoint, texts, lease

    async def _send_all(
        self,
        endpoint: service.Endpoint,
        claimed: Sequence[_Claimed],
        texts: dict[NoticeKind, templates.Text],
    ) -> list[Outcome]:
        gate = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(self.policy.timeout),
            transport=self.transport,
            trust_env=False,
        ) as client:

            async def one(notice: _Claimed) -> Outcome:
                async with gate:
                    return await self._send(client, endpoint, notice, texts[notice.kind])

            return list(await asyncio.gather(*(one(n) for n in claimed)))

    async def _send(
        self,
        client: httpx.AsyncClient,
        endpoint: service.Endpoint,
        notice: _Claimed,
        text: templates.Text,
    ) -> Outcome:
        body = body_of(notice, text)
        headers = signed_headers(endpoint.secret, notice.id, self.clock(), body)
        try:
            async with asyncio.timeout(self.policy.timeout):
                async with client.stream(
                    "POST", endpoint.url, content=body, headers=headers
                ) as response:
                    status = response.status_code  # the body is never read
        except TimeoutError:
            return Outcome(notice.id, False, None, f"timed out after {self.policy.timeout:g}s")
        except httpx.TimeoutException:
            return Outcome(notice.id, False, None, f"timed out after {self.policy.timeout:g}s")
        except httpx.HTTPError as exc:
            return Outcome(notice.id, False, None, f"could not deliver: {exc!r}"[:_ERROR_CHARS])
        if 200 <= status < 300:
            return Outcome(notice.id, True, status, None)
        if 300 <= status < 400:
            where = response.headers.get("location", "")[:200]
            return Outcome(
                notice.id,
                False,
                status,
                f"answered {status}, a redirect to {where!r}; redirects are not followed",
            )
        return Outcome(notice.id, False, status, f"answered {status}")

    async def _record(
        self,
        claimed: Sequence[_Claimed],
        outcomes: Sequence[Outcome],
        lease: datetime,
        report: Report,
    ) -> None:
        now = self.clock()
        attempts = {n.id: n.attempts + 1 for n in claimed}
        kinds = {n.id: n for n in claimed}
        updates: list[dict[str, Any]] = []
        died: list[audit.EventIn] = []
        counted: list[str] = []
        for outcome in outcomes:
            tried = attempts[outcome.notice_id]
            if outcome.ok:
                state, label, next_at = NoticeState.DELIVERED, DELIVERED, now
            elif tried >= self.policy.max_attempts:
                state, label, next_at = NoticeState.DEAD, DEAD, now
                notice = kinds[outcome.notice_id]
                died.append(
                    audit.EventIn(
                        "notice.dead",
                        "notice",
                        outcome.notice_id,
                        notice.account_id,
                        {"kind": str(notice.kind), "attempts": tried, "error": outcome.error},
                    )
                )
            else:
                state, label = NoticeState.PENDING, FAILED
                next_at = now + self.policy.delay(tried)
            counted.append(label)
            updates.append(
                {
                    "b_id": outcome.notice_id,
                    "b_lease": lease,
                    "n_state": state,
                    "n_attempts": tried,
                    "n_next_attempt_at": next_at,
                    "n_last_status": outcome.status,
                    "n_last_error": outcome.error,
                    "n_last_attempt_at": now,
                    "n_delivered_at": now if outcome.ok else None,
                }
            )
        table = cast(Table, Notice.__table__)
        statement = (
            update(table)
            .where(table.c.id == bindparam("b_id"), table.c.lease_until == bindparam("b_lease"))
            .values(
                state=bindparam("n_state"),
                attempts=bindparam("n_attempts"),
                next_attempt_at=bindparam("n_next_attempt_at"),
                last_status=bindparam("n_last_status"),
                last_error=bindparam("n_last_error"),
                last_attempt_at=bindparam("n_last_attempt_at"),
                delivered_at=bindparam("n_delivered_at"),
                lease_until=None,
            )
        )
        async with self.db.transaction() as session:
            await session.execute(statement, updates)
            await audit.record_many(session, self.actor, died)
        for label in counted:
            record_webhook_delivery(label)
            setattr(report, label, getattr(report, label) + 1)
        for outcome in outcomes:
            if not outcome.ok:
                log.warning(
                    "notice delivery failed",
                    extra={"notice_id": outcome.notice_id, "error": outcome.error},
                )


async def deliver_until_idle(
    deliverer: Deliverer, *, limit: int = 100, passes: int = 1000
) -> Report:
    """Passes until one claims nothing (at most ``passes``): what is due now, sent."""
    total = Report()
    for _ in range(passes):
        report = await deliverer.deliver_due(limit=limit)
        total.no_endpoint = report.no_endpoint
        if not report.claimed:
            break
        total.claimed += report.claimed
        total.delivered += report.delivered
        total.failed += report.failed
        total.dead += report.dead
    return total
