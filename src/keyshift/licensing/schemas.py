"""How a license and an activation are shown (the API's answers, the CLI's JSON): built from
the rows the services return. A license never shows its key, only its hint, except in the one
answer to issuing it."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Self

from keyshift.db.tables import Activation, License
from keyshift.db.types import utcnow
from keyshift.licensing.service import Standing
from keyshift.schemas import Instant, Response


class LicenseOut(Response):
    id: str
    account_id: str
    key_hint: str
    status: str
    standing: Standing
    expires_at: Instant | None
    max_activations_override: int | None
    version: int
    created_at: Instant
    updated_at: Instant

    @classmethod
    def of(cls, row: License, standing: Standing) -> Self:
        """``standing`` from ``service.license_standing`` (it needs the plan's grace)."""
        return cls(
            id=row.id,
            account_id=row.account_id,
            key_hint=row.key_hint,
            status=row.status,
            standing=standing,
            expires_at=row.expires_at,
            max_activations_override=row.max_activations_override,
            version=row.version,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class LicenseIssued(LicenseOut):
    """The answer to issuing: the plaintext key, this once."""

    key: str


class LicenseDetail(LicenseOut):
    """With the hand-set overrides (admin views; a client never sees these)."""

    overrides: dict[str, Any]


class ActivationOut(Response):
    id: str
    license_id: str
    fingerprint: str
    mode: str
    label: str | None
    lease_expires_at: Instant | None
    is_live: bool
    last_seen_at: Instant
    created_at: Instant

    @classmethod
    def of(cls, activation: Activation, now: datetime | None = None) -> Self:
        """``is_live``: node-locked, or a floating lease not yet lapsed at ``now``."""
        now = now or utcnow()
        lease = activation.lease_expires_at
        return cls(
            id=activation.id,
            license_id=activation.license_id,
            fingerprint=activation.fingerprint,
            mode=activation.mode,
            label=activation.label,
            lease_expires_at=lease,
            is_live=lease is None or lease > now,
            last_seen_at=activation.last_seen_at,
            created_at=activation.created_at,
        )


class ActivationCreated(ActivationOut):
    """The CLI's answer to activating: whether the seat is new."""

    created: bool
