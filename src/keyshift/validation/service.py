"""License validation's reads: the state ``decide`` needs, from the in-process cache or one
database query, then the decision signed (``validate``). The pure decision is in
``keyshift.validation.decide``; the code set, its precedence and the response shape are
documented in ``docs/validation.md``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from keyshift.canonical import canonical_json
from keyshift.catalog import service as catalog
from keyshift.catalog.entitlements import Entitlements, with_overrides
from keyshift.db.engine import HotRead
from keyshift.db.sql import among
from keyshift.db.tables import Activation, License, Subscription, UsageCounter
from keyshift.db.types import utcnow
from keyshift.errors import DatabaseUnavailable
from keyshift.licensing.service import lookup_for
from keyshift.metering import reports, subjects
from keyshift.metering.meters import MeterState, meter_specs
from keyshift.security.keyring import Keyring
from keyshift.security.signing import SigningKeys
from keyshift.validation.cache import CachedLicense, LicenseStateCache
from keyshift.validation.decide import (
    ActivationState,
    Code,
    LicenseState,
    check_inputs,
    decide,
    response_body,
    signature_header,
)

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
#: The same for many keys at once (``load_many``), with each row's key lookup.
_STATES_QUERY = (
    select(*_STATE_QUERY.selected_columns, License.key_lookup.label("key_lookup"))
    .select_from(License)
    .outerjoin(Subscription, Subscription.account_id == License.account_id)
    .outerjoin(Activation, Activation.license_id == License.id)
    .order_by(License.key_lookup, Activation.created_at, Activation.id)
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


async def load_many(session: AsyncSession, lookups: Sequence[str]) -> dict[str, CachedLicense]:
    """``load`` for many keys in one round trip; a key that finds no license is left out."""
    if not lookups:
        return {}
    grouped: dict[str, list[Mapping[Any, Any]]] = {}
    result = await session.execute(
        _STATES_QUERY.where(among(session, License.key_lookup, sorted(set(lookups))))
    )
    for row in result.mappings():
        grouped.setdefault(row["key_lookup"], []).append(row)
    out: dict[str, CachedLicense] = {}
    for lookup, rows in grouped.items():
        state = _state_of(rows)
        assert state is not None  # a group has rows
        entitlements = None
        if state.plan_ref is not None and state.plan_hash is not None:
            entitlements = await catalog.entitlements_for(session, state.plan_ref, state.plan_hash)
        out[lookup] = CachedLicense(state, entitlements)
    return out


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
