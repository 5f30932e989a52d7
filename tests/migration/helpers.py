"""A small catalog to migrate across, rules texts, and an account with something in every part
of its state (licenses with overrides, activations, counters, data objects, add-ons).

- ``old@1``: features a, b enabled, c throttled; quotas projects 10, storage 100
- ``new@1``: features a enabled, b disabled, d enabled, c throttled; quotas projects 3, storage 100
- ``old-seat@1``: seat, 3 node-locked activations, term 1y, meters ``exports`` (hybrid) month 50
  and ``legacy_jobs`` day 5 (only this plan meters it)
- ``new-seat@1``: seat, 2 node-locked activations, term 1y, meter ``exports`` month 80
- ``new-usage@1``: usage, meters ``exports`` month 80 and ``units`` month 0 (seats convert into it)
- ``old-float@1`` / ``new-float@1``: as ``old-seat@1`` / ``new-seat@1``, with floating leases of 1h
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from keyshift.accounts import service as accounts
from keyshift.catalog import service as catalog
from keyshift.catalog.manifests import Edition, Plan
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Activation, License, Subscription, UsageCounter
from keyshift.licensing import activations
from keyshift.licensing import service as licensing
from keyshift.metering.periods import period_containing
from keyshift.migration.loader import load_rules_text
from keyshift.migration.rules import MigrationRules
from keyshift.objects import service as data_objects
from keyshift.security.secrets_store import Secrets

OLD = "old-seat@1"
NEW = "new-seat@1"
NEW_USAGE = "new-usage@1"
OLD_FLOAT = "old-float@1"
NEW_FLOAT = "new-float@1"
LEASE = timedelta(hours=1)  # the floating plans' lease_ttl

EDITIONS = [
    {
        "edition": {"key": "old", "version": "1", "name": "Old"},
        "features": {
            "a": "enabled",
            "b": "enabled",
            "c": {"mode": "throttled", "limit": 10, "period": "day"},
        },
        "quotas": {"projects": 10, "storage": 100},
    },
    {
        "edition": {"key": "new", "version": "1", "name": "New"},
        "features": {
            "a": "enabled",
            "b": "disabled",
            "c": {"mode": "throttled", "limit": 20, "period": "day"},
            "d": "enabled",
        },
        "quotas": {"projects": 3, "storage": 100},
    },
]


def _plan(key: str, edition: str, licensing: dict[str, Any], meters: list[dict[str, Any]]) -> Plan:
    return Plan.model_validate(
        {
            "plan": {"key": key, "version": "1", "name": key, "edition": edition},
            "licensing": licensing,
            "term": {"length": "1y", "grace_period": "7d"},
            "meters": meters,
        }
    )


EXPORTS = {"key": "exports", "unit": "export", "included": 50, "overage": "allow"}
#: Metered only by the old plan, daily: late events for it must land under the old plan.
LEGACY_JOBS = {
    "key": "legacy_jobs",
    "unit": "job",
    "included": 5,
    "reset": "day",
    "overage": "allow",
}
FLOATING = {"activation": "floating", "lease_ttl": "1h"}
PLANS = [
    _plan("old-seat", "old@1", {"model": "seat", "max_activations": 3}, [EXPORTS, LEGACY_JOBS]),
    _plan(
        "new-seat", "new@1", {"model": "seat", "max_activations": 2}, [{**EXPORTS, "included": 80}]
    ),
    _plan(
        "old-float",
        "old@1",
        {"model": "seat", "max_activations": 3, **FLOATING},
        [EXPORTS, LEGACY_JOBS],
    ),
    _plan(
        "new-float",
        "new@1",
        {"model": "seat", "max_activations": 2, **FLOATING},
        [{**EXPORTS, "included": 80}],
    ),
    _plan(
        "new-usage",
        "new@1",
        {"model": "usage"},
        [
            {**EXPORTS, "included": 80},
            {"key": "units", "unit": "unit", "included": 0, "overage": "allow"},
        ],
    ),
]

RULES = """
[rules]
key = "old-to-new"
version = "1"
name = "Old to new"
from = ["old-seat@1"]
to = "new-seat@1"

[features]
a = "keep"
b = "keep"
c = "keep"

[quotas]
projects = { on_conflict = "archive" }
storage = "keep"

[seats]
activations = "trim_to_cap"

[counters]
exports = "carry"

[addons]
extra = "carry"
"""


def rules(text: str = RULES, **replace: str) -> MigrationRules:
    for old, new in replace.items():
        text = text.replace(old, new)
    return load_rules_text("rules.toml", text)[0]


def _key(ref: str) -> str:
    return ref.split("@", 1)[0]


def mode_rules_text(source: str, target: str, activations: str = "trim_to_cap") -> str:
    """``RULES`` from ``source`` to ``target`` (e.g. floating to node-locked), with
    ``activations`` for [seats] and a version naming the pair."""
    return (
        RULES.replace('from = ["old-seat@1"]', f'from = ["{source}"]')
        .replace('to = "new-seat@1"', f'to = "{target}"')
        .replace('version = "1"', f'version = "{_key(source)}.{_key(target)}.{activations[:4]}"')
        .replace('activations = "trim_to_cap"', f'activations = "{activations}"')
    )


async def publish(db: Database) -> None:
    manifests = [catalog.Manifest("edition", Edition.model_validate(e)) for e in EDITIONS]
    manifests += [catalog.Manifest("plan", p) for p in PLANS]
    async with db.transaction() as session:
        await catalog.publish(session, SYSTEM, manifests)


async def rich_account(
    db: Database, secrets: Secrets, *, plan: str = OLD, objects: int = 5, exports: int = 7
) -> tuple[str, list[tuple[str, str]]]:
    """An account on ``plan`` with two licenses (one with a hand-set cap and extra feature),
    three activations on the first, ``objects`` projects of 1 unit each, an ``extra`` add-on,
    and ``exports`` units counted this month. Returns (account id, [(license id, key)])."""
    now = datetime.now(UTC)
    async with db.transaction() as session:
        account = await accounts.create_account(session, SYSTEM, name="Migrating Co")
        account.attributes = {"region": "eu", "tier": 2}
        account.preferences = {"theme": "dark", "locale": "de"}
        sub = await accounts.subscribe(session, SYSTEM, account.id, plan)
        sub.overrides = {"addons": {"extra": {"quotas": {"storage": 50}, "features": {}}}}
        keys = []
        for _ in range(2):
            issued = await licensing.issue_license(
                session, SYSTEM, secrets.keyring, account_id=account.id
            )
            keys.append((issued.license.id, issued.key))
        await session.execute(
            update(License)
            .where(License.id == keys[1][0])
            .values(max_activations_override=5, overrides={"features": {"b": "enabled"}})
        )
        for index in range(3):
            await activations.activate(
                session, SYSTEM, secrets.keyring, keys[0][1], fingerprint=f"machine-{index}"
            )
        for index in range(objects):
            await data_objects.put_object(
                session,
                SYSTEM,
                account.id,
                quota="projects",
                name=f"project-{index}",
                units=1,
                content=f"project {index} data".encode(),
            )
        anchor = sub.started_at
        span = period_containing("month", anchor, datetime.now(UTC))
        session.add(
            UsageCounter(
                account_id=account.id,
                meter="exports",
                period_start=span.start,
                period_end=span.end,
                used=exports,
            )
        )
    # Distinct last-seen times, so "most recently seen first" is well defined.
    async with db.transaction() as session:
        for index in range(3):
            await session.execute(
                update(Activation)
                .where(Activation.fingerprint == f"machine-{index}")
                .values(last_seen_at=now - timedelta(hours=10 - index))
            )
    return account.id, keys


async def subscription(db: Database, account_id: str) -> Subscription:
    async with db.transaction() as session:
        row = await session.get(Subscription, account_id)
        assert row is not None
        return row


async def state_of(db: Database, account_id: str) -> dict[str, Any]:
    """The account's state as a migration sees it (``keyshift.migration.state``)."""
    from keyshift.db.types import utcnow
    from keyshift.migration import repository

    async with db.transaction() as session:
        state = await repository.read_state(session, account_id, utcnow())
    assert state is not None
    return state


async def leases_age(db: Database, account_id: str, by: timedelta) -> None:
    """As if ``by`` had passed with no heartbeat: every lease the account's machines hold ends
    ``by`` earlier (a node-locked machine has none, and is not affected)."""
    async with db.transaction() as session:
        rows = (
            await session.execute(
                select(Activation.id, Activation.lease_expires_at).where(
                    Activation.account_id == account_id,
                    Activation.lease_expires_at.is_not(None),
                )
            )
        ).all()
        for activation_id, lease in rows:
            await session.execute(
                update(Activation)
                .where(Activation.id == activation_id)
                .values(lease_expires_at=lease - by)
            )
