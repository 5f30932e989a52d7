"""License validation: key (+ fingerprint, + feature, + meter, + nonce) → a code from a closed set and
the effective entitlements, signed with Ed25519.

``decide`` is the whole policy, a pure function over frozen data; ``validate`` loads that data
(from the in-process cache or one database query), decides and signs. The code set, its
precedence and the response shape are documented in ``docs/validation.md``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from keyshift import dates
from keyshift.canonical import canonical_json
from keyshift.catalog import service as catalog
from keyshift.catalog.entitlements import Entitlements, FeatureGrant, with_overrides
from keyshift.catalog.manifests import KEY_PATTERN
from keyshift.db.engine import HotRead
from keyshift.db.tables import Activation, License, Subscription, UsageCounter
from keyshift.db.types import utcnow
from keyshift.errors import DatabaseUnavailable, InvalidInput
from keyshift.licensing.service import lookup_for
from keyshift.metering import reports, subjects
from keyshift.metering.meters import MeterState, meter_specs
from keyshift.security.keyring import Keyring
from keyshift.security.signing import ALGORITHM, SigningKeys
from keyshift.validation.cache import CachedLicense, LicenseStateCache

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


# -- the pure core ---------------------------------------------------------------------------


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


# -- the service -----------------------------------------------------------------------------

SessionSource = Callable[[], AbstractAsyncContextManager[AsyncSession]]


@dataclass(frozen=True)
class ValidationResult:
    code: Code
    body: bytes  # the exact signed bytes: send these, never a re-serialisation
    signature_header: str
    payload: dict[str, Any]
    cached: bool  # whether the license state came from the cache
    lookup: str  # the presented key's lookup hash

    @property
    def valid(self) -> bool:
        return self.code is Code.VALID


#: License, subscription and activations in one statement (a row per activation); built once,
#: the key lookup hash bound per call.
_STATE_QUERY = (
    select(
        License.id,
        License.account_id,
        License.status,
        License.expires_at,
        License.max_activations_override,
        License.version,
        Subscription.plan_key,
        Subscription.plan_version,
        Subscription.plan_hash,
        Subscription.entitlements_version,
        Subscription.started_at,
        Subscription.overrides.label("subscription_overrides"),
        License.overrides.label("license_overrides"),
        Activation.id.label("activation_id"),
        Activation.fingerprint,
        Activation.mode,
        Activation.lease_expires_at,
    )
    .select_from(License)
    .outerjoin(Subscription, Subscription.account_id == License.account_id)
    .outerjoin(Activation, Activation.license_id == License.id)
    .where(License.key_lookup == bindparam("lookup"))
    .order_by(Activation.created_at, Activation.id)
)
#: The account's counters whose period contains ``when`` (as ``repository.counters_at``).
_COUNTERS_QUERY = select(UsageCounter.meter, UsageCounter.period_start, UsageCounter.used).where(
    UsageCounter.account_id == bindparam("account_id"),
    UsageCounter.period_start <= bindparam("when"),
    UsageCounter.period_end > bindparam("when"),
)
#: The same, for ``Database.fetch`` (run on every validation of a metered plan).
_COUNTERS = HotRead(_COUNTERS_QUERY)


#: The same, for ``Database.fetch`` (the validation path's cache misses).
_STATE = HotRead(_STATE_QUERY)


def _state_of(rows: Sequence[Mapping[Any, Any]]) -> LicenseState | None:
    """A license's state from the rows of ``_STATE_QUERY`` (one per activation)."""
    if not rows:
        return None
    first = rows[0]
    activations = tuple(
        ActivationState(r["activation_id"], r["fingerprint"], r["mode"], r["lease_expires_at"])
        for r in rows
        if r["activation_id"] is not None
    )
    has_plan = first["plan_key"] is not None
    return LicenseState(
        license_id=first["id"],
        account_id=first["account_id"],
        status=first["status"],
        expires_at=first["expires_at"],
        max_activations_override=first["max_activations_override"],
        version=first["version"],
        activations=activations,
        plan_ref=f"{first['plan_key']}@{first['plan_version']}" if has_plan else None,
        plan_hash=first["plan_hash"],
        entitlements_version=first["entitlements_version"],
        anchor=first["started_at"],
        subscription_overrides=first["subscription_overrides"] or None,
        license_overrides=first["license_overrides"] or None,
    )


async def load_state(db: AsyncSession | AsyncConnection, lookup: str) -> LicenseState | None:
    """License, subscription and activations in one round trip (a row per activation), on a
    session or on a bare connection."""
    return _state_of((await db.execute(_STATE_QUERY, {"lookup": lookup})).mappings().all())


def effective_entitlements(entry: CachedLicense, now: datetime) -> Entitlements | None:
    """The plan's entitlements with the account's and the license's overrides applied (a
    grace period ends by the clock, so this is computed per validation, not cached)."""
    state, base = entry.state, entry.entitlements
    if base is None or (not state.subscription_overrides and not state.license_overrides):
        return base
    return with_overrides(
        base,
        dict(state.subscription_overrides or {}),
        dict(state.license_overrides or {}),
        now,
    )


async def load(db: AsyncSession | AsyncConnection, lookup: str) -> CachedLicense | None:
    """The state and its plan's entitlements (resolved once per plan hash, then cached)."""
    state = await load_state(db, lookup)
    if state is None:
        return None
    entitlements = None
    if state.plan_ref is not None and state.plan_hash is not None:
        if isinstance(db, AsyncConnection):
            # Resolved from the catalog cache without touching the session, except the first
            # time a plan hash is seen; then its queries run on this connection.
            async with AsyncSession(bind=db) as session:
                entitlements = await catalog.entitlements_for(
                    session, state.plan_ref, state.plan_hash
                )
        else:
            entitlements = await catalog.entitlements_for(db, state.plan_ref, state.plan_hash)
    return CachedLicense(state, entitlements)


#: Runs a ``HotRead`` and returns its rows (``Database.fetch``).
Fetcher = Callable[[HotRead, Mapping[str, Any]], Awaitable[list[Mapping[str, Any]]]]


async def fetch_entry(fetch: Fetcher, sessions: SessionSource, lookup: str) -> CachedLicense | None:
    """As ``load``, with the license read through ``fetch`` (one statement, no transaction);
    the first sight of a plan hash reads the catalog in a ``sessions`` transaction."""
    state = _state_of(await fetch(_STATE, {"lookup": lookup}))
    if state is None:
        return None
    entitlements = None
    if state.plan_ref is not None and state.plan_hash is not None:
        entitlements = catalog.cached_entitlements(state.plan_ref, state.plan_hash)
        if entitlements is None:
            async with sessions() as session:
                entitlements = await catalog.entitlements_for(
                    session, state.plan_ref, state.plan_hash
                )
    return CachedLicense(state, entitlements)


async def current_meters(
    sessions: SessionSource,
    entry: CachedLicense,
    feature: str | None,
    now: datetime,
    entitlements: Entitlements | None = None,
    fetch: Fetcher | None = None,
) -> dict[str, MeterState] | None:
    """Meter state is read fresh (one query), never cached, and only when there is any: the
    plan has meters, or the asked feature is throttled. ``entitlements``: the effective ones
    (default: the plan's). With ``fetch``: one prebuilt statement on a pooled connection, no
    transaction around it (a single statement sees one snapshot); else in a ``sessions``
    transaction."""
    entitlements = entitlements if entitlements is not None else entry.entitlements
    anchor = entry.state.anchor
    if entitlements is None or anchor is None:
        return None
    wanted = set(entitlements.meters)
    if feature is not None and feature in meter_specs(entitlements):
        wanted.add(feature)
    if not wanted:
        return None
    subject = subjects.Subject(entry.state.account_id, entry.state.license_id, anchor, entitlements)
    if fetch is None:
        async with sessions() as session:
            return await reports.meter_states(session, subject, now, only=sorted(wanted))
    # As ``reports.meter_states``: each wanted meter's counter in its current period.
    specs = {k: v for k, v in subject.specs.items() if k in wanted}
    if not specs:
        return {}
    rows = await fetch(_COUNTERS, {"account_id": entry.state.account_id, "when": now})
    counters = {(r["meter"], r["period_start"]): int(r["used"]) for r in rows}
    states = {}
    for key, spec in specs.items():
        period = subject.period(spec, now)
        states[key] = MeterState(spec, period, counters.get((key, period.start), 0))
    return states


#: A digest of the presented key text → its lookup hash, for keys that were well-formed:
#: normalising and the HMAC are a tenth of a cached validation's cost, and applications
#: present the same key text again and again. Keyed by a digest, so the memo keeps no key
#: text in memory; bounded, emptied when full.
_LOOKUPS: dict[tuple[bytes, bytes], str] = {}
_LOOKUPS_MAX = 100_000


def lookup_of(keyring: Keyring, key: str) -> str:
    """The lookup hash of a presented key (MalformedKey if it cannot be one), memoised."""
    memo = (keyring.lookup_key, hashlib.blake2b(key.encode(), digest_size=16).digest())
    found = _LOOKUPS.get(memo)
    if found is None:
        found = lookup_for(keyring, key)  # MalformedKey: never remembered
        if len(_LOOKUPS) >= _LOOKUPS_MAX:
            _LOOKUPS.clear()
        _LOOKUPS[memo] = found
    return found


async def validate(
    sessions: SessionSource,
    keyring: Keyring,
    signing: SigningKeys,
    *,
    key: str,
    fingerprint: str | None = None,
    feature: str | None = None,
    nonce: str | None = None,
    meter: str | None = None,
    cache: LicenseStateCache | None = None,
    now: datetime | None = None,
    fetch: Fetcher | None = None,
) -> ValidationResult:
    """Validate a presented key and sign the answer.

    ``sessions`` opens a read transaction (e.g. ``db.transaction``); it is entered only when
    the cache misses, so a cached validation touches no database — unless the plan has
    meters (or the asked feature is throttled): meter state is read fresh, in one query.
    Unknown keys are never cached: a key issued a moment ago validates at once.
    ``fetch`` (``Database.fetch``), if given, takes the license read and the meter read
    instead: one statement each on a pooled connection, without BEGIN/COMMIT around it.
    MalformedKey / InvalidInput for input that cannot be a key, fingerprint, feature, meter
    or nonce.
    """
    lookup = lookup_of(keyring, key)
    check_inputs(fingerprint, feature, nonce, meter)
    now = now or utcnow()
    entry = cache.get(lookup) if cache is not None else None
    cached = entry is not None
    if entry is None:
        generation = cache.generation if cache is not None else 0
        try:
            if fetch is not None:
                entry = await fetch_entry(fetch, sessions, lookup)
            else:
                async with sessions() as session:
                    entry = await load(session, lookup)
        except DatabaseUnavailable:
            # An outage: answer from an expired entry still within the cache's stale window.
            entry = cache.get_stale(lookup) if cache is not None else None
            if entry is None:
                raise
            cached = True
        else:
            if entry is not None and cache is not None:
                cache.put(lookup, entry, generation=generation)
    if entry is None:
        payload = response_body(
            None, None, None, fingerprint=fingerprint, feature=feature, nonce=nonce, now=now
        )
        code = Code.NOT_FOUND
    else:
        effective = effective_entitlements(entry, now)
        try:
            meters = await current_meters(sessions, entry, feature, now, effective, fetch)
        except DatabaseUnavailable:
            # Counters live only in the database: an answer from the cache during an outage
            # says nothing of them, and a question about one (a meter, a throttled feature)
            # waits for the database.
            asked = meter is not None or (
                feature is not None and effective is not None and feature in meter_specs(effective)
            )
            if not cached or asked:
                raise
            meters = None
        decision = decide(
            entry.state,
            effective,
            fingerprint=fingerprint,
            feature=feature,
            now=now,
            meter=meter,
            meters=meters,
        )
        payload = response_body(
            entry.state,
            effective,
            decision,
            fingerprint=fingerprint,
            feature=feature,
            nonce=nonce,
            now=now,
        )
        code = decision.code
    body = canonical_json(payload)
    return ValidationResult(code, body, signature_header(signing, body), payload, cached, lookup)
