"""Signing a client in to the dashboard the way a browser does: load the sign-in form (its
one-time value in a cookie and the form), post the token as a form, keep the session cookie."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from sqlalchemy import select

from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_in(page: str) -> str:
    found = _CSRF.search(page)
    assert found is not None, page[:2000]
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, token: str) -> httpx.Response:
    form = await client.get("/dashboard/sign-in")
    assert form.status_code == 200, form.text
    return await client.post(
        "/dashboard/sign-in", data={"token": token, "csrf": csrf_in(form.text)}
    )


@asynccontextmanager
async def browser(transport: httpx.AsyncBaseTransport) -> AsyncIterator[httpx.AsyncClient]:
    """A client with its own cookie jar (one browser) on ``transport``."""
    async with httpx.AsyncClient(transport=transport, base_url="http://keyshift.test") as c:
        yield c


async def events(db: Database, action: str) -> list[AuditEvent]:
    async with db.transaction() as session:
        rows = await session.execute(
            select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
        )
        return list(rows.scalars())
