"""Activations: machines bound to a license, within the plan's seat cap.

Node-locked plans bind a seat to a fingerprint until it is deactivated. Floating plans lend a
seat as a lease that heartbeats extend; a lapsed lease stops counting at once and its row is
reclaimed by the next activation that needs a seat. The cap holds under concurrency because
every change takes the license row lock (``SELECT … FOR UPDATE``) before it counts.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.accounts import service as accounts
from keyshift.audit import service as audit
from keyshift.catalog.entitlements import Entitlements
from keyshift.context import Actor
from keyshift.db import changes
from keyshift.db.tables import Activation, License
from keyshift.db.types import utcnow
from keyshift.errors import (
    ActivationLimitReached,
    ActivationNotFound,
    InvalidInput,
    LicenseNotActive,
    LicenseNotFound,
)
from keyshift.licensing import repository, service
from keyshift.security.keyring import Keyring

MAX_FINGERPRINT = 255
MAX_LABEL = 200


@dataclass(frozen=True)
class Activated:
    activation: Activation
    created: bool  # False: this fingerprint already held a seat (idempotent re-activation)


def check_fingerprint(fingerprint: str) -> str:
    """1 to 255 printable characters; anything else is not a machine fingerprint."""
    if not 1 <= len(fingerprint) <= MAX_FINGERPRINT:
        raise InvalidInput(
            f"a fingerprint has 1 to {MAX_FINGERPRINT} characters, got {len(fingerprint)}",
            field="fingerprint",
        )
    if not fingerprint.isprintable():
        raise InvalidInput("a fingerprint must be printable characters", field="fingerprint")
    return fingerprint


def _check_label(label: str | None) -> str | None:
    if label is not None and (len(label) > MAX_LABEL or not label.isprintable()):
        raise InvalidInput(f"a label has at most {MAX_LABEL} printable characters", field="label")
    return label


def seat_cap(row: License, plan: Entitlements) -> int | None:
    """The license's own override, else the plan's cap; None means uncapped (usage plans)."""
    return row.max_activations_override or plan.max_activations


def _take_plan_terms(activation: Activation, plan: Entitlements, now: datetime) -> None:
    """Give a machine that is here now the current plan's mode and, on a floating plan, a
    fresh lease: whatever plan it was activated under, it holds its seat on today's terms
    (never a ``floating`` row without a lease, nor a lease on a node-locked plan)."""
    activation.mode = plan.machine_mode
    activation.lease_expires_at = plan.lease_until(now)
    activation.last_seen_at = now


async def _resolve(session: AsyncSession, keyring: Keyring, key_or_license: str | License) -> str:
    if isinstance(key_or_license, License):
        return key_or_license.id
    row = await service.find_by_key(session, keyring, key_or_license)
    if row is None:
        raise LicenseNotFound("no license has this key", field="key")
    return row.id


async def _lock_usable(
    session: AsyncSession, license_id: str, now: datetime
) -> tuple[License, Entitlements]:
    """Lock the license row, then check it may hold seats (active, or expired but in grace)."""
    row = await repository.lock_license(session, license_id)
    if row is None:
        raise LicenseNotFound(f"no license {license_id}", field="key")
    plan = await accounts.entitlements_of(session, row.account_id)
    state = service.standing(row, plan.grace_seconds, now)
    if not service.is_usable(state):
        raise LicenseNotActive(f"the license is {state}; it cannot activate machines")
    return row, plan


async def _reclaim_lapsed(
    session: AsyncSession, actor: Actor, row: License, now: datetime, keep: str | None
) -> None:
    """Delete this license's lapsed leases (their seats are already free) and audit it."""
    lapsed = await repository.expired_leases(session, row.id, now, keep=keep)
    if not lapsed:
        return
    await repository.delete_activations(session, [a.id for a in lapsed])
    await changes.announce(session, lookup=row.key_lookup)
    await audit.record_many(
        session,
        actor,
        [
            audit.EventIn(
                "activation.reclaim",
                "activation",
                a.id,
                account_id=row.account_id,
                details={"license_id": row.id, "fingerprint": a.fingerprint},
            )
            for a in lapsed
        ],
    )


async def activate(
    session: AsyncSession,
    actor: Actor,
    keyring: Keyring,
    key_or_license: str | License,
    fingerprint: str,
    label: str | None = None,
) -> Activated:
    """Give ``fingerprint`` a seat on the license, or ``ActivationLimitReached``.

    Re-activating a fingerprint that holds a seat returns that activation, on the current
    plan's terms (a floating plan gives it a fresh lease), and takes no extra seat.
    """
    check_fingerprint(fingerprint)
    _check_label(label)
    license_id = await _resolve(session, keyring, key_or_license)
    now = utcnow()
    row, plan = await _lock_usable(session, license_id, now)

    existing = await repository.find_activation(session, row.id, fingerprint)
    if existing is not None and (
        existing.lease_expires_at is None or existing.lease_expires_at > now
    ):
        _take_plan_terms(existing, plan, now)
        await session.flush()
        await changes.announce(session, lookup=row.key_lookup)
        return Activated(existing, created=False)

    await _reclaim_lapsed(session, actor, row, now, keep=existing.id if existing else None)
    cap = seat_cap(row, plan)
    in_use = await repository.count_live_activations(session, row.id, now)
    if cap is not None and in_use >= cap:
        raise ActivationLimitReached(
            f"all {cap} seat(s) of this license are in use; deactivate a machine first",
            field="fingerprint",
            max_activations=cap,
        )

    if existing is not None:
        # This fingerprint's own lease had lapsed and a seat is free: take it back, same id.
        _take_plan_terms(existing, plan, now)
        existing.label = label or existing.label
        activation = existing
    else:
        activation = Activation(
            id=str(uuid.uuid4()),
            account_id=row.account_id,
            license_id=row.id,
            fingerprint=fingerprint,
            mode=plan.machine_mode,
            lease_expires_at=plan.lease_until(now),
            last_seen_at=now,
            label=label,
            created_at=now,
        )
        session.add(activation)
    await session.flush()
    await changes.announce(session, lookup=row.key_lookup)
    await audit.record(
        session,
        actor,
        "activation.create",
        "activation",
        activation.id,
        account_id=row.account_id,
        details={
            "license_id": row.id,
            "fingerprint": fingerprint,
            "mode": activation.mode,
            "lease_expires_at": _iso(activation.lease_expires_at),
            "seats_in_use": in_use + 1,
            "max_activations": cap,
        },
    )
    return Activated(activation, created=True)


async def heartbeat(
    session: AsyncSession,
    actor: Actor,
    keyring: Keyring,
    key_or_license: str | License,
    fingerprint: str,
) -> Activation:
    """Extend a floating lease (or mark a node-locked machine seen), on the current plan's
    terms: after a plan change between node-locked and floating the machine takes the new
    mode here too.

    A live lease is extended without an audit event: heartbeats are frequent and change only
    the lease. A lapsed lease is re-acquired through ``activate`` (audited, cap-checked).
    """
    check_fingerprint(fingerprint)
    license_id = await _resolve(session, keyring, key_or_license)
    now = utcnow()
    row, plan = await _lock_usable(session, license_id, now)
    existing = await repository.find_activation(session, row.id, fingerprint)
    if existing is None:
        raise ActivationNotFound(
            "this machine is not activated on the license; activate it first", field="fingerprint"
        )
    if existing.lease_expires_at is not None and existing.lease_expires_at <= now:
        return (await activate(session, actor, keyring, row, fingerprint)).activation
    _take_plan_terms(existing, plan, now)
    await session.flush()
    await changes.announce(session, lookup=row.key_lookup)
    return existing


async def _release(
    session: AsyncSession, actor: Actor, activation: Activation, lookup: str
) -> Activation:
    await repository.delete_activations(session, [activation.id])
    await changes.announce(session, lookup=lookup)
    await audit.record(
        session,
        actor,
        "activation.delete",
        "activation",
        activation.id,
        account_id=activation.account_id,
        details={"license_id": activation.license_id, "fingerprint": activation.fingerprint},
    )
    return activation


async def deactivate(
    session: AsyncSession,
    actor: Actor,
    keyring: Keyring,
    key_or_license: str | License,
    fingerprint: str,
) -> Activation:
    """Free the seat ``fingerprint`` holds on the license (whatever the license's status)."""
    check_fingerprint(fingerprint)
    license_id = await _resolve(session, keyring, key_or_license)
    row = await repository.lock_license(session, license_id)
    if row is None:
        raise LicenseNotFound(f"no license {license_id}", field="key")
    existing = await repository.find_activation(session, row.id, fingerprint)
    if existing is None:
        raise ActivationNotFound(
            "this machine is not activated on the license", field="fingerprint"
        )
    return await _release(session, actor, existing, row.key_lookup)


async def deactivate_by_id(session: AsyncSession, actor: Actor, activation_id: str) -> Activation:
    """Free a seat by activation id (an administrator removing a lost machine)."""
    found = await session.get(Activation, activation_id)
    locked = None
    if found is not None:
        # Lock the license as every seat change does, then make sure the row is still there.
        locked = await repository.lock_license(session, found.license_id)
        found = await repository.find_activation(session, found.license_id, found.fingerprint)
    if found is None or locked is None:
        raise ActivationNotFound(f"no activation {activation_id}", field="activation_id")
    return await _release(session, actor, found, locked.key_lookup)


async def list_activations(session: AsyncSession, license_id: str) -> list[Activation]:
    await service.get_license(session, license_id)
    return await repository.list_activations(session, license_id)


def _iso(value: datetime | None) -> str | None:
    """The audit details' form (``…+00:00``), hashed into the chain: it stays as it is, unlike
    the answers' instants (``keyshift.dates.rfc3339``)."""
    return value.isoformat() if value else None
