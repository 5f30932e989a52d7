"""Accounts and their subscription: create, list, show, subscribe to a plan version."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import Field, field_validator

from keyshift.api.deps import Session, require
from keyshift.api.schemas import Request
from keyshift.context import Actor
from keyshift.licensing import service

router = APIRouter(prefix="/v1/accounts", tags=["accounts"])
Reader = Annotated[Actor, Depends(require("accounts:read"))]
Writer = Annotated[Actor, Depends(require("accounts:write"))]

PlanRef = Annotated[str, Field(min_length=3, max_length=100, examples=["pro-seat@2025"])]


class AccountCreate(Request):
    name: str = Field(min_length=1, max_length=200)
    external_ref: str | None = Field(default=None, min_length=1, max_length=200)
    attributes: dict[str, Any] = Field(default_factory=dict, max_length=50)
    plan: PlanRef | None = Field(
        default=None, description="Subscribe the new account to this plan version at once."
    )

    @field_validator("attributes")
    @classmethod
    def _short_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        if any(len(k) > 64 for k in value):
            raise ValueError("attribute names have at most 64 characters")
        return value


class SubscriptionPut(Request):
    plan: PlanRef


@router.post("", status_code=201)
async def create_account(body: AccountCreate, actor: Writer, session: Session) -> dict[str, Any]:
    account = await service.create_account(
        session, actor, name=body.name, external_ref=body.external_ref, attributes=body.attributes
    )
    subscription = None
    if body.plan is not None:
        subscription = await service.subscribe(session, actor, account.id, body.plan)
    return service.account_view(account, subscription)


@router.get("")
async def list_accounts(
    _actor: Reader,
    session: Session,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = 100,
    after: Annotated[str | None, Query(max_length=36)] = None,
) -> dict[str, Any]:
    """One page of accounts; ``next`` is the ``after`` to pass for the following page."""
    accounts = await service.list_accounts(session, limit=limit, after=after)
    return {
        "items": [service.account_view(a) for a in accounts],
        "next": accounts[-1].id if len(accounts) == limit else None,
    }


@router.get("/{account_id}")
async def show_account(account_id: str, _actor: Reader, session: Session) -> dict[str, Any]:
    account = await service.get_account(session, account_id)
    return service.account_view(account, await service.get_subscription(session, account.id))


@router.put("/{account_id}/subscription")
async def put_subscription(
    account_id: str, body: SubscriptionPut, actor: Writer, session: Session
) -> dict[str, Any]:
    subscription = await service.subscribe(session, actor, account_id, body.plan)
    return service.subscription_view(subscription) or {}
