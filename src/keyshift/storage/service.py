"""Put, list and remove an account's data objects. The vendor's application reports them (an
object is a project, a file, a dataset: ``units`` of a ``quota``); a migration that archives
excess data moves them between tiers (``keyshift.migration``)."""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit import service as audit
from keyshift.catalog.manifests import KEY_PATTERN
from keyshift.context import Actor
from keyshift.db.tables import DataObject
from keyshift.db.types import utcnow
from keyshift.errors import InvalidInput, NotFound
from keyshift.licensing import service as licensing

#: Objects carry small payloads here; larger data belongs in the vendor's own store.
MAX_CONTENT_BYTES = 1024 * 1024
MAX_UNITS = 10**12
_QUOTA = re.compile(KEY_PATTERN)


async def put_object(
    session: AsyncSession,
    actor: Actor,
    account_id: str,
    *,
    quota: str,
    name: str,
    units: int,
    content: bytes,
) -> DataObject:
    """Store one object in the standard tier. InvalidInput naming the field when malformed."""
    if not _QUOTA.match(quota):
        raise InvalidInput("a quota name is lower-case letters, digits, _ and -", field="quota")
    if not 1 <= len(name) <= 200 or not name.isprintable():
        raise InvalidInput("a name has 1 to 200 printable characters", field="name")
    if isinstance(units, bool) or not isinstance(units, int) or not 0 <= units <= MAX_UNITS:
        raise InvalidInput(f"units is an integer from 0 to {MAX_UNITS}", field="units")
    if len(content) > MAX_CONTENT_BYTES:
        raise InvalidInput(f"content is at most {MAX_CONTENT_BYTES} bytes", field="content")
    # Refused while a migration holds the account: its plan counted the objects there were.
    await licensing.lock_for_change(session, account_id)
    row = DataObject(
        id=str(uuid.uuid4()),
        account_id=account_id,
        quota=quota,
        name=name,
        units=units,
        tier="standard",
        state="active",
        content=content,
        content_hash=hashlib.sha256(content).hexdigest(),
        created_at=utcnow(),
    )
    session.add(row)
    await session.flush()
    await audit.record(
        session,
        actor,
        "object.put",
        "object",
        row.id,
        account_id=account_id,
        details={"quota": quota, "units": units, "content_hash": row.content_hash},
    )
    return row


async def list_objects(
    session: AsyncSession, account_id: str, *, include_superseded: bool = False
) -> list[DataObject]:
    """The account's live objects (and, if asked, the originals a migration superseded and
    keeps until it is finalized), oldest first."""
    await licensing.get_account(session, account_id)
    query = select(DataObject).where(DataObject.account_id == account_id)
    if not include_superseded:
        query = query.where(DataObject.state == "active")
    rows = await session.execute(query.order_by(DataObject.created_at, DataObject.id))
    return list(rows.scalars())


async def quota_usage(session: AsyncSession, account_id: str) -> dict[str, int]:
    """Units per quota held by live objects in the standard tier."""
    rows = await session.execute(
        select(DataObject.quota, func.sum(DataObject.units))
        .where(
            DataObject.account_id == account_id,
            DataObject.state == "active",
            DataObject.tier == "standard",
        )
        .group_by(DataObject.quota)
    )
    return {quota: int(total or 0) for quota, total in rows.all()}


async def get_object(session: AsyncSession, account_id: str, object_id: str) -> DataObject:
    row = await session.get(DataObject, object_id)
    if row is None or row.account_id != account_id:
        raise NotFound(f"no object {object_id}", field="object_id")
    return row


def object_view(row: DataObject) -> dict[str, Any]:
    return {
        "id": row.id,
        "account_id": row.account_id,
        "quota": row.quota,
        "name": row.name,
        "units": row.units,
        "tier": row.tier,
        "state": row.state,
        "content_hash": row.content_hash,
        "created_at": row.created_at,
    }
