"""Accounts and subscriptions through the service: create, list by page, subscribe and
change plan; an unknown plan writes nothing. On both databases."""

from __future__ import annotations

import pytest

from keyshift.accounts import service as accounts
from keyshift.audit import service as audit
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.errors import InvalidInput, PlanNotFound
from tests import factories

ACTOR = Actor(id="tester", request_id="req-svc")


async def _actions(db: Database) -> list[str]:
    async with db.transaction() as session:
        return [e.action for e in await audit.list_events(session, limit=1000)]


# -- accounts and subscriptions ---------------------------------------------------------------


async def test_create_account_subscribe_and_list_pages(db: Database) -> None:
    await factories.publish_sample_catalog(db)
    created = [await factories.create_account(db, name=f"a{i}") for i in range(5)]
    async with db.transaction() as session:
        first = await accounts.list_accounts(session, limit=3)
        second = await accounts.list_accounts(session, limit=3, after=first[-1].id)
        subscription = await accounts.get_subscription(session, created[0].id)
    assert len(first) == 3 and len(second) == 2
    assert {a.id for a in first + second} == {a.id for a in created}
    assert subscription is not None and subscription.plan_key == "seat-node"
    actions = await _actions(db)
    assert actions.count("account.create") == 5 and actions.count("account.subscribe") == 5


async def test_subscribing_to_an_unknown_plan_writes_nothing(db: Database) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db, plan_ref=None)
    before = await _actions(db)
    with pytest.raises(PlanNotFound):
        async with db.transaction() as session:
            await accounts.subscribe(session, ACTOR, account.id, "nope@1")
    with pytest.raises(InvalidInput) as bad:
        async with db.transaction() as session:
            await accounts.subscribe(session, ACTOR, account.id, "not a ref")
    assert bad.value.field == "plan"
    async with db.transaction() as session:
        assert await accounts.get_subscription(session, account.id) is None
    assert await _actions(db) == before


async def test_changing_plan_bumps_entitlements_version(db: Database) -> None:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)
    async with db.transaction() as session:
        changed = await accounts.subscribe(session, ACTOR, account.id, factories.SEAT_FLOATING)
    assert changed.entitlements_version == 2 and changed.plan_key == "seat-floating"
