"""How an account and its subscription are shown (the API's answers, the CLI's JSON): built
from the rows the service returns."""

from __future__ import annotations

from typing import Any, Self

from keyshift.db.tables import Account, Subscription
from keyshift.schemas import Instant, Response


class SubscriptionOut(Response):
    plan: str
    plan_hash: str
    entitlements_version: int
    started_at: Instant

    @classmethod
    def of(cls, subscription: Subscription) -> Self:
        return cls(
            plan=f"{subscription.plan_key}@{subscription.plan_version}",
            plan_hash=subscription.plan_hash,
            entitlements_version=subscription.entitlements_version,
            started_at=subscription.started_at,
        )


class SubscriptionDetail(SubscriptionOut):
    """With the overrides an admin or a migration set: add-ons, read-only quotas, a
    downgrade's grace."""

    overrides: dict[str, Any]

    @classmethod
    def of(cls, subscription: Subscription) -> Self:
        base = SubscriptionOut.of(subscription).model_dump()
        return cls(**base, overrides=subscription.overrides or {})


class AccountOut(Response):
    id: str
    name: str
    external_ref: str | None
    status: str
    attributes: dict[str, Any]
    created_at: Instant
    subscription: SubscriptionOut | None = None

    @classmethod
    def of(cls, account: Account, subscription: Subscription | None = None) -> Self:
        plan = None if subscription is None else SubscriptionOut.of(subscription)
        return cls.model_validate(account).model_copy(update={"subscription": plan})


class AccountDetail(AccountOut):
    """With what an admin sets by hand: preferences and the subscription's overrides."""

    subscription: SubscriptionDetail | None = None
    preferences: dict[str, Any]

    @classmethod
    def of(cls, account: Account, subscription: Subscription | None = None) -> Self:
        return cls(
            **AccountOut.of(account).model_dump(exclude={"subscription"}),
            subscription=None if subscription is None else SubscriptionDetail.of(subscription),
            preferences=account.preferences or {},
        )


class AccountPage(Response):
    items: list[AccountOut]
    next: str | None = None
