"""Offline license files: a signed (optionally encrypted) snapshot of a license and its
entitlements that an application verifies with no network (``keyshift.client``).

The byte format lives in ``keyshift.client.license_files`` so the server that writes a file
and the SDK that reads it share one definition; ``docs/validation.md`` describes it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit import service as audit
from keyshift.canonical import canonical_json
from keyshift.catalog import service as catalog
from keyshift.catalog.durations import Duration
from keyshift.catalog.entitlements import with_overrides
from keyshift.client import license_files as fmt
from keyshift.client.errors import LicenseFileError, LicenseFileExpired
from keyshift.context import Actor
from keyshift.db.tables import Activation, License, Subscription
from keyshift.db.types import utcnow
from keyshift.errors import (
    ActivationNotFound,
    Conflict,
    InvalidInput,
    LicenseNotActive,
    LicenseNotFound,
)
from keyshift.licensing import service as licensing
from keyshift.security.keyring import Keyring
from keyshift.security.signing import ALGORITHM, SigningKeys
from keyshift.validation import decide as policy
from keyshift.validation import service as validation

MIN_TTL = timedelta(minutes=1)
MAX_TTL = timedelta(days=3650)
DEFAULT_TTL = "30d"


@dataclass(frozen=True)
class ExportedFile:
    text: str  # the armored file
    payload: dict[str, Any]  # what it says (before encryption)
    file_expires_at: datetime
    encrypted: bool


def parse_ttl(ttl: str | timedelta, now: datetime) -> datetime:
    """``now`` plus a duration (``"30d"``, ``"12h"``, ``"1y"`` …) within 1 minute to 10 years."""
    if isinstance(ttl, timedelta):
        until = now + ttl
    else:
        try:
            until = Duration.parse(ttl).after(now)
        except ValueError as exc:
            raise InvalidInput(str(exc), field="ttl") from exc
    if not MIN_TTL <= until - now <= MAX_TTL:
        raise InvalidInput("ttl must be between 1 minute and 10 years", field="ttl")
    return until


def file_expiry(
    now: datetime,
    requested_until: datetime,
    *,
    offline_seconds: int,
    grace_until: datetime | None,
) -> datetime:
    """The requested end, cut to the plan's offline allowance (if it sets one) and to the end
    of the license's grace period: a file never outlives the license it describes."""
    until = requested_until
    if offline_seconds > 0:
        until = min(until, now + timedelta(seconds=offline_seconds))
    if grace_until is not None:
        until = min(until, grace_until)
    return until


async def export_license_file(
    session: AsyncSession,
    actor: Actor,
    keyring: Keyring,
    signing: SigningKeys,
    license_id: str,
    *,
    encrypt: bool = False,
    ttl: str | timedelta = DEFAULT_TTL,
    fingerprint: str | None = None,
    license_key: str | None = None,
    now: datetime | None = None,
) -> ExportedFile:
    """Build, sign and audit a license file for a usable (active or in-grace) license.

    With ``fingerprint`` the file is bound to that machine, which must hold a live activation
    if the license counts activations.
    Encryption uses the license key: ``license_key`` if the caller presented it, else the
    stored key is decrypted for the purpose.
    """
    now = now or utcnow()
    requested_until = parse_ttl(ttl, now)
    row = await session.get(License, license_id)
    if row is None:
        raise LicenseNotFound(f"no license {license_id}", field="license_id")
    subscription = await session.get(Subscription, row.account_id)
    if subscription is None:
        raise Conflict("the license's account has no plan", field="license_id")
    plan_entitlements = await catalog.entitlements_for(
        session, f"{subscription.plan_key}@{subscription.plan_version}", subscription.plan_hash
    )
    entitlements = with_overrides(
        plan_entitlements, subscription.overrides or {}, row.overrides or {}, now
    )
    standing = licensing.standing(row, entitlements.grace_seconds, now)
    if not licensing.is_usable(standing):
        raise LicenseNotActive(
            f"the license is {standing}; only a usable license can be exported",
            field="license_id",
        )
    activations = [
        a
        for a in (
            await session.execute(
                select(Activation)
                .where(Activation.license_id == row.id)
                .order_by(Activation.created_at, Activation.id)
            )
        ).scalars()
        if a.lease_expires_at is None or now < a.lease_expires_at
    ]
    cap = row.max_activations_override or entitlements.max_activations
    if fingerprint is not None:
        activations = [a for a in activations if a.fingerprint == fingerprint]
        if not activations and cap is not None:
            raise ActivationNotFound(
                "this fingerprint has no live activation on the license", field="fingerprint"
            )
    expiry = policy.expiry_of(
        policy.LicenseState(row.id, row.account_id, row.status, row.expires_at, None, row.version),
        entitlements.grace_seconds,
        now,
    )
    until = file_expiry(
        now,
        requested_until,
        offline_seconds=entitlements.offline_seconds,
        grace_until=expiry.grace_until,
    )
    payload: dict[str, Any] = {
        "format": fmt.FORMAT,
        "license": {
            "id": row.id,
            "account_id": row.account_id,
            "status": row.status,
            "expires_at": row.expires_at,
        },
        "entitlements": entitlements.to_dict(),
        "revision": revision_of(subscription, row),
        "issued_at": now,
        "file_expires_at": until,
        "grace": {
            "seconds": entitlements.grace_seconds,
            "grace_until": expiry.grace_until,
            "in_grace": expiry.in_grace,
        },
        "fingerprint": fingerprint,
        "activations": [
            {
                "fingerprint": a.fingerprint,
                "mode": a.mode,
                "lease_expires_at": a.lease_expires_at,
            }
            for a in activations
        ],
    }
    plaintext = canonical_json(payload)
    if encrypt:
        key = license_key or licensing.reveal_key(keyring, row)
        enc, payload_bytes = fmt.ENC_AES, fmt.encrypt_payload(plaintext, key, row.id)
    else:
        enc, payload_bytes = fmt.ENC_NONE, plaintext
    kid, signature = signing.sign(fmt.signed_message(enc, payload_bytes))
    text = fmt.armor(
        {
            "alg": ALGORITHM,
            "enc": enc,
            "kid": kid,
            "lid": row.id,
            "payload": base64.b64encode(payload_bytes).decode(),
            "sig": base64.b64encode(signature).decode(),
        }
    )
    await audit.record(
        session,
        actor,
        "license.file_export",
        "license",
        row.id,
        account_id=row.account_id,
        details={
            "encrypted": encrypt,
            "file_expires_at": until.isoformat(),
            "fingerprint": fingerprint,
            "kid": kid,
        },
    )
    return ExportedFile(text, payload, until, encrypt)


async def checkout(
    session: AsyncSession,
    keyring: Keyring,
    signing: SigningKeys,
    *,
    key: str,
    fingerprint: str | None = None,
    encrypt: bool = True,
    ttl: str | timedelta = DEFAULT_TTL,
) -> ExportedFile:
    """A client checks out a file for itself, proving possession of the key. The license must
    validate (fresh from the database, not the cache) for the fingerprint given."""
    lookup = licensing.lookup_for(keyring, key)
    policy.check_inputs(fingerprint, None, None)
    now = utcnow()
    loaded = await validation.load(session, lookup)
    if loaded is None:
        raise LicenseNotFound("no license has this key", field="key")
    decision = policy.decide(
        loaded.state, loaded.entitlements, fingerprint=fingerprint, feature=None, now=now
    )
    if not decision.valid:
        raise LicenseNotActive(
            f"the license does not validate: {decision.code.value}",
            field="key",
            validation_code=decision.code.value,
        )
    actor = Actor(id=f"license:{loaded.state.license_id}")
    return await export_license_file(
        session,
        actor,
        keyring,
        signing,
        loaded.state.license_id,
        encrypt=encrypt,
        ttl=ttl,
        fingerprint=fingerprint,
        license_key=key,
        now=now,
    )


def revision_of(subscription: Subscription, row: License) -> dict[str, Any]:
    """What a file was issued under: any plan change (a migration, a rollback) or license
    change bumps one of these, and files with an older revision are superseded."""
    return {
        "plan": f"{subscription.plan_key}@{subscription.plan_version}",
        "entitlements_version": subscription.entitlements_version,
        "license_version": row.version,
    }


@dataclass(frozen=True)
class CheckIn:
    superseded: bool
    reason: str | None
    presented_revision: dict[str, Any] | None
    current_revision: dict[str, Any]
    file: ExportedFile | None  # the replacement, when superseded


async def check_in(
    session: AsyncSession,
    keyring: Keyring,
    signing: SigningKeys,
    *,
    key: str,
    license_file: str,
    fingerprint: str | None = None,
    encrypt: bool = True,
    ttl: str | timedelta = DEFAULT_TTL,
) -> CheckIn:
    """An application presents the file it holds: if a newer one exists (the plan or the
    license changed since — e.g. a migration), say so and return the new file; else say it
    is current. A file that fails verification is refused (InvalidInput on license_file)."""
    row = await licensing.find_by_key(session, keyring, key)
    if row is None:
        raise LicenseNotFound("no license has this key", field="key")
    public = signing.public_keys()
    try:
        payload = fmt.verify_license_file(license_file, public, license_key=key)
    except LicenseFileExpired as expired:
        payload = expired.payload
    except (LicenseFileError, ValueError) as exc:
        raise InvalidInput(
            f"the license file does not verify: {exc}", field="license_file"
        ) from exc
    if (payload.get("license") or {}).get("id") != row.id:
        raise InvalidInput("the license file is for another license", field="license_file")
    subscription = await session.get(Subscription, row.account_id)
    if subscription is None:
        raise Conflict("the license's account has no plan", field="key")
    current = revision_of(subscription, row)
    presented = payload.get("revision")
    if presented == current:
        return CheckIn(False, None, presented, current, None)
    reason = (
        f"the plan changed ({presented.get('plan')} → {current['plan']})"
        if isinstance(presented, dict) and presented.get("plan") != current["plan"]
        else "the license or its entitlements changed since the file was issued"
    )
    new_file = await checkout(
        session, keyring, signing, key=key, fingerprint=fingerprint, encrypt=encrypt, ttl=ttl
    )
    return CheckIn(
        True, reason, presented if isinstance(presented, dict) else None, current, new_file
    )
