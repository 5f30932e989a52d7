"""Validation: the pure policy (properties over any state), the service on both databases,
and the cache's staleness bound and invalidation."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import update

from keyshift.catalog.entitlements import Entitlements, FeatureGrant
from keyshift.context import SYSTEM
from keyshift.db import changes
from keyshift.db.engine import Database
from keyshift.db.tables import License
from keyshift.errors import InvalidInput, MalformedKey
from keyshift.licensing import activations, service
from keyshift.security.secrets_store import Secrets
from keyshift.validation import cache
from keyshift.validation import service as v
from keyshift.validation.decide import ActivationState, Code, LicenseState, decide
from tests import factories

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
FEATURES = {
    "export": FeatureGrant("enabled"),
    "sync": FeatureGrant("throttled", 100, "day"),
    "beta": FeatureGrant("disabled"),
}


def plan(cap: int | None = 3, grace: int = 7 * 86400) -> Entitlements:
    return Entitlements(
        plan_ref="p@1",
        plan_hash="h" * 64,
        edition_ref="e@1",
        model="seat" if cap is not None else "usage",
        features=FEATURES,
        max_activations=cap,
        grace_seconds=grace,
    )


def state(**kw: object) -> LicenseState:
    base: dict[str, object] = {
        "license_id": "L",
        "account_id": "A",
        "status": "active",
        "expires_at": NOW + timedelta(days=30),
        "max_activations_override": None,
        "version": 1,
        "activations": (),
        "plan_ref": "p@1",
        "plan_hash": "h" * 64,
        "entitlements_version": 1,
    }
    base.update(kw)
    return LicenseState(**base)  # type: ignore[arg-type]


def node(fp: str) -> ActivationState:
    return ActivationState(f"act-{fp}", fp, "node", None)


# -- examples of each code -------------------------------------------------------------------


def test_each_code_from_the_pure_policy() -> None:
    def code(s: LicenseState, e: Entitlements | None = plan(), **kw: str | None) -> Code:
        kw.setdefault("fingerprint", None)
        kw.setdefault("feature", None)
        return decide(s, e, now=NOW, **kw).code  # type: ignore[arg-type]

    assert code(state()) is Code.VALID
    assert code(state(status="revoked")) is Code.REVOKED
    assert code(state(status="suspended")) is Code.SUSPENDED
    assert code(state(expires_at=NOW - timedelta(days=8))) is Code.EXPIRED
    assert code(state(), None) is Code.NO_PLAN
    assert code(state(), fingerprint="m1") is Code.NO_ACTIVATION
    assert code(state(activations=(node("m1"),)), fingerprint="m2") is Code.FINGERPRINT_MISMATCH
    over = state(activations=(node("a"), node("b")), max_activations_override=1)
    assert code(over, fingerprint="a") is Code.TOO_MANY_ACTIVATIONS
    assert code(state(), feature="beta") is Code.FEATURE_NOT_ENTITLED
    assert code(state(), feature="unknown") is Code.FEATURE_NOT_ENTITLED
    assert code(state(), feature="sync") is Code.VALID


def test_expired_within_grace_is_valid_and_says_so() -> None:
    decision = decide(
        state(expires_at=NOW - timedelta(days=1)), plan(), fingerprint=None, feature=None, now=NOW
    )
    assert decision.code is Code.VALID
    assert decision.expiry.in_grace
    assert decision.expiry.grace_until == NOW + timedelta(days=6)


def test_grace_ends_exactly_at_grace_until() -> None:
    expires = NOW - timedelta(days=7)
    decision = decide(state(expires_at=expires), plan(), fingerprint=None, feature=None, now=NOW)
    assert decision.code is Code.EXPIRED
    just_before = NOW - timedelta(microseconds=1)
    assert (
        decide(state(expires_at=expires), plan(), fingerprint=None, feature=None, now=just_before)
    ).code is Code.VALID


def test_a_lapsed_floating_lease_is_not_live() -> None:
    lapsed = ActivationState("a1", "m1", "floating", NOW - timedelta(seconds=1))
    live = ActivationState("a1", "m1", "floating", NOW + timedelta(minutes=5))
    assert decide(state(activations=(lapsed,)), plan(), fingerprint="m1", feature=None, now=NOW)
    assert (
        decide(state(activations=(lapsed,)), plan(), fingerprint="m1", feature=None, now=NOW).code
        is Code.NO_ACTIVATION
    )
    assert (
        decide(state(activations=(live,)), plan(), fingerprint="m1", feature=None, now=NOW).code
        is Code.VALID
    )


def test_uncapped_plans_do_not_count_activations() -> None:
    decision = decide(state(), plan(cap=None), fingerprint="m1", feature=None, now=NOW)
    assert decision.code is Code.VALID


# -- properties ------------------------------------------------------------------------------

fingerprints = st.sampled_from(["m1", "m2", "m3", "m4"])
activation_states = st.builds(
    ActivationState,
    id=st.uuids().map(str),
    fingerprint=fingerprints,
    mode=st.sampled_from(["node", "floating"]),
    lease_expires_at=st.one_of(
        st.none(), st.integers(-7200, 7200).map(lambda s: NOW + timedelta(seconds=s))
    ),
)
states = st.builds(
    state,
    status=st.sampled_from(["active", "suspended", "revoked"]),
    expires_at=st.one_of(
        st.none(), st.integers(-30 * 86400, 30 * 86400).map(lambda s: NOW + timedelta(seconds=s))
    ),
    max_activations_override=st.one_of(st.none(), st.integers(1, 4)),
    activations=st.lists(activation_states, max_size=6, unique_by=lambda a: a.fingerprint).map(
        tuple
    ),
)
plans = st.one_of(
    st.none(),
    st.builds(plan, cap=st.one_of(st.none(), st.integers(1, 4)), grace=st.integers(0, 14 * 86400)),
)
features = st.one_of(st.none(), st.sampled_from(["export", "sync", "beta", "unknown"]))


@settings(max_examples=400, deadline=None)
@given(states, plans, st.one_of(st.none(), fingerprints), features)
def test_decision_properties(
    s: LicenseState, e: Entitlements | None, fp: str | None, feature: str | None
) -> None:
    decision = decide(s, e, fingerprint=fp, feature=feature, now=NOW)
    code = decision.code
    # Revoked always wins; suspended wins over everything but revoked.
    if s.status == "revoked":
        assert code is Code.REVOKED
    elif s.status == "suspended":
        assert code is Code.SUSPENDED
    grace = e.grace_seconds if e else 0
    past_grace = s.expires_at is not None and s.expires_at + timedelta(seconds=grace) <= NOW
    # Never VALID when expired past grace (nor when not active, nor without a plan).
    if past_grace or s.status != "active" or e is None:
        assert code is not Code.VALID
    if code is Code.VALID:
        live = [a for a in s.activations if a.is_live(NOW)]
        cap = s.max_activations_override or (e.max_activations if e else None)
        assert cap is None or len(live) <= cap
        if fp is not None and cap is not None:
            assert decision.activation is not None and decision.activation.fingerprint == fp
            assert decision.activation.is_live(NOW)
        if feature is not None:
            assert feature in FEATURES and FEATURES[feature].is_usable
    # in_grace only between expiry and the end of grace.
    if decision.expiry.in_grace:
        assert s.expires_at is not None and s.expires_at <= NOW and not past_grace


@settings(max_examples=200, deadline=None)
@given(states, plans, st.one_of(st.none(), fingerprints), features, st.lists(activation_states))
def test_lapsed_leases_change_nothing(
    s: LicenseState,
    e: Entitlements | None,
    fp: str | None,
    feature: str | None,
    extra: list[ActivationState],
) -> None:
    taken = {a.fingerprint for a in s.activations}
    lapsed = tuple(
        ActivationState(a.id, a.fingerprint + "-x", "floating", NOW - timedelta(seconds=1))
        for a in extra
        if a.fingerprint + "-x" not in taken
    )
    with_lapsed = LicenseState(**{**s.__dict__, "activations": s.activations + lapsed})
    before = decide(s, e, fingerprint=fp, feature=feature, now=NOW)
    after = decide(with_lapsed, e, fingerprint=fp, feature=feature, now=NOW)
    assert before == after


# -- the service on both databases -----------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    cache.default_cache.clear()


async def _licensed(db: Database, secrets: Secrets, plan_ref: str = factories.SEAT_NODE):
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db, plan_ref)
    row, key = await factories.issue_license(db, secrets, account.id)
    return account, row, key


async def run_validate(db: Database, secrets: Secrets, key: str, **kw):
    return await v.validate(db.transaction, secrets.keyring, secrets.signing, key=key, **kw)


async def test_service_validates_and_signs(db: Database, secrets: Secrets) -> None:
    account, row, key = await _licensed(db, secrets)
    result = await run_validate(db, secrets, key, nonce="n-1")
    assert result.code is Code.VALID
    assert result.payload["license"]["id"] == row.id
    assert result.payload["account_id"] == account.id
    assert result.payload["entitlements"]["plan"] == factories.SEAT_NODE
    assert result.payload["nonce"] == "n-1"
    assert result.signature_header.startswith('keyid="s1", algorithm="ed25519", signature="')


async def test_lowercase_and_lookalike_key_is_the_same_key(db: Database, secrets: Secrets) -> None:
    _, _, key = await _licensed(db, secrets)
    sloppy = key.lower().replace("-", " ").replace("0", "o").replace("1", "l")
    assert (await run_validate(db, secrets, sloppy)).code is Code.VALID


async def test_malformed_inputs_are_refused_naming_the_field(
    db: Database, secrets: Secrets
) -> None:
    _, _, key = await _licensed(db, secrets)
    mistyped = key[:-1] + ("A" if key[-1] != "A" else "B")
    with pytest.raises(MalformedKey) as caught:
        await run_validate(db, secrets, mistyped)
    assert caught.value.field == "key"
    for field, kw in [
        ("fingerprint", {"fingerprint": "x" * 256}),
        ("fingerprint", {"fingerprint": "tab\there"}),
        ("feature", {"feature": "Not A Feature"}),
        ("nonce", {"nonce": "x" * 129}),
        ("nonce", {"nonce": "has space"}),
    ]:
        with pytest.raises(InvalidInput) as caught:
            await run_validate(db, secrets, key, **kw)
        assert caught.value.field == field


async def test_unknown_key_reveals_nothing(db: Database, secrets: Secrets) -> None:
    from keyshift.licensing import keys

    await _licensed(db, secrets)
    result = await run_validate(
        db, secrets, keys.generate(), fingerprint="m1", feature="export", nonce="abc"
    )
    assert result.code is Code.NOT_FOUND
    assert {k for k, val in result.payload.items() if val is not None} == {
        "valid",
        "code",
        "detail",
        "nonce",
        "issued_at",
        "server_time",
    }


# -- the cache -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _suspend_behind_the_cache(db: Database, license_id: str) -> None:
    """Change the row with no invalidation at all, as a writer that forgot would."""
    async with db.transaction() as session:
        await session.execute(
            update(License).where(License.id == license_id).values(status="suspended")
        )


async def test_cached_state_is_stale_at_most_the_ttl(db: Database, secrets: Secrets) -> None:
    _, row, key = await _licensed(db, secrets)
    clock = FakeClock()
    lru = cache.LicenseStateCache(ttl_seconds=1.5, clock=clock)
    first = await run_validate(db, secrets, key, cache=lru)
    assert first.code is Code.VALID and not first.cached
    await _suspend_behind_the_cache(db, row.id)
    clock.now += 1.4  # inside the bound: the cache may still answer from before
    stale = await run_validate(db, secrets, key, cache=lru)
    assert stale.cached and stale.code is Code.VALID
    clock.now += 0.1  # the bound has passed: the change must be visible
    fresh = await run_validate(db, secrets, key, cache=lru)
    assert not fresh.cached and fresh.code is Code.SUSPENDED


async def test_suspension_is_visible_at_once_after_invalidation(
    db: Database, secrets: Secrets
) -> None:
    _, row, key = await _licensed(db, secrets)
    lru = cache.LicenseStateCache(ttl_seconds=3600)
    assert (await run_validate(db, secrets, key, cache=lru)).code is Code.VALID
    async with db.transaction() as session:
        await service.suspend_license(session, SYSTEM, row.id)
        await changes.announce(session, lookup=row.key_lookup, to=lru.apply)
        assert len(lru) == 1  # not before the commit: a reader could re-cache the old state
    assert len(lru) == 0
    assert (await run_validate(db, secrets, key, cache=lru)).code is Code.SUSPENDED


async def test_account_invalidation_drops_all_its_licenses(db: Database, secrets: Secrets) -> None:
    account, _, key = await _licensed(db, secrets)
    _, key2 = await factories.issue_license(db, secrets, account.id)
    lru = cache.LicenseStateCache(ttl_seconds=3600)
    await run_validate(db, secrets, key, cache=lru)
    await run_validate(db, secrets, key2, cache=lru)
    assert len(lru) == 2
    async with db.transaction() as session:
        await changes.announce(session, account_id=account.id, to=lru.apply)
    assert len(lru) == 0


async def test_rolled_back_invalidation_is_forgotten(db: Database, secrets: Secrets) -> None:
    _, row, key = await _licensed(db, secrets)
    lru = cache.LicenseStateCache(ttl_seconds=3600)
    await run_validate(db, secrets, key, cache=lru)
    with pytest.raises(RuntimeError):
        async with db.transaction() as session:
            await changes.announce(session, lookup=row.key_lookup, to=lru.apply)
            raise RuntimeError("abort")
    assert len(lru) == 1
    async with db.transaction():
        pass
    assert len(lru) == 1


async def test_a_load_raced_by_an_invalidation_is_not_stored(
    db: Database, secrets: Secrets
) -> None:
    _, row, _key = await _licensed(db, secrets)
    lru = cache.LicenseStateCache(ttl_seconds=3600)
    generation = lru.generation
    async with db.transaction() as session:
        loaded = await v.load(session, row.key_lookup)
    assert loaded is not None
    lru.invalidate_license(row.key_lookup)  # a writer committed after we read
    lru.put(row.key_lookup, loaded, generation=generation)
    assert len(lru) == 0


async def test_new_activation_is_seen_after_invalidation(db: Database, secrets: Secrets) -> None:
    _, row, key = await _licensed(db, secrets)
    lru = cache.LicenseStateCache(ttl_seconds=3600)
    assert (await run_validate(db, secrets, key, cache=lru, fingerprint="m1")).code is (
        Code.NO_ACTIVATION
    )
    async with db.transaction() as session:
        await activations.activate(session, SYSTEM, secrets.keyring, key, "m1")
        await changes.announce(session, lookup=row.key_lookup, to=lru.apply)
    assert (await run_validate(db, secrets, key, cache=lru, fingerprint="m1")).code is Code.VALID


def test_a_load_keeps_its_place_when_only_other_accounts_were_invalidated() -> None:
    """A migration run invalidates a batch of accounts every second or so: a load in flight
    for another account's license is still stored; one raced by its own account's or its own
    license's invalidation is not."""
    lru = cache.LicenseStateCache(ttl_seconds=3600)
    mine = cache.CachedLicense(state(license_id="L1", account_id="A1"), None)

    started = lru.generation
    for other in range(200):
        lru.invalidate_account(f"B{other}")
    lru.invalidate_license("k-other")
    lru.put("k1", mine, generation=started)
    assert lru.get("k1") is mine

    for raced_by in ("account:A1", "license:k1"):
        lru.clear()
        started = lru.generation
        lru.invalidate_account("B0")
        kind, key = raced_by.split(":")
        if kind == "account":
            lru.invalidate_account(key)
        else:
            lru.invalidate_license(key)
        lru.put("k1", mine, generation=started)
        assert lru.get("k1") is None, raced_by


def test_a_load_older_than_what_the_cache_remembers_is_not_stored() -> None:
    """Past ``TRACKED`` remembered invalidations they are forgotten, and a load that began
    before that is refused (its account's invalidation may be among the forgotten)."""
    lru = cache.LicenseStateCache(ttl_seconds=3600)
    lru.TRACKED = 10
    mine = cache.CachedLicense(state(license_id="L1", account_id="A1"), None)
    started = lru.generation
    for other in range(11):  # the eleventh finds ten remembered: all are forgotten
        lru.invalidate_account(f"B{other}")
    lru.put("k1", mine, generation=started)
    assert lru.get("k1") is None
    started = lru.generation  # a load that begins after the forgetting is stored
    lru.invalidate_account("B0")
    lru.put("k1", mine, generation=started)
    assert lru.get("k1") is mine

    lru.expire_all()  # as after a lost connection: every load in flight is refused
    lru.put("k1", mine, generation=started)
    assert lru.get("k1") is None


def test_cache_is_bounded() -> None:
    lru = cache.LicenseStateCache(ttl_seconds=60, max_entries=3)
    for i in range(5):
        entry = cache.CachedLicense(state(license_id=f"L{i}", account_id=f"A{i}"), None)
        lru.put(f"k{i}", entry, generation=lru.generation)
    assert len(lru) == 3
    assert lru.get("k0") is None and lru.get("k4") is not None


async def test_notify_reaches_another_process_cache(db: Database, secrets: Secrets) -> None:
    if db.dialect != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; SQLite relies on the TTL")
    _, row, key = await _licensed(db, secrets)
    other = cache.LicenseStateCache(ttl_seconds=3600)  # stands for another process's cache
    listener = await cache.start_listener(db.url, other)
    assert listener is not None and listener.connected.is_set()
    try:
        await run_validate(db, secrets, key, cache=other)
        assert len(other) == 1
        async with db.transaction() as session:
            await service.suspend_license(session, SYSTEM, row.id)
            # This process's cache is a different object: only the NOTIFY can reach `other`.
            await changes.announce(
                session, lookup=row.key_lookup, to=cache.LicenseStateCache().apply
            )
        for _ in range(100):
            if len(other) == 0:
                break
            await asyncio.sleep(0.02)
        assert len(other) == 0
        assert (await run_validate(db, secrets, key, cache=other)).code is Code.SUSPENDED
    finally:
        await listener.stop()
