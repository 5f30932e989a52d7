"""Accounts, subscriptions and license keys: the domain operations. Each takes a session and
an actor; the caller owns the transaction, and every change is audited inside it."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift import dates
from keyshift.audit import service as audit
from keyshift.canonical import canonical_json, content_hash
from keyshift.catalog import service as catalog
from keyshift.catalog.durations import Duration
from keyshift.catalog.entitlements import Entitlements
from keyshift.catalog.manifests import KEY_PATTERN, MAX_LIMIT
from keyshift.context import Actor
from keyshift.db import changes
from keyshift.db.tables import Account, License, Migration, Subscription
from keyshift.db.types import utcnow
from keyshift.errors import (
    AccountNotFound,
    Conflict,
    InvalidInput,
    LicenseNotActive,
    LicenseNotFound,
    MalformedKey,
    MigrationInProgress,
    NotFound,
)
from keyshift.licensing import keys, repository
from keyshift.security.keyring import Keyring, Sealed


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


@dataclass(frozen=True)
class IssuedLicense:
    license: License
    key: str  # the plaintext key; shown once at issue, recoverable only by decrypting


def default_expiry(term: str, start: datetime) -> datetime | None:
    return None if term == "perpetual" else Duration.parse(term).after(start)


async def issue_license(
    session: AsyncSession,
    actor: Actor,
    keyring: Keyring,
    *,
    account_id: str,
    expires_at: datetime | None = None,
    use_plan_term: bool = True,
    max_activations_override: int | None = None,
) -> IssuedLicense:
    """Issue a new key for a subscribed account. Expiry defaults to the plan's term from now."""
    now = utcnow()
    if expires_at is not None:
        _check_future(expires_at, now)
    if max_activations_override is not None and not 1 <= max_activations_override <= 100_000:
        raise InvalidInput("max_activations must be between 1 and 100000", field="max_activations")
    account = await get_account(session, account_id)
    subscription = await session.get(Subscription, account.id)
    if subscription is None:
        raise Conflict("the account has no plan; subscribe it first", field="account_id")
    plan, _ = await catalog.get_plan(
        session, f"{subscription.plan_key}@{subscription.plan_version}"
    )
    if expires_at is None and use_plan_term:
        expires_at = default_expiry(plan.term.length, now)
    license_id = str(uuid.uuid4())
    plaintext = keys.generate()
    sealed = keyring.seal(plaintext.encode(), context=license_id.encode())
    row = License(
        id=license_id,
        account_id=account.id,
        key_lookup=keyring.lookup_hash(plaintext),
        key_ciphertext=sealed.ciphertext,
        key_kid=sealed.kid,
        key_hint=keys.hint(plaintext),
        expires_at=expires_at,
        max_activations_override=max_activations_override,
        overrides={},
    )
    session.add(row)
    await session.flush()
    await audit.record(
        session,
        actor,
        "license.issue",
        "license",
        row.id,
        account_id=account.id,
        details={
            "expires_at": expires_at.isoformat() if expires_at else None,
            "key_hint": row.key_hint,
            "max_activations_override": max_activations_override,
        },
    )
    return IssuedLicense(row, plaintext)


def lookup_for(keyring: Keyring, text: str) -> str:
    """Normalise a presented key and return its lookup hash (MalformedKey if it cannot be one)."""
    try:
        return keyring.lookup_hash(keys.normalise(text))
    except keys.KeyFormatError as exc:
        raise MalformedKey(str(exc), field="key") from exc


async def find_by_key(session: AsyncSession, keyring: Keyring, text: str) -> License | None:
    lookup = lookup_for(keyring, text)
    return (
        await session.execute(select(License).where(License.key_lookup == lookup))
    ).scalar_one_or_none()


def reveal_key(keyring: Keyring, row: License) -> str:
    """Decrypt a stored key (for re-sending it to its owner); callers audit the reveal."""
    return keyring.open(Sealed(row.key_kid, row.key_ciphertext), context=row.id.encode()).decode()


# -- reading ---------------------------------------------------------------------------------

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


async def get_license(session: AsyncSession, license_id: str) -> License:
    row = await session.get(License, license_id)
    if row is None:
        raise LicenseNotFound(f"no license {license_id}", field="license_id")
    return row


async def list_licenses(session: AsyncSession, account_id: str) -> list[License]:
    await get_account(session, account_id)
    return await repository.list_licenses(session, account_id)


async def entitlements_of(session: AsyncSession, account_id: str) -> Entitlements:
    """The entitlements of the account's current plan version (what its licenses carry)."""
    subscription = await get_subscription(session, account_id)
    if subscription is None:
        raise Conflict("the account has no plan; subscribe it first", field="account_id")
    ref = f"{subscription.plan_key}@{subscription.plan_version}"
    return await catalog.entitlements_for(session, ref, subscription.plan_hash)


Standing = Literal["active", "grace", "expired", "suspended", "revoked"]


class _Dated(Protocol):
    """What ``standing`` reads of a license (a ``License``, or a row selected from one)."""

    @property
    def status(self) -> str: ...

    @property
    def expires_at(self) -> datetime | None: ...


def standing(row: _Dated, grace_seconds: int, now: datetime) -> Standing:
    """Where a license stands at ``now``: its stored status, or for an active one whether it
    has expired, counting the plan's grace period after ``expires_at``."""
    if row.status == "suspended":
        return "suspended"
    if row.status == "revoked":
        return "revoked"
    if row.expires_at is None or now < row.expires_at:
        return "active"
    if now < dates.plus(row.expires_at, timedelta(seconds=grace_seconds)):
        return "grace"
    return "expired"


def is_usable(state: Standing) -> bool:
    """Whether a license in this standing may activate machines and validate."""
    return state in ("active", "grace")


# -- lifecycle -------------------------------------------------------------------------------


async def _locked(session: AsyncSession, license_id: str) -> License:
    row = await repository.lock_license(session, license_id)
    if row is None:
        raise LicenseNotFound(f"no license {license_id}", field="license_id")
    await ensure_not_migrating(session, row.account_id)
    return row


#: Migration states in which the account's licenses and plan belong to the migration.
_MIGRATING = ("locked", "snapshotted", "prepared", "cutover", "verified")


async def ensure_not_migrating(session: AsyncSession, account_id: str) -> None:
    """Refuse an admin change to an account while a migration runs on it. Checked under the
    license's (or subscription's) row lock, which the snapshot step also takes: a change
    lands before the snapshot or is refused after it, never in between."""
    holder = (
        await session.execute(
            select(Migration.id, Migration.state).where(
                Migration.lock_account_id == account_id, Migration.state.in_(_MIGRATING)
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


async def _changed(
    session: AsyncSession,
    actor: Actor,
    row: License,
    action: str,
    details: dict[str, Any],
) -> License:
    """Bump the version the validation cache keys on, and audit, in the caller's transaction."""
    row.version += 1
    row.updated_at = utcnow()
    await session.flush()
    await changes.announce(session, lookup=row.key_lookup)
    await audit.record(
        session,
        actor,
        action,
        "license",
        row.id,
        account_id=row.account_id,
        details={**details, "version": row.version},
    )
    return row


class StatusChange(Protocol):
    """The shape of ``suspend_license``, ``reinstate_license`` and ``revoke_license``."""

    async def __call__(
        self, session: AsyncSession, actor: Actor, license_id: str, *, reason: str | None = None
    ) -> License: ...


async def suspend_license(
    session: AsyncSession, actor: Actor, license_id: str, *, reason: str | None = None
) -> License:
    """Stop an active license from validating or activating; ``reinstate_license`` undoes it.
    Its activations are kept."""
    row = await _locked(session, license_id)
    if row.status == "revoked":
        raise LicenseNotActive("the license is revoked; a revoked license cannot be suspended")
    if row.status == "suspended":
        raise Conflict("the license is already suspended", field="status")
    row.status = "suspended"
    return await _changed(session, actor, row, "license.suspend", {"reason": reason})


async def reinstate_license(
    session: AsyncSession, actor: Actor, license_id: str, *, reason: str | None = None
) -> License:
    row = await _locked(session, license_id)
    if row.status == "revoked":
        raise LicenseNotActive("the license is revoked; revocation is final")
    if row.status != "suspended":
        raise Conflict("the license is not suspended", field="status")
    row.status = "active"
    return await _changed(session, actor, row, "license.reinstate", {"reason": reason})


async def revoke_license(
    session: AsyncSession, actor: Actor, license_id: str, *, reason: str | None = None
) -> License:
    """End a license for good: it never validates again and its seats are released."""
    row = await _locked(session, license_id)
    if row.status == "revoked":
        raise Conflict("the license is already revoked", field="status")
    released = await repository.list_activations(session, row.id)
    await repository.delete_activations(session, [a.id for a in released])
    row.status = "revoked"
    return await _changed(
        session,
        actor,
        row,
        "license.revoke",
        {"reason": reason, "released_activations": [a.id for a in released]},
    )


def _check_future(when: datetime, now: datetime) -> None:
    dates.checked(when, field="expires_at")
    if when <= now:
        raise InvalidInput("expires_at must be in the future", field="expires_at")


def renewed_expiry(current: datetime | None, term: str, now: datetime) -> datetime:
    """The plan term added to whichever is later, now or the current expiry: renewing early
    loses nothing, renewing a lapsed license starts from today."""
    if term == "perpetual":
        raise InvalidInput(
            "the plan's term is perpetual; give an explicit expires_at to renew to",
            field="expires_at",
        )
    start = now if current is None or current < now else current
    try:
        return dates.checked(Duration.parse(term).after(start), field="expires_at")
    except ValueError:  # a stored expiry from before dates were bounded, near the calendar's end
        raise InvalidInput(
            f"renewing by {term} would pass the date range; give expires_at", field="expires_at"
        ) from None


async def renew_license(
    session: AsyncSession,
    actor: Actor,
    license_id: str,
    *,
    until: datetime | None = None,
) -> License:
    """Extend the expiry by the plan's term (or to ``until``). An expired license becomes
    valid again; a suspended one stays suspended; a revoked one cannot be renewed."""
    row = await _locked(session, license_id)
    if row.status == "revoked":
        raise LicenseNotActive("the license is revoked; issue a new one instead")
    now = utcnow()
    if until is not None:
        _check_future(until, now)
        new_expiry = until
    else:
        if row.expires_at is None:
            raise Conflict(
                "the license never expires; there is nothing to renew", field="expires_at"
            )
        plan = await entitlements_of(session, row.account_id)
        new_expiry = renewed_expiry(row.expires_at, plan.term, now)
    previous = row.expires_at
    row.expires_at = new_expiry
    return await _changed(
        session,
        actor,
        row,
        "license.renew",
        {
            "previous_expires_at": previous.isoformat() if previous else None,
            "expires_at": new_expiry.isoformat(),
        },
    )


async def reveal(session: AsyncSession, actor: Actor, keyring: Keyring, license_id: str) -> str:
    """Decrypt a license's key for its owner; the reveal itself is audited."""
    row = await get_license(session, license_id)
    plaintext = reveal_key(keyring, row)
    await audit.record(
        session,
        actor,
        "license.reveal",
        "license",
        row.id,
        account_id=row.account_id,
        details={"key_hint": row.key_hint},
    )
    return plaintext


# -- public forms (shared by the API and the CLI) --------------------------------------------


def subscription_view(subscription: Subscription | None) -> dict[str, Any] | None:
    if subscription is None:
        return None
    return {
        "plan": f"{subscription.plan_key}@{subscription.plan_version}",
        "plan_hash": subscription.plan_hash,
        "entitlements_version": subscription.entitlements_version,
        "started_at": subscription.started_at,
    }


def account_view(account: Account, subscription: Subscription | None = None) -> dict[str, Any]:
    return {
        "id": account.id,
        "name": account.name,
        "external_ref": account.external_ref,
        "status": account.status,
        "attributes": account.attributes,
        "created_at": account.created_at,
        "subscription": subscription_view(subscription),
    }


def license_view(row: License, state: Standing | None = None) -> dict[str, Any]:
    """A license without its key: only the hint ever leaves the server after issue."""
    return {
        "id": row.id,
        "account_id": row.account_id,
        "key_hint": row.key_hint,
        "status": row.status,
        "standing": state,
        "expires_at": row.expires_at,
        "max_activations_override": row.max_activations_override,
        "version": row.version,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


async def describe_license(session: AsyncSession, row: License) -> dict[str, Any]:
    """``license_view`` with the standing computed from the account's plan grace period."""
    subscription = await get_subscription(session, row.account_id)
    grace = 0
    if subscription is not None:
        plan = await catalog.entitlements_for(
            session, f"{subscription.plan_key}@{subscription.plan_version}", subscription.plan_hash
        )
        grace = plan.grace_seconds
    return license_view(row, standing(row, grace, utcnow()))


# -- what migrations carry: hand-set license overrides, add-ons, preferences ----------------
#
# Each change takes the row lock the migration's snapshot step also takes (the license, or the
# subscription) and then refuses while a migration holds the account: a change lands before
# the snapshot or is refused after it.

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


async def set_license_overrides(
    session: AsyncSession, actor: Actor, license_id: str, changes: Mapping[str, Any]
) -> License:
    """Change a license's hand-set values; only the keys given change.
    ``max_activations_override``: a cap over the plan's (None: the plan's cap).
    ``overrides``: replaces the hand-set features and extra quotas (None or ``{}``: none)."""
    unknown = sorted(set(changes) - {"max_activations_override", "overrides"})
    if unknown:
        raise InvalidInput("unknown field", field=unknown[0])
    if not changes:
        raise InvalidInput("give max_activations_override and/or overrides to change", field="body")
    cap = changes.get("max_activations_override")
    if cap is not None and (
        isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= 100_000
    ):
        raise InvalidInput(
            "max_activations_override is an integer from 1 to 100000 (or null)",
            field="max_activations_override",
        )
    grants = None
    if "overrides" in changes:
        given = changes["overrides"]
        grants = {} if given is None else checked_grants(given, field="overrides")
        grants = {kind: names for kind, names in grants.items() if names}
    row = await _locked(session, license_id)
    if row.status == "revoked":
        raise LicenseNotActive("the license is revoked; its overrides no longer matter")
    before = {"max_activations_override": row.max_activations_override, "overrides": row.overrides}
    if "max_activations_override" in changes:
        row.max_activations_override = cap
    if grants is not None:
        row.overrides = grants
    after = {"max_activations_override": row.max_activations_override, "overrides": row.overrides}
    return await _changed(
        session, actor, row, "license.overrides", {"before": before, "after": after}
    )


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


def account_detail_view(
    account: Account, subscription: Subscription | None = None
) -> dict[str, Any]:
    """``account_view`` with what an admin sets by hand: preferences and the subscription's
    overrides (add-ons, read-only quotas, a downgrade's grace)."""
    out = account_view(account, subscription)
    out["preferences"] = account.preferences or {}
    if out["subscription"] is not None and subscription is not None:
        out["subscription"]["overrides"] = subscription.overrides or {}
    return out
