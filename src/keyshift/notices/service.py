"""The vendor's side of notices: the webhook endpoint (its secret sealed like every secret at
rest), the templates, each account's notice history, the dead-letter list and replay. Every
change and every refusal is audited."""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit import service as audit
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.db.tables import Notice, NoticeEndpoint, NoticeTemplate
from keyshift.db.types import utcnow
from keyshift.errors import KeyshiftError
from keyshift.notices import templates
from keyshift.notices.errors import EndpointInvalid, NoticeNotFound, NotReplayable
from keyshift.notices.kinds import NoticeKind, NoticeState
from keyshift.security.keyring import Keyring, Sealed

#: The endpoint's single row.
ENDPOINT_ID = 1
_SECRET_CONTEXT = NoticeEndpoint.SECRET_CONTEXT
#: The Standard Webhooks secret prefix, and the secret's size range (bytes).
SECRET_PREFIX = "whsec_"
_SECRET_BYTES = (24, 64)
MAX_URL = 2000


@dataclass(frozen=True)
class Endpoint:
    """The endpoint as a deliverer uses it: its URL and its secret (``whsec_…``)."""

    url: str
    secret: str


@dataclass(frozen=True)
class EndpointInfo:
    """The endpoint as an operator sees it: never the secret."""

    url: str
    enabled: bool
    updated_at: datetime
    updated_by: str


@dataclass(frozen=True)
class TemplateInfo:
    kind: NoticeKind
    subject: str
    body: str
    variables: list[str]
    custom: bool


async def _refused(
    db: Database, actor: Actor, action: str, error: KeyshiftError, **what: object
) -> None:
    """Audit a refused change in a transaction of its own (the change itself wrote nothing)."""
    async with db.transaction() as session:
        await audit.record(
            session,
            actor,
            action,
            "notice_config",
            str(what.get("target", "notices")),
            details={"code": error.code, "field": error.field, "reason": error.message},
        )


def check_url(url: str) -> str:
    """An http(s) URL with a host and no credentials in it, or ``EndpointInvalid``."""
    if len(url) > MAX_URL:
        raise EndpointInvalid(f"the URL is {len(url)} characters; at most {MAX_URL}", field="url")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port out of range
    except ValueError as exc:
        raise EndpointInvalid(f"not a URL: {exc}", field="url") from exc
    if parts.scheme not in ("http", "https"):
        raise EndpointInvalid("the URL must start with http:// or https://", field="url")
    if not parts.hostname:
        raise EndpointInvalid("the URL has no host", field="url")
    if parts.username or parts.password:
        raise EndpointInvalid(
            "the URL carries credentials; the notices are signed instead", field="url"
        )
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise EndpointInvalid("the URL contains whitespace or control characters", field="url")
    del port
    return url


def check_secret(secret: str) -> str:
    """A Standard Webhooks secret (``whsec_`` + base64 of 24 to 64 bytes), or
    ``EndpointInvalid``."""
    if not secret.startswith(SECRET_PREFIX):
        raise EndpointInvalid(f"the secret must start with {SECRET_PREFIX}", field="secret")
    try:
        raw = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EndpointInvalid(
            f"the secret after {SECRET_PREFIX} is not base64", field="secret"
        ) from exc
    low, high = _SECRET_BYTES
    if not low <= len(raw) <= high:
        raise EndpointInvalid(
            f"the secret is {len(raw)} bytes; it must be {low} to {high}", field="secret"
        )
    return secret


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


async def set_endpoint(
    db: Database,
    keyring: Keyring,
    actor: Actor,
    url: str,
    *,
    secret: str | None = None,
    enabled: bool = True,
) -> tuple[EndpointInfo, str | None]:
    """Configure the endpoint. Without ``secret`` a new one is made and returned (shown once);
    with one, it is checked and kept. Refusals are audited and write nothing else."""
    try:
        check_url(url)
        if secret is not None:
            check_secret(secret)
    except EndpointInvalid as error:
        await _refused(db, actor, "notice.endpoint.refused", error, target="endpoint")
        raise
    made = new_secret() if secret is None else None
    sealed = keyring.seal((secret or made or "").encode(), context=_SECRET_CONTEXT)
    now = utcnow()
    async with db.transaction() as session:
        row = await session.get(NoticeEndpoint, ENDPOINT_ID, with_for_update=True)
        if row is None:
            row = NoticeEndpoint(id=ENDPOINT_ID)
            session.add(row)
        row.url, row.enabled = url, enabled
        row.secret_ciphertext, row.secret_kid = sealed.ciphertext, sealed.kid
        row.updated_at, row.updated_by = now, actor.id
        await session.flush()
        await audit.record(
            session,
            actor,
            "notice.endpoint.set",
            "notice_config",
            "endpoint",
            details={"url": url, "enabled": enabled, "secret": "generated" if made else "given"},
        )
        info = EndpointInfo(url, enabled, now, actor.id)
    return info, made


async def endpoint_info(session: AsyncSession) -> EndpointInfo | None:
    row = await session.get(NoticeEndpoint, ENDPOINT_ID)
    if row is None:
        return None
    return EndpointInfo(row.url, row.enabled, row.updated_at, row.updated_by)


async def load_endpoint(session: AsyncSession, keyring: Keyring) -> Endpoint | None:
    """The enabled endpoint with its secret opened, or None."""
    row = await session.get(NoticeEndpoint, ENDPOINT_ID)
    if row is None or not row.enabled:
        return None
    secret = keyring.open(Sealed(row.secret_kid, row.secret_ciphertext), context=_SECRET_CONTEXT)
    return Endpoint(row.url, secret.decode())


# -- templates ----------------------------------------------------------------------------------


async def set_template(
    db: Database, actor: Actor, kind: NoticeKind, subject: str, body: str
) -> TemplateInfo:
    """Store the vendor's text for ``kind``; one naming a variable the kind does not have is
    refused (``TemplateInvalid`` naming it), audited, and nothing is stored."""
    try:
        text = templates.check(kind, subject, body)
    except KeyshiftError as error:
        await _refused(db, actor, "notice.template.refused", error, target=f"template:{kind}")
        raise
    async with db.transaction() as session:
        row = await session.get(NoticeTemplate, str(kind), with_for_update=True)
        if row is None:
            row = NoticeTemplate(kind=str(kind))
            session.add(row)
        row.subject, row.body = text.subject, text.body
        row.updated_at, row.updated_by = utcnow(), actor.id
        await session.flush()
        await audit.record(
            session, actor, "notice.template.set", "notice_config", f"template:{kind}"
        )
    return TemplateInfo(kind, text.subject, text.body, sorted(templates.VARIABLES[kind]), True)


async def reset_template(db: Database, actor: Actor, kind: NoticeKind) -> TemplateInfo:
    """Drop the vendor's text for ``kind``: the built-in one applies again."""
    async with db.transaction() as session:
        row = await session.get(NoticeTemplate, str(kind), with_for_update=True)
        if row is not None:
            await session.delete(row)
        await audit.record(
            session, actor, "notice.template.reset", "notice_config", f"template:{kind}"
        )
    default = templates.DEFAULTS[kind]
    return TemplateInfo(
        kind, default.subject, default.body, sorted(templates.VARIABLES[kind]), False
    )


async def texts(session: AsyncSession) -> dict[NoticeKind, templates.Text]:
    """Each kind's text: the vendor's where one is stored, else the built-in one."""
    stored = {
        row.kind: templates.Text(row.subject, row.body)
        for row in (await session.execute(select(NoticeTemplate))).scalars()
    }
    return {kind: stored.get(kind, templates.DEFAULTS[kind]) for kind in NoticeKind}


async def list_templates(session: AsyncSession) -> list[TemplateInfo]:
    stored = {row.kind for row in (await session.execute(select(NoticeTemplate))).scalars()}
    return [
        TemplateInfo(
            kind, text.subject, text.body, sorted(templates.VARIABLES[kind]), kind in stored
        )
        for kind, text in (await texts(session)).items()
    ]


# -- history, dead letters, replay --------------------------------------------------------------


async def history(
    session: AsyncSession,
    account_id: str,
    *,
    kind: NoticeKind | None = None,
    limit: int = 100,
    before: datetime | None = None,
) -> list[Notice]:
    """An account's notices, newest first."""
    query = select(Notice).where(Notice.account_id == account_id)
    if kind is not None:
        query = query.where(Notice.kind == kind)
    if before is not None:
        query = query.where(Notice.created_at < before)
    query = query.order_by(Notice.created_at.desc(), Notice.id).limit(limit)
    return list((await session.execute(query)).scalars())


async def dead_letters(session: AsyncSession, *, limit: int = 100) -> list[Notice]:
    """The notices every attempt failed for, oldest first."""
    query = (
        select(Notice)
        .where(Notice.state == NoticeState.DEAD)
        .order_by(Notice.last_attempt_at, Notice.id)
        .limit(limit)
    )
    return list((await session.execute(query)).scalars())


async def get(session: AsyncSession, notice_id: str) -> Notice:
    row = await session.get(Notice, notice_id)
    if row is None:
        raise NoticeNotFound(f"no notice {notice_id}", field="notice_id")
    return row


async def replay(db: Database, actor: Actor, notice_id: str) -> Notice:
    """Send a dead (or an already delivered) notice again, with a fresh budget of attempts
    and the same webhook id (a receiver that saw it can tell). Refusals are audited."""
    try:
        async with db.transaction() as session:
            row = await session.get(Notice, notice_id, with_for_update=True)
            if row is None:
                raise NoticeNotFound(f"no notice {notice_id}", field="notice_id")
            if row.state not in (NoticeState.DEAD, NoticeState.DELIVERED):
                raise NotReplayable(
                    f"notice {notice_id} is {row.state}; only a dead or delivered notice is"
                    " replayed",
                    field="notice_id",
                    state=row.state,
                )
            before = row.state
            row.state, row.attempts = NoticeState.PENDING, 0
            row.next_attempt_at, row.lease_until = utcnow(), None
            await session.flush()
            await audit.record(
                session,
                actor,
                "notice.replay",
                "notice",
                row.id,
                account_id=row.account_id,
                details={"kind": row.kind, "was": before},
            )
            return row
    except (NoticeNotFound, NotReplayable) as error:
        async with db.transaction() as session:
            await audit.record(
                session,
                actor,
                "notice.replay.refused",
                "notice",
                notice_id[:200],
                details={"code": error.code, "reason": error.message},
            )
        raise
