"""A metered catalog on top of the sample one, and shortcuts the metering tests share.

- ``metered@1`` (usage model, term 1mo):
  ``calls`` sum/month, 100 included, allow, notices at 80 % and 100 %;
  ``jobs`` sum/month, 25 included, block; ``devices`` unique/month, 3 included, block;
  ``peak`` max/day, 50 included, notify (default thresholds 80 %, 100 %).
- ``hybrid@1`` (seat model, 2 node-locked machines): ``exports`` sum/month, 10 included, block.
- ``bulk@1`` (usage model, term 1mo), room for large batches and no notices: ``requests``
  sum/allow, ``users`` unique/block, ``workers`` max/notify at 90 %, ``tasks`` sum/block,
  each 1,000,000 included.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from keyshift.catalog import service as catalog
from keyshift.catalog.manifests import Plan
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Subscription
from keyshift.metering import reports, subjects
from keyshift.metering import service as metering
from keyshift.security.secrets_store import Secrets
from tests import factories

METERED = "metered@1"
HYBRID = "hybrid@1"
BULK = "bulk@1"


def _plan(key: str, licensing: dict[str, Any], meters: list[dict[str, Any]]) -> Plan:
    header = {"key": key, "version": "1", "name": key, "edition": "sample@1"}
    return Plan.model_validate(
        {"plan": header, "licensing": licensing, "term": {"length": "1mo"}, "meters": meters}
    )


PLANS = [
    _plan(
        "metered",
        {"model": "usage"},
        [
            {
                "key": "calls",
                "unit": "call",
                "included": 100,
                "overage": "allow",
                "notify_at": [80, 100],
            },
            {"key": "jobs", "unit": "job", "included": 25, "overage": "block"},
            {"key": "devices", "unit": "device", "aggregation": "unique", "included": 3},
            {
                "key": "peak",
                "unit": "worker",
                "aggregation": "max",
                "reset": "day",
                "included": 50,
                "overage": "notify",
            },
        ],
    ),
    _plan(
        "hybrid",
        {"model": "seat", "max_activations": 2},
        [{"key": "exports", "unit": "export", "included": 10, "overage": "block"}],
    ),
    _plan(
        "bulk",
        {"model": "usage"},
        [
            {"key": "requests", "unit": "request", "included": 10**6, "overage": "allow"},
            {"key": "users", "unit": "user", "aggregation": "unique", "included": 10**6},
            {
                "key": "workers",
                "unit": "worker",
                "aggregation": "max",
                "included": 10**6,
                "overage": "notify",
                "notify_at": [90],
            },
            {"key": "tasks", "unit": "task", "included": 10**6, "overage": "block"},
        ],
    ),
]


async def publish(db: Database) -> None:
    await factories.publish_sample_catalog(db)
    async with db.transaction() as session:
        await catalog.publish(session, SYSTEM, [catalog.Manifest("plan", p) for p in PLANS])


async def metered_license(
    db: Database, secrets: Secrets, plan_ref: str = METERED
) -> tuple[str, str, str]:
    """(account id, license id, key) on a freshly published metered catalog."""
    await publish(db)
    account = await factories.create_account(db, plan_ref)
    row, key = await factories.issue_license(db, secrets, account.id)
    return account.id, row.id, key


async def anchor_of(db: Database, account_id: str) -> datetime:
    async with db.transaction() as session:
        sub = await session.get(Subscription, account_id)
        assert sub is not None
        return sub.started_at


async def record(
    db: Database, account_id: str, meter: str, quantity: int, idem: str, **kw: Any
) -> metering.Recorded:
    """Record one event for the account as the system, in its own transaction (with retries)."""
    event = metering.UsageIn(
        meter, quantity, idem, timestamp=kw.pop("timestamp", None), member=kw.pop("member", None)
    )

    async def work(session: Any) -> metering.Recorded:
        subject = await subjects.subject_for_account(session, account_id)
        return await metering.record(session, SYSTEM, subject, event, **kw)

    return await metering.in_transaction(db, work)


async def record_batch(
    db: Database, account_id: str, events: list[metering.UsageIn], **kw: Any
) -> list[metering.Recorded]:
    """Record a batch for the account as the system, in its own transaction (with retries)."""

    async def work(session: Any) -> list[metering.Recorded]:
        subject = await subjects.subject_for_account(session, account_id)
        return await metering.record_batch(session, SYSTEM, subject, events, **kw)

    return await metering.in_transaction(db, work)


async def used(db: Database, account_id: str, meter: str, period: str = "current") -> int:
    async with db.transaction() as session:
        view = await reports.account_usage(session, account_id, period=period, history_limit=0)
    return view.meters[meter].used
