"""Small builders every test shares: a sample catalog, accounts, licenses.

The sample catalog (built here from Python dicts, independent of ``examples/``):

- edition ``sample@1``: features ``export`` enabled, ``sync`` throttled, ``beta`` disabled
- plan ``seat-node@1``: seat model, 3 node-locked activations, term 1y, grace 7d
- plan ``seat-floating@1``: seat model, 2 floating leases with a 1h TTL, term 30d, grace 0d
- plan ``usage@1``: usage model, uncapped activations, perpetual, one ``api_calls`` meter
"""

from __future__ import annotations

from typing import Any

from keyshift.accounts import service as accounts
from keyshift.catalog import service as catalog
from keyshift.catalog.manifests import Edition, Plan
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Account, License
from keyshift.licensing import service
from keyshift.security.secrets_store import Secrets

SEAT_NODE = "seat-node@1"
SEAT_FLOATING = "seat-floating@1"
USAGE = "usage@1"

EDITION: dict[str, Any] = {
    "edition": {"key": "sample", "version": "1", "name": "Sample"},
    "features": {
        "export": "enabled",
        "sync": {"mode": "throttled", "limit": 100, "period": "day"},
        "beta": "disabled",
    },
    "quotas": {"projects": 10, "storage_gb": {"limit": 5, "unit": "GB"}},
}


def _plan(key: str, licensing: dict[str, Any], term: dict[str, Any], **extra: Any) -> Plan:
    header = {"key": key, "version": "1", "name": key, "edition": "sample@1"}
    return Plan.model_validate({"plan": header, "licensing": licensing, "term": term, **extra})


PLANS: list[Plan] = [
    _plan(
        "seat-node",
        {"model": "seat", "max_activations": 3},
        {"length": "1y", "grace_period": "7d"},
    ),
    _plan(
        "seat-floating",
        {"model": "seat", "max_activations": 2, "activation": "floating", "lease_ttl": "1h"},
        {"length": "30d"},
    ),
    _plan(
        "usage",
        {"model": "usage"},
        {"length": "perpetual"},
        meters=[{"key": "api_calls", "unit": "call", "included": 1000}],
    ),
]


async def publish_sample_catalog(db: Database) -> None:
    manifests = [catalog.Manifest("edition", Edition.model_validate(EDITION))]
    manifests += [catalog.Manifest("plan", plan) for plan in PLANS]
    async with db.transaction() as session:
        await catalog.publish(session, SYSTEM, manifests)


async def create_account(
    db: Database, plan_ref: str | None = SEAT_NODE, *, name: str = "Acme"
) -> Account:
    """An account, subscribed to ``plan_ref`` (publish the sample catalog first)."""
    async with db.transaction() as session:
        account = await accounts.create_account(session, SYSTEM, name=name)
        if plan_ref is not None:
            await accounts.subscribe(session, SYSTEM, account.id, plan_ref)
    return account


async def issue_license(
    db: Database, secrets: Secrets, account_id: str, **kw: Any
) -> tuple[License, str]:
    """A license for the account; ``kw`` goes to ``service.issue_license``. Returns (row, key)."""
    async with db.transaction() as session:
        issued = await service.issue_license(
            session, SYSTEM, secrets.keyring, account_id=account_id, **kw
        )
    return issued.license, issued.key
