"""Accounts and what they hold: create, list, show, subscribe to a plan version, add-ons,
preferences and data objects (what a migration carries from one plan to the next)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query
from pydantic import ConfigDict, Field, field_validator

from keyshift.accounts import service
from keyshift.accounts.schemas import AccountDetail, AccountOut, AccountPage, SubscriptionOut
from keyshift.api.deps import Session, require
from keyshift.api.schemas import Ref, Request
from keyshift.catalog.manifests import KEY_PATTERN, MAX_LIMIT
from keyshift.context import Actor
from keyshift.errors import InvalidInput
from keyshift.objects import service as data_objects
from keyshift.objects.schemas import ObjectList, ObjectOut

router = APIRouter(prefix="/v1/accounts", tags=["accounts"])
Reader = Annotated[Actor, Depends(require("accounts:read"))]
Writer = Annotated[Actor, Depends(require("accounts:write"))]

PlanRef = Annotated[Ref, Field(examples=["pro-seat@2025"])]


class AccountCreate(Request):
    name: str = Field(min_length=1, max_length=200)
    external_ref: str | None = Field(default=None, min_length=1, max_length=200)
    attributes: dict[str, Any] = Field(
        default_factory=dict,
        max_length=50,
        json_schema_extra={"propertyNames": {"minLength": 1, "maxLength": 64}},
    )
    plan: PlanRef | None = Field(
        default=None, description="Subscribe the new account to this plan version at once."
    )

    @field_validator("attributes")
    @classmethod
    def _short_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        if any(len(k) > 64 for k in value):
            raise ValueError("attribute names have at most 64 characters")
        # No NUL and no NaN: PostgreSQL's jsonb refuses them (a 500), SQLite turns NaN to null.
        try:
            return service.checked_json_object(
                value,
                field="attributes",
                max_bytes=service.MAX_PREFERENCES_BYTES,
                max_depth=service.MAX_PREFERENCES_DEPTH,
            )
        except InvalidInput as error:
            raise ValueError(f"{error.field}: {error.message}") from None


class AccountPatch(Request):
    """Only the fields given change; at least one is given (said in the schema too)."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    name: str | None = Field(default=None, min_length=1, max_length=200)
    attributes: dict[str, Any] | None = Field(
        default=None,
        description="Merged into the account's: each name given is set to its value, a name"
        " given as null is removed, the others stay (as Stripe treats metadata).",
    )
    status: Literal["active", "suspended"] | None = Field(
        default=None, description="Read by migration rules' eligibility (account_status)."
    )


class SubscriptionPut(Request):
    plan: PlanRef


Name = Annotated[str, Field(pattern=KEY_PATTERN)]
Extra = Annotated[int, Field(strict=True, ge=0, le=MAX_LIMIT)]


class Grants(Request):
    """Features turned on or off, and extra units of quotas, over the plan's."""

    features: dict[Name, Literal["enabled", "disabled"]] = Field(
        default_factory=dict, max_length=service.MAX_GRANT_NAMES
    )
    quotas: dict[Name, Extra] = Field(default_factory=dict, max_length=service.MAX_GRANT_NAMES)


class ObjectPut(Request):
    quota: Name
    name: str = Field(min_length=1, max_length=200)
    units: int = Field(strict=True, ge=0, le=data_objects.MAX_UNITS)
    content_base64: str = Field(
        max_length=(data_objects.MAX_CONTENT_BYTES + 2) // 3 * 4,
        description="The object's bytes, base64 (standard alphabet, padded).",
    )


@router.post("", status_code=201)
async def create_account(body: AccountCreate, actor: Writer, session: Session) -> AccountOut:
    account = await service.create_account(
        session, actor, name=body.name, external_ref=body.external_ref, attributes=body.attributes
    )
    subscription = None
    if body.plan is not None:
        subscription = await service.subscribe(session, actor, account.id, body.plan)
    return AccountOut.of(account, subscription)


@router.get("")
async def list_accounts(
    _actor: Reader,
    session: Session,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = 100,
    after: Annotated[str | None, Query(max_length=36)] = None,
) -> AccountPage:
    """One page of accounts; ``next`` is the ``after`` to pass for the following page."""
    accounts = await service.list_accounts(session, limit=limit, after=after)
    return AccountPage(
        items=[AccountOut.of(a) for a in accounts],
        next=accounts[-1].id if len(accounts) == limit else None,
    )


@router.get("/{account_id}")
async def show_account(account_id: str, _actor: Reader, session: Session) -> AccountDetail:
    account = await service.get_account(session, account_id)
    subscription = await service.get_subscription(session, account.id)
    return AccountDetail.of(account, subscription)


@router.patch("/{account_id}")
async def patch_account(
    account_id: str, body: AccountPatch, actor: Writer, session: Session
) -> AccountDetail:
    """Change the account's name, status or attributes (a legal hold cleared, say). Refused
    (409) while a migration runs on the account."""
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    account = await service.update_account(session, actor, account_id, changes)
    return AccountDetail.of(account, await service.get_subscription(session, account.id))


@router.put("/{account_id}/subscription")
async def put_subscription(
    account_id: str, body: SubscriptionPut, actor: Writer, session: Session
) -> SubscriptionOut:
    return SubscriptionOut.of(await service.subscribe(session, actor, account_id, body.plan))


AddonName = Annotated[str, Path(pattern=KEY_PATTERN)]


@router.put("/{account_id}/addons/{name}")
async def put_addon(
    account_id: str, name: AddonName, body: Grants, actor: Writer, session: Session
) -> AccountDetail:
    """Add or replace an add-on (carried or mapped by migrations as their rules say)."""
    subscription = await service.put_addon(
        session, actor, account_id, name, body.model_dump(include={"features", "quotas"})
    )
    account = await service.get_account(session, account_id)
    return AccountDetail.of(account, subscription)


@router.delete("/{account_id}/addons/{name}")
async def delete_addon(
    account_id: str, name: AddonName, actor: Writer, session: Session
) -> AccountDetail:
    subscription = await service.remove_addon(session, actor, account_id, name)
    account = await service.get_account(session, account_id)
    return AccountDetail.of(account, subscription)


@router.put("/{account_id}/preferences")
async def put_preferences(
    account_id: str,
    actor: Writer,
    session: Session,
    body: Annotated[
        dict[str, Any],
        Body(
            description="Any JSON object (bounded in size and depth; member names have 1 to 64"
            " characters).",
            json_schema_extra={"propertyNames": {"minLength": 1, "maxLength": 64}},
        ),
    ],
) -> AccountDetail:
    """Replace the account's preferences. Migrations carry them unchanged."""
    account = await service.set_preferences(session, actor, account_id, body)
    return AccountDetail.of(account, await service.get_subscription(session, account.id))


@router.post("/{account_id}/objects", status_code=201)
async def put_object(
    account_id: str, body: ObjectPut, actor: Writer, session: Session
) -> ObjectOut:
    """Store a data object counting ``units`` against ``quota`` (a project, a file …), within
    the account's effective quota: 409 ``quota_exceeded`` past it (unless the plan allows
    overage), 409 ``quota_read_only``, 422 ``unknown_quota`` (docs/licensing.md)."""
    try:
        content = base64.b64decode(body.content_base64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("not valid base64", field="content_base64") from exc
    row = await data_objects.put_object(
        session,
        actor,
        account_id,
        quota=body.quota,
        name=body.name,
        units=body.units,
        content=content,
    )
    return ObjectOut.model_validate(row)


@router.get("/{account_id}/objects")
async def list_objects(
    account_id: str,
    _actor: Reader,
    session: Session,
    include_superseded: bool = False,
) -> ObjectList:
    """The account's live objects (``include_superseded``: also the originals a migration keeps
    until it is finalized), oldest first."""
    rows = await data_objects.list_objects(
        session, account_id, include_superseded=include_superseded
    )
    return ObjectList.model_validate({"items": rows})
