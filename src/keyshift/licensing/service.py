"""Accounts, subscriptions and license keys: the domain operations. Each takes a session and
an actor; the caller owns the transaction, and every change is audited inside it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit import service as audit
from keyshift.catalog import service as catalog
from keyshift.catalog.durations import Duration
from keyshift.context import Actor
from keyshift.db.tables import Account, License, Subscription
from keyshift.db.types import utcnow
from keyshift.errors import AccountNotFound, Conflict, MalformedKey
from keyshift.licensing import keys
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
        id=str(uuid.uuid4()), name=name, external_ref=external_ref, attributes=attributes or {}
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
    previous = f"{current.plan_key}@{current.plan_version}" if current else None
    if current is None:
        current = Subscription(
            account_id=account.id, plan_key=key, plan_version=version, plan_hash=plan_hash
        )
        session.add(current)
    else:
        current.plan_key, current.plan_version, current.plan_hash = key, version, plan_hash
        current.entitlements_version += 1
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
    account = await get_account(session, account_id)
    subscription = await session.get(Subscription, account.id)
    if subscription is None:
        raise Conflict("the account has no plan; subscribe it first", field="account_id")
    plan, _ = await catalog.get_plan(
        session, f"{subscription.plan_key}@{subscription.plan_version}"
    )
    now = utcnow()
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
