"""License validation's pure decision: key (+ fingerprint, + feature, + meter, + nonce) state →
a code from a closed set, the effective entitlements and the response body, signed with Ed25519.

``decide`` is the whole policy, a pure function over frozen data (no database code: a contract
in pyproject.toml checks it); ``keyshift.validation.service`` loads that data, decides and
signs. The code set, its precedence and the response shape are documented in
``docs/validation.md``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from keyshift import dates
from keyshift.catalog.entitlements import Entitlements, FeatureGrant
from keyshift.catalog.manifests import KEY_PATTERN
from keyshift.errors import InvalidInput
from keyshift.metering.meters import MeterState
from keyshift.security.signing import ALGORITHM, SigningKeys

SIGNATURE_HEADER = "Keyshift-Signature"
NONCE_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
FINGERPRINT_MAX = 255  # activations.fingerprint is VARCHAR(255)
_NONCE = re.compile(NONCE_PATTERN)
_FEATURE = re.compile(KEY_PATTERN)


class Code(StrEnum):
    """The closed set of validation results, in precedence order after NOT_FOUND."""

    VALID = "VALID"
    NOT_FOUND = "NOT_FOUND"
    REVOKED = "REVOKED"
    SUSPENDED = "SUSPENDED"
    EXPIRED = "EXPIRED"
    NO_PLAN = "NO_PLAN"
    NO_ACTIVATION = "NO_ACTIVATION"
    FINGERPRINT_MISMATCH = "FINGERPRINT_MISMATCH"
    TOO_MANY_ACTIVATIONS = "TOO_MANY_ACTIVATIONS"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    FEATURE_NOT_ENTITLED = "FEATURE_NOT_ENTITLED"


DETAIL: dict[Code, str] = {
    Code.VALID: "the license is valid",
    Code.NOT_FOUND: "no license has this key",
    Code.REVOKED: "the license has been revoked",
    Code.SUSPENDED: "the license is suspended",
    Code.EXPIRED: "the license has expired and its grace period is over",
    Code.NO_PLAN: "the license's account has no plan",
    Code.NO_ACTIVATION: "the license has no active machine; activate this one first",
    Code.FINGERPRINT_MISMATCH: "this machine is not activated for the license",
    Code.TOO_MANY_ACTIVATIONS: "the license has more active machines than its plan allows",
    Code.QUOTA_EXCEEDED: "the meter or throttled feature asked about has no units left this period",
    Code.FEATURE_NOT_ENTITLED: "the license's plan does not include this feature or meter",
}


@dataclass(frozen=True)
class ActivationState:
    id: str
    fingerprint: str
    mode: str  # "node" | "floating"
    lease_expires_at: datetime | None  # None: node-locked, never lapses

    def is_live(self, now: datetime) -> bool:
        """A floating lease past its expiry no longer holds a seat."""
        return self.lease_expires_at is None or now < self.lease_expires_at


@dataclass(frozen=True)
class LicenseState:
    """Everything validation needs about one license, as loaded in one query."""

    license_id: str
    account_id: str
    status: str  # "active" | "suspended" | "revoked"
    expires_at: datetime | None
    max_activations_override: int | None
    version: int
    activations: tuple[ActivationState, ...] = ()
    plan_ref: str | None = None  # None: the account has no subscription
    plan_hash: str | None = None
    entitlements_version: int | None = None
    anchor: datetime | None = None  # the subscription's start: where meter periods begin
    subscription_overrides: Mapping[str, Any] | None = None  # add-ons, grace, read-only …
    license_overrides: Mapping[str, Any] | None = None  # hand-set features and quotas


@dataclass(frozen=True)
class Expiry:
    expires_at: datetime | None
    grace_until: datetime | None
    in_grace: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "expires_at": self.expires_at,
            "grace_until": self.grace_until,
            "in_grace": self.in_grace,
        }


@dataclass(frozen=True)
class Decision:
    code: Code
    expiry: Expiry
    live_activations: int
    max_activations: int | None
    activation: ActivationState | None = None  # the live activation matching the fingerprint
    feature: FeatureGrant | None = None  # the grant of the asked feature, if it exists
    meters: Mapping[str, MeterState] | None = None  # current state of the plan's meters

    @property
    def valid(self) -> bool:
        return self.code is Code.VALID


def expiry_of(state: LicenseState, grace_seconds: int, now: datetime) -> Expiry:
    if state.expires_at is None:
        return Expiry(None, None, False)
    grace_until = dates.plus(state.expires_at, timedelta(seconds=grace_seconds))
    return Expiry(state.expires_at, grace_until, state.expires_at <= now < grace_until)


def activation_cap(state: LicenseState, entitlements: Entitlements | None) -> int | None:
    """The license's own override, else the plan's cap; None means activations are not used."""
    if state.max_activations_override is not None:
        return state.max_activations_override
    return entitlements.max_activations if entitlements is not None else None


def decide(
    state: LicenseState,
    entitlements: Entitlements | None,
    *,
    fingerprint: str | None,
    feature: str | None,
    now: datetime,
    meter: str | None = None,
    meters: Mapping[str, MeterState] | None = None,
) -> Decision:
    """The validation policy. ``entitlements`` is None when the account has no plan.

    Precedence: REVOKED > SUSPENDED > EXPIRED > NO_PLAN > NO_ACTIVATION > FINGERPRINT_MISMATCH
    > TOO_MANY_ACTIVATIONS > QUOTA_EXCEEDED > FEATURE_NOT_ENTITLED > VALID. Fingerprint checks
    apply only when a fingerprint is given and the license counts activations (it has a cap).
    ``meters`` holds the current state of the plan's meters and of throttled features (by
    name); QUOTA_EXCEEDED when the asked ``meter``, or the asked throttled feature, is a
    blocking one with nothing left. An asked meter the plan lacks is FEATURE_NOT_ENTITLED.
    """
    grace = entitlements.grace_seconds if entitlements is not None else 0
    expiry = expiry_of(state, grace, now)
    live = [a for a in state.activations if a.is_live(now)]
    cap = activation_cap(state, entitlements)
    matched = next((a for a in live if a.fingerprint == fingerprint), None)
    grant = entitlements.features.get(feature) if entitlements and feature else None

    def result(code: Code) -> Decision:
        return Decision(code, expiry, len(live), cap, matched, grant, meters)

    if state.status == "revoked":
        return result(Code.REVOKED)
    if state.status != "active":
        return result(Code.SUSPENDED)
    if expiry.grace_until is not None and now >= expiry.grace_until:
        return result(Code.EXPIRED)
    if entitlements is None:
        return result(Code.NO_PLAN)
    if fingerprint is not None and cap is not None:
        if not live:
            return result(Code.NO_ACTIVATION)
        if matched is None:
            return result(Code.FINGERPRINT_MISMATCH)
    if cap is not None and len(live) > cap:
        return result(Code.TOO_MANY_ACTIVATIONS)
    states = meters or {}
    asked = [name for name in (meter, feature) if name is not None and name in states]
    if any(states[name].is_exhausted for name in asked):
        return result(Code.QUOTA_EXCEEDED)
    if meter is not None and meter not in entitlements.meters:
        return result(Code.FEATURE_NOT_ENTITLED)
    if feature is not None and (grant is None or not grant.is_usable):
        return result(Code.FEATURE_NOT_ENTITLED)
    return result(Code.VALID)


def response_body(
    state: LicenseState | None,
    entitlements: Entitlements | None,
    decision: Decision | None,
    *,
    fingerprint: str | None,
    feature: str | None,
    nonce: str | None,
    now: datetime,
) -> dict[str, Any]:
    """The signed body. For an unknown key (``state`` None) it says NOT_FOUND and nothing else."""
    if state is None or decision is None:
        return {
            "valid": False,
            "code": Code.NOT_FOUND.value,
            "detail": DETAIL[Code.NOT_FOUND],
            "license": None,
            "account_id": None,
            "entitlements": None,
            "expiry": None,
            "activation": None,
            "feature": None,
            "meters": None,
            "throttle": None,
            "nonce": nonce,
            "issued_at": now,
            "server_time": now,
        }
    activation: dict[str, Any] | None = None
    if fingerprint is not None:
        match = decision.activation
        activation = {
            "fingerprint": fingerprint,
            "activated": match is not None,
            "id": match.id if match else None,
            "mode": match.mode if match else None,
            "lease_expires_at": match.lease_expires_at if match else None,
            "live_activations": decision.live_activations,
            "max_activations": decision.max_activations,
        }
    feature_view: dict[str, Any] | None = None
    if feature is not None:
        grant = decision.feature
        feature_view = {
            "name": feature,
            "entitled": grant is not None and grant.is_usable,
            **(grant.to_dict() if grant is not None else {"mode": None}),
        }
    states = decision.meters or {}
    meters_view = None
    if entitlements is not None and entitlements.meters:
        meters_view = {k: states[k].to_dict() for k in sorted(entitlements.meters) if k in states}
    throttle = None
    if feature is not None and feature in states and states[feature].spec.is_throttle:
        current = states[feature]
        throttle = {
            "feature": feature,
            "limit": current.spec.included,
            "period": current.spec.reset,
            "used": current.used,
            "remaining": current.remaining,
            "resets_at": current.period.end,
        }
    return {
        "valid": decision.valid,
        "code": decision.code.value,
        "detail": DETAIL[decision.code],
        "license": {"id": state.license_id, "status": state.status, "expires_at": state.expires_at},
        "account_id": state.account_id,
        "entitlements": entitlements.public_dict() if entitlements is not None else None,
        "expiry": decision.expiry.to_dict(),
        "activation": activation,
        "feature": feature_view,
        "meters": meters_view,
        "throttle": throttle,
        "nonce": nonce,
        "issued_at": now,
        "server_time": now,
    }


def signature_header(signing: SigningKeys, body: bytes) -> str:
    kid, signature = signing.sign(body)
    encoded = base64.b64encode(signature).decode()
    return f'keyid="{kid}", algorithm="{ALGORITHM}", signature="{encoded}"'


def check_inputs(
    fingerprint: str | None, feature: str | None, nonce: str | None, meter: str | None = None
) -> None:
    """The same limits the API schema states, for callers that do not come through it."""
    if fingerprint is not None and not (
        1 <= len(fingerprint) <= FINGERPRINT_MAX and fingerprint.isprintable()
    ):
        raise InvalidInput(
            f"a fingerprint has 1 to {FINGERPRINT_MAX} printable characters", field="fingerprint"
        )
    if feature is not None and not _FEATURE.match(feature):
        raise InvalidInput("a feature name is lower-case letters, digits, _ and -", field="feature")
    if meter is not None and not _FEATURE.match(meter):
        raise InvalidInput("a meter name is lower-case letters, digits, _ and -", field="meter")
    if nonce is not None and not _NONCE.match(nonce):
        raise InvalidInput("a nonce is 1 to 128 characters of A-Z a-z 0-9 _ -", field="nonce")
