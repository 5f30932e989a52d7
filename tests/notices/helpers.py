"""Setting up notices for the tests: an endpoint at a loopback receiver, a deliverer with a
short backoff, and delivering until every notice has settled."""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Notice
from keyshift.notices import service
from keyshift.notices.delivery import Deliverer, Policy
from keyshift.notices.kinds import NoticeState
from keyshift.security.secrets_store import Secrets

FAST = Policy(timeout=0.5, max_attempts=4, backoff=0.02, backoff_max=0.1)


async def endpoint(db: Database, secrets: Secrets, url: str) -> str:
    """Point notices at ``url``; the secret keyshift made for it."""
    _, secret = await service.set_endpoint(db, secrets.keyring, SYSTEM, url)
    assert secret is not None
    return secret


async def notices(db: Database, account_id: str | None = None) -> list[Notice]:
    async with db.transaction() as session:
        query = select(Notice).order_by(Notice.created_at, Notice.kind)
        if account_id is not None:
            query = query.where(Notice.account_id == account_id)
        return list((await session.execute(query)).scalars())


async def settle(deliverer: Deliverer, db: Database, *, rounds: int = 200) -> None:
    """Deliver until no notice is pending (bounded: ``rounds`` passes)."""
    for _ in range(rounds):
        await deliverer.deliver_due()
        if not [n for n in await notices(db) if n.state == NoticeState.PENDING]:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("notices still pending after every round")


def deliverer(db: Database, secrets: Secrets, policy: Policy = FAST) -> Deliverer:
    return Deliverer(db, secrets.keyring, policy)
