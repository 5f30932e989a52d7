"""Licenses: issue, find, standing, suspend/reinstate/revoke/renew, reveal, hand-set overrides
and the license views. Accounts, subscriptions, add-ons and preferences are in
``keyshift.accounts.service``. Each operation takes a session and an actor; the caller owns the
transaction, and every change is audited inside it."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift import dates
from keyshift.accounts import service as accounts
from keyshift.audit import service as audit
from keyshift.catalog import service as catalog
from keyshift.catalog.durations import Duration
from keyshift.context import Actor
from keyshift.db import changes
from keyshift.db.tables import License, Subscription
from keyshift.db.types import utcnow
from keyshift.errors import (
    Conflict,
    InvalidInput,
    LicenseNotActive,
    LicenseNotFound,
    MalformedKey,
)
from keyshift.licensing import keys, repository
from keyshift.security.keyring import Keyring, Sealed


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
    account = await accounts.get_account(session, account_id)
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


async def get_license(session: AsyncSession, license_id: str) -> License:
    row = await session.get(License, license_id)
    if row is None:
        raise LicenseNotFound(f"no license {license_id}", field="license_id")
    return row


async def list_licenses(session: AsyncSession, account_id: str) -> list[License]:
    await accounts.get_account(session, account_id)
    return await repository.list_licenses(session, account_id)


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
    await accounts.ensure_not_migrating(session, row.account_id)
    return row


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
        plan = await accounts.entitlements_of(session, row.account_id)
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


async def license_standing(session: AsyncSession, row: License) -> Standing:
    """The license's standing now, with the grace period of the account's plan."""
    subscription = await accounts.get_subscription(session, row.account_id)
    grace = 0
    if subscription is not None:
        plan = await catalog.entitlements_for(
            session, f"{subscription.plan_key}@{subscription.plan_version}", subscription.plan_hash
        )
        grace = plan.grace_seconds
    return standing(row, grace, utcnow())


# -- what migrations carry: hand-set license overrides ----------------------------------------
#
# Each change takes the row lock the migration's snapshot step also takes (the license, or the
# subscription) and then refuses while a migration holds the account: a change lands before
# the snapshot or is refused after it.


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
        grants = {} if given is None else accounts.checked_grants(given, field="overrides")
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
