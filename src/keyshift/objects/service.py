"""Put and list an account's data objects. The vendor's application reports them (an object is
a project, a file, a dataset: ``units`` of a ``quota``), within the account's quotas; a
migration that archives excess data moves them between tiers (``keyshift.migration``)."""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.accounts import service as accounts
from keyshift.audit import service as audit
from keyshift.catalog import service as catalog
from keyshift.catalog.entitlements import Entitlements, with_overrides
from keyshift.catalog.manifests import KEY_PATTERN
from keyshift.context import Actor
from keyshift.db.tables import DataObject, Subscription
from keyshift.db.types import utcnow
from keyshift.errors import Conflict, InvalidInput
from keyshift.objects.errors import ObjectQuotaExceeded, QuotaReadOnly, UnknownQuota

#: Objects carry small payloads here; larger data belongs in the vendor's own store.
MAX_CONTENT_BYTES = 1024 * 1024
MAX_UNITS = 10**12
_QUOTA = re.compile(KEY_PATTERN)
#: A plan meter named like a quota with one of these overage policies lets objects exceed it.
OVERAGE_ALLOWED = ("allow", "notify")
#: What counts against a quota: live objects in the standard tier. Archive copies and the
#: originals a migration superseded do not (the migration planner counts the same way:
#: ``keyshift.migration.planner.quota_usage``).
_COUNTED = (DataObject.state == "active", DataObject.tier == "standard")


def admit_object(entitlements: Entitlements, quota: str, used: int, units: int) -> bool:
    """May ``units`` more of ``quota`` be stored, ``used`` being stored already? True when
    they go past the limit as overage the plan allows; False when they fit. Raises
    QuotaReadOnly, UnknownQuota or ObjectQuotaExceeded otherwise. Pure.

    The plan allows overage on a quota through a meter of the same name whose ``overage`` is
    ``allow`` or ``notify`` (the usage side's words); with none, or ``block``, the limit holds.
    An object of 0 units never takes the use further, so it is only refused by the first two.
    """
    if quota in entitlements.read_only:
        raise QuotaReadOnly(
            f"quota {quota!r} is read-only since a migration: nothing new may be filed under it",
            field="quota",
            quota=quota,
        )
    limit = entitlements.quotas.get(quota)
    if limit is None:
        raise UnknownQuota(
            f"the account's plan {entitlements.plan_ref} (edition {entitlements.edition_ref})"
            f" has no quota {quota!r}",
            field="quota",
            quota=quota,
        )
    if units == 0 or used + units <= limit:
        return False
    meter = entitlements.meters.get(quota)
    if meter is not None and meter.get("overage") in OVERAGE_ALLOWED:
        return True
    raise ObjectQuotaExceeded(
        f"quota {quota!r} allows {limit}; {used} used, this object needs {units}",
        field="units",
        quota=quota,
        limit=limit,
        used=used,
        requested=units,
    )


async def account_entitlements(session: AsyncSession, subscription: Subscription) -> Entitlements:
    """The subscription's plan with the account's overrides (add-ons, read-only quotas, a
    grace's old limits) as they stand now: what validation reports without a license's own
    hand-set values, which extend that license only."""
    plan_ref = f"{subscription.plan_key}@{subscription.plan_version}"
    base = await catalog.entitlements_for(session, plan_ref, subscription.plan_hash)
    return with_overrides(base, subscription.overrides or {}, None, utcnow())


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
    """Store one object in the standard tier, within the account's quota (see ``admit_object``).
    InvalidInput naming the field when malformed."""
    if not _QUOTA.match(quota):
        raise InvalidInput("a quota name is lower-case letters, digits, _ and -", field="quota")
    if not 1 <= len(name) <= 200 or not name.isprintable():
        raise InvalidInput("a name has 1 to 200 printable characters", field="name")
    if isinstance(units, bool) or not isinstance(units, int) or not 0 <= units <= MAX_UNITS:
        raise InvalidInput(f"units is an integer from 0 to {MAX_UNITS}", field="units")
    if len(content) > MAX_CONTENT_BYTES:
        raise InvalidInput(f"content is at most {MAX_CONTENT_BYTES} bytes", field="content")
    # Refused while a migration holds the account: its plan counted the objects there were.
    # The subscription's row lock also serialises writers, so two cannot both fit in the room
    # one of them leaves: the use is read after it is taken.
    subscription = await accounts.lock_for_change(session, account_id)
    if subscription is None:
        raise Conflict("the account has no plan; subscribe it first", field="account_id")
    entitlements = await account_entitlements(session, subscription)
    used = await quota_used(session, account_id, quota)
    over_quota = admit_object(entitlements, quota, used, units)
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
    details: dict[str, Any] = {"quota": quota, "units": units, "content_hash": row.content_hash}
    if over_quota:
        details["over_quota"] = {"limit": entitlements.quotas[quota], "used": used}
    await audit.record(
        session, actor, "object.put", "object", row.id, account_id=account_id, details=details
    )
    return row


async def list_objects(
    session: AsyncSession, account_id: str, *, include_superseded: bool = False
) -> list[DataObject]:
    """The account's live objects (and, if asked, the originals a migration superseded and
    keeps until it is finalized), oldest first."""
    await accounts.get_account(session, account_id)
    query = select(DataObject).where(DataObject.account_id == account_id)
    if not include_superseded:
        query = query.where(DataObject.state == "active")
    rows = await session.execute(query.order_by(DataObject.created_at, DataObject.id))
    return list(rows.scalars())


async def quota_usage(session: AsyncSession, account_id: str) -> dict[str, int]:
    """Units per quota held by live objects in the standard tier."""
    rows = await session.execute(
        select(DataObject.quota, func.sum(DataObject.units))
        .where(DataObject.account_id == account_id, *_COUNTED)
        .group_by(DataObject.quota)
    )
    return {quota: int(total or 0) for quota, total in rows.all()}


async def quota_used(session: AsyncSession, account_id: str, quota: str) -> int:
    """Units of one quota held by live objects in the standard tier."""
    total = await session.scalar(
        select(func.coalesce(func.sum(DataObject.units), 0)).where(
            DataObject.account_id == account_id, DataObject.quota == quota, *_COUNTED
        )
    )
    return int(total or 0)
