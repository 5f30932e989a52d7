"""Queries over accounts. No domain decisions here: the service decides, these functions read."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.db.tables import Account


async def list_accounts(
    session: AsyncSession, *, limit: int, after: str | None = None
) -> list[Account]:
    """Accounts in id order; ``after`` is the last id of the previous page (keyset paging)."""
    query = select(Account).order_by(Account.id).limit(limit)
    if after is not None:
        query = query.where(Account.id > after)
    return list((await session.execute(query)).scalars())
