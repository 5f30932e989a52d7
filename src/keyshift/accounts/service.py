"""Accounts, subscriptions, add-ons and preferences: the domain operations, the checks on what
an admin sets by hand (attributes, grants, JSON objects) and the account views. Each takes a
session and an actor; the caller owns the transaction, and every change is audited inside it."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.accounts import repository
from keyshift.audit import service as audit
from keyshift.canonical import canonical_json, content_hash
from keyshift.catalog import service as catalog
from keyshift.catalog.entitlements import Entitlements
from keyshift.catalog.manifests import KEY_PATTERN, MAX_LIMIT
from keyshift.context import Actor
from keyshift.db import changes
from keyshift.db.tables import Account, Migration, Subscription
from keyshift.db.types import utcnow
from keyshift.errors import (
    AccountNotFound,
    Conflict,
    InvalidInput,
    MigrationInProgress,
    NotFound,
)
from keyshift.states import IN_FLIGHT


async def create_account(
    session: AsyncSession,
    actor: Actor,
    *,
    name: str,
    external_ref: str | None = None,
    attributes: dict[str, Any] | None = None,
) -> Account:
    if external_ref is not None:
        taken = await session.execute(
            select(Account.id).where(Account.external_ref == external_ref)
        )
        if taken.first() is not None:
            raise Conflict(
                f"an account with external_ref {external_ref!r} exists", field="external_ref"
            )
    account = Account(
        id=str(uuid.uuid4()),
        name=name,
        external_ref=external_ref,
        attributes=checked_attributes(attributes or {}, prefix="attributes."),
    )
    session.add(account)
    await session.flush()
    await audit.record(
        session,
        actor,
        "account.create",
        "account",
        account.id,
        account_id=account.id,
        details={"name": name, "external_ref": external_ref},
    )
    return account


async def get_account(session: AsyncSession, account_id: str) -> Account:
    account = await session.get(Account, account_id)
    if account is None:
        raise AccountNotFound(f"no account {account_id}", field="account_id")
    return account


async def subscribe(
    session: AsyncSession, actor: Actor, account_id: str, plan_ref: str
) -> Subscription:
    """Put the account on a published plan version (first subscription, or a direct change
    outside any migration run; migrations use the migration engine instead)."""
    account = await get_account(session, account_id)
    _, plan_hash = await catalog.get_plan(session, plan_ref)
    key, version = plan_ref.split("@", 1)
    current = await session.get(Subscription, account.id, with_for_update=True)
    await ensure_not_migrating(session, account.id)
    previous = f"{current.plan_key}@{current.plan_version}" if current else None
    if current is None:
        current = Subscription(
            account_id=account.id, plan_key=key, plan_version=version, plan_hash=plan_hash
        )
        session.add(current)
    else:
        current.plan_key, current.plan_version, current.plan_hash = key, version, plan_hash
        current.entitlements_version += 1
        # Every validation of this account's licenses must see the new plan from the commit on.
        await changes.announce(session, account_id=account.id)
    await session.flush()
    await audit.record(
        session,
        actor,
        "account.subscribe",
        "account",
        account.id,
        account_id=account.id,
        details={"plan": plan_ref, "plan_hash": plan_hash, "previous": previous},
    )
    return current


MAX_PAGE = 500


async def list_accounts(
    session: AsyncSession, *, limit: int = 100, after: str | None = None
) -> list[Account]:
    """One page of accounts in id order; pass the last id seen as ``after`` for the next."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}", field="limit")
    return await repository.list_accounts(session, limit=limit, after=after)


async def get_subscription(session: AsyncSession, account_id: str) -> Subscription | None:
    return await session.get(Subscription, account_id)


async def entitlements_of(session: AsyncSession, account_id: str) -> Entitlements:
    """The entitlements of the account's current plan version (what its licenses carry)."""
    subscription = await get_subscription(session, account_id)
    if subscription is None:
        raise Conflict("the account has no plan; subscribe it first", field="account_id")
    ref = f"{subscription.plan_key}@{subscription.plan_version}"
    return await catalog.entitlements_for(session, ref, subscription.plan_hash)


async def ensure_not_migrating(session: AsyncSession, account_id: str) -> None:
    """Refuse an admin change to an account while a migration runs on it. Checked under the
    license's (or subscription's) row lock, which the snapshot step also takes: a change
    lands before the snapshot or is refused after it, never in between."""
    holder = (
        await session.execute(
            select(Migration.id, Migration.state).where(
                Migration.lock_account_id == account_id, Migration.state.in_(IN_FLIGHT)
            )
        )
    ).first()
    if holder is not None:
        raise MigrationInProgress(
            f"account {account_id} is being migrated (migration {holder.id}, {holder.state});"
            " try again when it completes",
            field="account_id",
            migration_id=holder.id,
        )


# -- what migrations carry: add-ons, preferences ---------------------------------------------
#
# Each change takes the row lock the migration's snapshot step also takes (the subscription)
# and then refuses while a migration holds the account: a change lands before the snapshot or
# is refused after it.


#: Hand-set values travel in every validation response: keep them small.
MAX_GRANT_NAMES = 100


MAX_ADDONS = 50


MAX_PREFERENCES_BYTES = 16 * 1024


MAX_PREFERENCES_DEPTH = 8


FEATURE_MODES = ("enabled", "disabled")


_NAME = re.compile(KEY_PATTERN)


def checked_grants(value: Any, *, field: str) -> dict[str, dict[str, Any]]:
    """``{"features": {name: "enabled"|"disabled"}, "quotas": {name: extra units}}`` checked
    and normalised (the shape ``catalog.entitlements.with_overrides`` reads)."""
    if not isinstance(value, Mapping):
        raise InvalidInput("must be an object with features and quotas", field=field)
    unknown = sorted(set(value) - {"features", "quotas"})
    if unknown:
        raise InvalidInput("unknown field", field=f"{field}.{unknown[0]}")
    out: dict[str, dict[str, Any]] = {"features": {}, "quotas": {}}
    for kind in ("features", "quotas"):
        entries = value.get(kind) or {}
        where = f"{field}.{kind}"
        if not isinstance(entries, Mapping):
            raise InvalidInput("must be an object", field=where)
        if len(entries) > MAX_GRANT_NAMES:
            raise InvalidInput(f"at most {MAX_GRANT_NAMES} names", field=where)
        for name, grant in entries.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise InvalidInput(
                    "a name is 1-64 characters of a-z, 0-9, '-' or '_', starting with a letter",
                    field=f"{where}.{name}",
                )
            if kind == "features" and grant not in FEATURE_MODES:
                raise InvalidInput("must be 'enabled' or 'disabled'", field=f"{where}.{name}")
            if kind == "quotas" and (
                isinstance(grant, bool) or not isinstance(grant, int) or not 0 <= grant <= MAX_LIMIT
            ):
                raise InvalidInput(f"an integer from 0 to {MAX_LIMIT}", field=f"{where}.{name}")
            out[kind][name] = grant
    return out


async def lock_for_change(session: AsyncSession, account_id: str) -> Subscription | None:
    """Before an admin change to an account's state: take the subscription's row lock (the
    snapshot step takes it too) and refuse if a migration holds the account."""
    await get_account(session, account_id)
    subscription = await session.get(
        Subscription, account_id, with_for_update=True, populate_existing=True
    )
    await ensure_not_migrating(session, account_id)
    return subscription


async def _account_changed(
    session: AsyncSession,
    actor: Actor,
    subscription: Subscription,
    action: str,
    details: dict[str, Any],
) -> Subscription:
    """Bump the entitlements version validation caches compare, drop the account's cached
    licenses at commit, and audit."""
    subscription.entitlements_version += 1
    subscription.updated_at = utcnow()
    await session.flush()
    await changes.announce(session, account_id=subscription.account_id)
    await audit.record(
        session,
        actor,
        action,
        "account",
        subscription.account_id,
        account_id=subscription.account_id,
        details={**details, "entitlements_version": subscription.entitlements_version},
    )
    return subscription


def _subscribed(subscription: Subscription | None) -> Subscription:
    if subscription is None:
        raise Conflict("the account has no plan; subscribe it first", field="account_id")
    return subscription


def _addon_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(
            "an add-on name is 1-64 characters of a-z, 0-9, '-' or '_', starting with a letter",
            field="name",
        )
    return name


async def put_addon(
    session: AsyncSession,
    actor: Actor,
    account_id: str,
    name: str,
    grants: Mapping[str, Any],
) -> Subscription:
    """Add (or replace) an add-on on the account's subscription: features it turns on or off
    and extra quota units, over the plan's (``Subscription.overrides["addons"]``)."""
    _addon_name(name)
    addon = checked_grants(grants, field="body")
    subscription = _subscribed(await lock_for_change(session, account_id))
    overrides = dict(subscription.overrides or {})
    addons = dict(overrides.get("addons") or {})
    if name not in addons and len(addons) >= MAX_ADDONS:
        raise InvalidInput(f"an account has at most {MAX_ADDONS} add-ons", field="name")
    previous = addons.get(name)
    addons[name] = addon
    subscription.overrides = {**overrides, "addons": addons}
    return await _account_changed(
        session,
        actor,
        subscription,
        "account.addon.put",
        {"addon": name, "grants": addon, "previous": previous},
    )


async def remove_addon(
    session: AsyncSession, actor: Actor, account_id: str, name: str
) -> Subscription:
    """Take an add-on off the account's subscription."""
    subscription = _subscribed(await lock_for_change(session, account_id))
    overrides = dict(subscription.overrides or {})
    addons = dict(overrides.get("addons") or {})
    if name not in addons:
        raise NotFound(f"account {account_id} has no add-on {name!r}", field="name")
    removed = addons.pop(name)
    if addons:
        overrides["addons"] = addons
    else:
        overrides.pop("addons", None)
    subscription.overrides = overrides
    return await _account_changed(
        session, actor, subscription, "account.addon.remove", {"addon": name, "removed": removed}
    )


def checked_json_object(
    value: Any, *, field: str, prefix: str = "", max_bytes: int, max_depth: int
) -> dict[str, Any]:
    """A JSON object of bounded size and depth that both databases store as it is (no NUL
    characters, which PostgreSQL's jsonb refuses; no NaN or infinities, which JSON lacks and
    SQLite would store as null). Problems name ``prefix`` + the path inside (``field`` for the
    whole object)."""
    if not isinstance(value, Mapping):
        raise InvalidInput("must be a JSON object", field=field)

    def walk(item: Any, path: str, depth: int) -> None:
        where = path.rstrip(".") or field
        if depth > max_depth:
            raise InvalidInput(f"nested deeper than {max_depth} levels", field=where)
        if isinstance(item, Mapping):
            for key, child in item.items():
                if not isinstance(key, str) or not 1 <= len(key) <= 64 or "\x00" in key:
                    raise InvalidInput("a name has 1 to 64 characters", field=f"{path}{key}")
                walk(child, f"{path}{key}.", depth + 1)
        elif isinstance(item, list):
            for index, child in enumerate(item):
                walk(child, f"{path}{index}.", depth + 1)
        elif isinstance(item, str):
            if "\x00" in item:
                raise InvalidInput("text may not contain NUL", field=where)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidInput("numbers must be finite", field=where)
        elif not (item is None or isinstance(item, bool | int)):
            raise InvalidInput("not a JSON value", field=where)

    walk(value, prefix, 1)
    size = len(canonical_json(dict(value)))
    if size > max_bytes:
        raise InvalidInput(f"{size} bytes as JSON; at most {max_bytes}", field=field)
    return dict(value)


def checked_preferences(value: Any) -> dict[str, Any]:
    return checked_json_object(
        value,
        field="preferences",
        max_bytes=MAX_PREFERENCES_BYTES,
        max_depth=MAX_PREFERENCES_DEPTH,
    )


async def set_preferences(
    session: AsyncSession, actor: Actor, account_id: str, preferences: Mapping[str, Any]
) -> Account:
    """Replace the account's preferences (the vendor's app reads them; migrations carry them
    unchanged). They are not part of what a license validates to, so no cache is touched."""
    wanted = checked_preferences(preferences)
    await lock_for_change(session, account_id)
    account = await session.get(Account, account_id, with_for_update=True, populate_existing=True)
    assert account is not None  # lock_for_change found it
    previous_hash = content_hash(account.preferences or {})
    account.preferences = wanted
    await session.flush()
    await audit.record(
        session,
        actor,
        "account.preferences",
        "account",
        account.id,
        account_id=account.id,
        details={
            "keys": sorted(wanted)[:50],
            "hash": content_hash(wanted),
            "previous_hash": previous_hash,
        },
    )
    return account


MAX_ATTRIBUTES = 50


ACCOUNT_STATUSES = ("active", "suspended")


_ACCOUNT_FIELDS = ("name", "attributes", "status")


def checked_attributes(value: Any, *, prefix: str = "") -> dict[str, Any]:
    """An account's attributes, as create and update accept them: a JSON object of at most
    50 names of 1-64 characters, bounded in size and depth like preferences."""
    attributes = checked_json_object(
        value,
        field="attributes",
        prefix=prefix,
        max_bytes=MAX_PREFERENCES_BYTES,
        max_depth=MAX_PREFERENCES_DEPTH,
    )
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidInput(
            f"an account has at most {MAX_ATTRIBUTES} attributes", field="attributes"
        )
    return attributes


def merge_attributes(current: Mapping[str, Any], patch: Any) -> dict[str, Any]:
    """``patch`` laid over ``current`` as Stripe treats metadata: each name given is set to
    its new value, a name given as null is removed, names not given stay. Values are replaced
    whole (a nested object is not merged)."""
    checked_json_object(
        patch,
        field="attributes",
        prefix="attributes.",
        max_bytes=MAX_PREFERENCES_BYTES,
        max_depth=MAX_PREFERENCES_DEPTH,
    )
    merged = dict(current)
    for name, value in patch.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return checked_attributes(merged, prefix="attributes.")


def _account_changes(changes: Mapping[str, Any]) -> None:
    unknown = sorted(set(changes) - set(_ACCOUNT_FIELDS))
    if unknown:
        raise InvalidInput("unknown field", field=unknown[0])
    if not changes:
        raise InvalidInput("give name, attributes and/or status to change", field="body")
    name = changes.get("name", "")
    if "name" in changes and (
        not isinstance(name, str) or not 1 <= len(name) <= 200 or "\x00" in name
    ):
        raise InvalidInput("a name has 1 to 200 characters", field="name")
    if "status" in changes and changes["status"] not in ACCOUNT_STATUSES:
        raise InvalidInput(f"status is one of {', '.join(ACCOUNT_STATUSES)}", field="status")
    if "attributes" in changes and not isinstance(changes["attributes"], Mapping):
        raise InvalidInput("must be a JSON object (null removes one name)", field="attributes")


async def update_account(
    session: AsyncSession, actor: Actor, account_id: str, changes: Mapping[str, Any]
) -> Account:
    """Change an account's ``name``, ``status`` or ``attributes``; only the fields given
    change, and ``attributes`` merges (``merge_attributes``). Refused while a migration runs
    on the account, which reads status and attributes to decide eligibility."""
    _account_changes(changes)
    await lock_for_change(session, account_id)
    account = await session.get(Account, account_id, with_for_update=True, populate_existing=True)
    assert account is not None  # lock_for_change found it
    details: dict[str, Any] = {}
    if "attributes" in changes:
        before = dict(account.attributes or {})
        after = merge_attributes(before, changes["attributes"])
        details["attributes"] = {
            "set": sorted(k for k, v in after.items() if k not in before or before[k] != v),
            "removed": sorted(set(before) - set(after)),
        }
        account.attributes = after
    for name in ("name", "status"):
        if name in changes:
            details[name] = {"from": getattr(account, name), "to": changes[name]}
            setattr(account, name, changes[name])
    await session.flush()
    await audit.record(
        session,
        actor,
        "account.update",
        "account",
        account.id,
        account_id=account.id,
        details=details,
    )
    return account
