"""Synthetic accounts, generated from a seed: the rows of each account-owned table for a run of
account indexes, the same rows for the same seed, plan grants and anchor instant. No I/O: the
seeding (``keyshift.simulation.seed``) writes what this returns.

The spread (``PLAN_SHARES`` and the rates below) puts most accounts on the plans the example
migration rules start from, and gives each rules file something to decide: accounts over the
target plan's quotas, suspended accounts and licenses, expired and revoked licenses, lapsed
floating leases, add-ons, hand-set license caps and features, and accounts the rules' eligibility
leaves out (a pinned contract, a data region, no usage billing asked for).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from keyshift.catalog.durations import Duration
from keyshift.catalog.entitlements import Entitlements
from keyshift.licensing import keys
from keyshift.metering.periods import period_containing
from keyshift.security.keyring import Keyring

T = TypeVar("T")

#: The namespace of every synthetic id: uuid5 over ``seed:kind:index…``.
NAMESPACE = uuid.UUID("9b0c6a43-5d1f-4c3e-8f0e-73696d756c61")

#: Plans and their share of accounts (weights). The first three are the sources of the example
#: migration rules (``examples/migrations``): about two thirds of all accounts.
PLAN_SHARES: tuple[tuple[str, int], ...] = (
    ("pro-seat@2023", 40),  # → pro-seat@2025 (pro-2023-to-2025.toml)
    ("pro-seat@2025", 15),  # → pro-usage@2025 (pro-seat-to-usage-2025.toml)
    ("enterprise-seat@2025", 8),  # → team-seat@2025 (enterprise-to-team-downgrade.toml)
    ("team-seat@2023", 12),
    ("team-seat@2025", 8),
    ("pro-usage@2025", 8),
    ("starter-usage@2025", 9),
)
#: Each source plan's target in the example rules: "over quota" is measured against it.
TARGETS: dict[str, str] = {
    "pro-seat@2023": "pro-seat@2025",
    "pro-seat@2025": "pro-usage@2025",
    "enterprise-seat@2025": "team-seat@2025",
}
PLAN_REFS: tuple[str, ...] = tuple(sorted({ref for ref, _ in PLAN_SHARES} | set(TARGETS.values())))

SUSPENDED_ACCOUNTS = 0.04
OVER_TARGET_QUOTA = 0.12  # of the accounts on a source plan, per quota the target lowers
OVER_UNCHANGED_QUOTA = 0.02  # per quota the target keeps or raises (over it already)
EXPIRED_LICENSES = 0.03
SUSPENDED_LICENSES = 0.02
REVOKED_LICENSES = 0.01
LAPSED_LEASES = 0.2
REGIONS = (("us", 40), ("eu", 35), ("apac", 20), ("cn", 5))

#: Columns of each table, in the order of the tuples ``Rows`` holds.
COLUMNS: dict[str, tuple[str, ...]] = {
    "accounts": (
        "id",
        "name",
        "external_ref",
        "status",
        "attributes",
        "preferences",
        "created_at",
        "updated_at",
    ),
    "subscriptions": (
        "account_id",
        "plan_key",
        "plan_version",
        "plan_hash",
        "started_at",
        "entitlements_version",
        "overrides",
        "updated_at",
    ),
    "licenses": (
        "id",
        "account_id",
        "key_lookup",
        "key_ciphertext",
        "key_kid",
        "key_hint",
        "status",
        "expires_at",
        "max_activations_override",
        "overrides",
        "version",
        "created_at",
        "updated_at",
    ),
    "activations": (
        "id",
        "account_id",
        "license_id",
        "fingerprint",
        "mode",
        "lease_expires_at",
        "last_seen_at",
        "label",
        "created_at",
    ),
    "usage_counters": (
        "account_id",
        "meter",
        "period_start",
        "period_end",
        "used",
        "updated_at",
    ),
    "data_objects": (
        "id",
        "account_id",
        "quota",
        "name",
        "units",
        "tier",
        "state",
        "content",
        "content_hash",
        "migration_id",
        "created_at",
    ),
}
TABLES: tuple[str, ...] = tuple(COLUMNS)  # in foreign-key order


@dataclass
class Rows:
    """The rows of one run of accounts, per table (tuples in ``COLUMNS`` order), and tallies."""

    tables: dict[str, list[tuple[Any, ...]]] = field(
        default_factory=lambda: {name: [] for name in TABLES}
    )
    plans: dict[str, int] = field(default_factory=dict)
    tallies: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, by: int = 1) -> None:
        self.tallies[name] = self.tallies.get(name, 0) + by


def anchor_at(now: datetime) -> datetime:
    """The anchor for ``now``: every synthetic instant is set relative to it, to the second
    (the same seed and anchor give the same rows; leases and expiries run from it)."""
    return now.astimezone(UTC).replace(microsecond=0)


_NAMESPACE_BYTES = NAMESPACE.bytes
#: uuid5's variant (RFC 4122: the top two bits 10) over the hex digit that carries it.
_VARIANT_DIGIT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def synthetic_id(seed: int, kind: str, *parts: int) -> str:
    """``uuid5(NAMESPACE, "seed:kind:part:…")`` as text, computed without ``uuid.UUID``
    objects (a million accounts need about ten million ids)."""
    name = ":".join((str(seed), kind, *map(str, parts))).encode()
    return _uuid5_text(hashlib.sha1(_NAMESPACE_BYTES + name).digest())


def _uuid5_text(sha1: bytes) -> str:
    """The first 16 bytes of the SHA-1 as a uuid, its version digit 5 and its variant set."""
    h = sha1.hex()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:32]}"


class _Ids:
    """``synthetic_id(seed, kind, …)`` for one seed and kind, the SHA-1 of the common prefix
    computed once (the generator makes about ten ids per account)."""

    def __init__(self, seed: int, kind: str) -> None:
        self._prefix = hashlib.sha1(_NAMESPACE_BYTES + f"{seed}:{kind}:".encode())

    def __call__(self, parts: str) -> str:
        """The id of ``parts``, the indexes already joined with ``:``."""
        sha1 = self._prefix.copy()
        sha1.update(parts.encode())
        return _uuid5_text(sha1.digest())


def license_key(seed: int, account_index: int, license_index: int) -> str:
    """The plaintext key of a synthetic license (derived, so reproducible from the seed)."""
    return keys.derive(f"keyshift-simulate:{seed}:{account_index}:{license_index}".encode())


#: The choices the generator makes, kept in tuples once (``rng.choice`` draws an index).
_LOCALES = ("en", "de", "fr", "ja")
_THEMES = ("dark", "light")
_SEGMENTS = ("smb", "mid")
_LABELS = ("laptop", "workstation", "build-agent", None)
_OBJECT_SIZES = (0, 1, 2, 3, 5, 8)
#: Quotas that are metered, not stored: no data objects for them.
_METERED_QUOTAS = frozenset(("api_calls_per_month", "automation_runs_per_month"))


@dataclass(frozen=True)
class _Quota:
    """One stored quota of a plan, against the target plan's (if the plan is a source)."""

    name: str
    limit: int
    target_limit: int | None
    over_rate: float


class Generator:
    """Generates accounts in index order from one ``random.Random(seed)`` stream: call
    ``accounts`` with consecutive runs (0 to 999, then 1000 to 1999 …); the rows do not depend
    on how the indexes are cut into runs.

    The draws are made through ``getrandbits`` and ``random`` directly, as
    ``random.Random``'s ``randrange``, ``randint``, ``choice`` and ``choices`` make them in
    CPython (the same numbers, without their argument checks): generation is most of the cost
    of a seed, and a million accounts make about fifty million draws."""

    def __init__(
        self,
        seed: int,
        plans: Mapping[str, Entitlements],
        keyring: Keyring,
        anchor: datetime,
    ) -> None:
        missing = [ref for ref in PLAN_REFS if ref not in plans]
        if missing:
            raise ValueError(f"plans missing from the catalog: {', '.join(missing)}")
        self.seed, self.plans, self.keyring, self.anchor = seed, plans, keyring, anchor
        self.rng = random.Random(seed)
        self._bits = self.rng.getrandbits
        self._random = self.rng.random
        self.next_index = 0
        self._refs = [ref for ref, _ in PLAN_SHARES]
        self._weights = list(itertools.accumulate(weight for _, weight in PLAN_SHARES))
        self._regions = [region for region, _ in REGIONS]
        self._region_weights = list(itertools.accumulate(weight for _, weight in REGIONS))
        self._term_days = {ref: _term_days(plan.term) for ref, plan in plans.items()}
        self._quotas = {ref: self._stored_quotas(ref) for ref, _ in PLAN_SHARES}
        self._account_id = _Ids(seed, "account")
        self._license_id = _Ids(seed, "license")
        self._activation_id = _Ids(seed, "activation")
        self._object_id = _Ids(seed, "object")

    def accounts(self, start: int, count: int) -> Rows:
        if start != self.next_index:
            raise ValueError(f"accounts are generated in order: next is {self.next_index}")
        rows = Rows()
        for index in range(start, start + count):
            self._account(index, rows)
        self.next_index = start + count
        return rows

    # -- draws, as random.Random makes them --------------------------------------------------

    def _below(self, n: int) -> int:
        """``randrange(n)``: an int in [0, n), by rejection over ``n.bit_length()`` bits."""
        if n <= 0:
            raise ValueError("empty range")
        bits, k = self._bits, n.bit_length()
        r = bits(k)
        while r >= n:
            r = bits(k)
        return r

    def _between(self, low: int, high: int) -> int:
        """``randint(low, high)``: both ends included."""
        return low + self._below(high - low + 1)

    def _pick(self, population: Sequence[T], cum_weights: list[int]) -> T:
        """``choices(population, cum_weights=…)[0]``."""
        return population[
            bisect.bisect(
                cum_weights, self._random() * (cum_weights[-1] + 0.0), 0, len(cum_weights) - 1
            )
        ]

    # -- one account ---------------------------------------------------------------------------

    def _account(self, index: int, rows: Rows) -> None:
        seed, anchor, random_, below = self.seed, self.anchor, self._random, self._below
        ref = self._pick(self._refs, self._weights)
        plan = self.plans[ref]
        rows.plans[ref] = rows.plans.get(ref, 0) + 1
        account_id = self._account_id(str(index))
        created = anchor - timedelta(days=60 + below(1441), seconds=below(86_400))
        started = max(created, anchor - timedelta(days=20 + below(681)))
        status = "suspended" if random_() < SUSPENDED_ACCOUNTS else "active"
        rows.count("suspended_accounts", status == "suspended")
        attributes = self._attributes(ref, rows)
        preferences = (
            {"locale": _LOCALES[below(4)], "theme": _THEMES[below(2)]} if random_() < 0.6 else {}
        )
        tables = rows.tables
        tables["accounts"].append(
            (
                account_id,
                f"Sim {seed}/{index:07d}",
                f"sim-{seed}-{index}",
                status,
                attributes,
                preferences,
                created,
                created,
            )
        )
        key, version = ref.split("@", 1)
        tables["subscriptions"].append(
            (account_id, key, version, plan.plan_hash, started, 1, self._addons(ref), started)
        )
        for number in range(self._license_count(plan)):
            self._license(index, number, account_id, plan, started, status, rows)
        self._counters(account_id, plan, started, rows)
        self._objects(index, account_id, ref, created, rows)

    def _attributes(self, ref: str, rows: Rows) -> dict[str, Any]:
        random_ = self._random
        region = self._pick(self._regions, self._region_weights)
        attributes: dict[str, Any] = {"region": region, "segment": _SEGMENTS[self._below(2)]}
        ineligible = False
        if ref == "pro-seat@2023" and random_() < 0.06:
            attributes["pinned_contract"] = "2023-terms"
            ineligible = True
        elif ref == "enterprise-seat@2025":
            attributes["downgrade_requested"] = random_() < 0.6
            if region == "eu" and random_() < 0.5:
                attributes["data_region"] = "eu-central"
            ineligible = not attributes["downgrade_requested"] or "data_region" in attributes
        elif ref == "pro-seat@2025":
            attributes["billing"] = "usage" if random_() < 0.5 else "seat"
            ineligible = attributes["billing"] != "usage" or region == "cn"
        rows.count("ineligible_accounts", ineligible)
        return attributes

    def _addons(self, ref: str) -> dict[str, Any]:
        random_ = self._random
        if ref == "pro-seat@2023" and random_() < 0.05:
            return {"addons": {"extra_storage": {"features": {}, "quotas": {"storage_gb": 100}}}}
        if ref == "enterprise-seat@2025" and random_() < 0.1:
            return {"addons": {"premium_sla": {"features": {"dedicated_support": "enabled"}}}}
        if ref == "pro-seat@2025" and random_() < 0.03:
            # No rule maps it in pro-seat-to-usage (addons_default = "refuse"): refused.
            return {"addons": {"onboarding": {"features": {}, "quotas": {"projects": 10}}}}
        return {}

    def _license_count(self, plan: Entitlements) -> int:
        if plan.model == "usage":
            return 1
        roll = self._random()
        return 1 if roll < 0.75 else 2 if roll < 0.95 else 3

    def _license(
        self,
        index: int,
        number: int,
        account_id: str,
        plan: Entitlements,
        started: datetime,
        account_status: str,
        rows: Rows,
    ) -> None:
        anchor, random_, between = self.anchor, self._random, self._between
        license_id = self._license_id(f"{index}:{number}")
        key = license_key(self.seed, index, number)
        sealed = self.keyring.seal(key.encode(), context=license_id.encode())
        term_days = self._term_days[plan.plan_ref]
        roll = random_()
        status = "active"
        if account_status == "suspended" or roll < SUSPENDED_LICENSES:
            status = "suspended"
        elif roll < SUSPENDED_LICENSES + REVOKED_LICENSES:
            status = "revoked"
        if term_days is None:
            expires = None
        elif random_() < EXPIRED_LICENSES:
            lapsed = timedelta(seconds=plan.grace_seconds, days=between(1, 60))
            expires = anchor - lapsed
            rows.count("expired_licenses")
        else:
            expires = anchor + timedelta(days=between(3, term_days), hours=self._below(24))
        rows.count(f"{status}_licenses")
        cap = plan.max_activations
        override = cap + between(1, 5) if cap and random_() < 0.04 else None
        overrides: dict[str, Any] = {}
        if random_() < 0.03:
            overrides = {"features": {"advanced_reports": "enabled"}}
        rows.tables["licenses"].append(
            (
                license_id,
                account_id,
                self.keyring.lookup_hash(key),
                sealed.ciphertext,
                sealed.kid,
                keys.hint(key),
                status,
                expires,
                override,
                overrides,
                1,
                started,
                started,
            )
        )
        seats = min(override or cap or 3, 6)
        # No machine on one license in 3 * seats + 1; each other number equally likely.
        machines = max(0, between(-seats // 3, seats))
        for machine in range(machines):
            self._activation(index, number, machine, account_id, license_id, plan, started, rows)

    def _activation(
        self,
        index: int,
        number: int,
        machine: int,
        account_id: str,
        license_id: str,
        plan: Entitlements,
        started: datetime,
        rows: Rows,
    ) -> None:
        anchor, below = self.anchor, self._below
        if plan.lease_seconds:  # floating: seen within half a lease, so the lease runs
            seen = anchor - timedelta(seconds=1 + below(plan.lease_seconds // 2 - 1))
        else:
            seen = anchor - timedelta(minutes=1 + below(6_000))
        lease = plan.lease_until(seen)
        if lease is not None and self._random() < LAPSED_LEASES:
            lease = anchor - timedelta(minutes=1 + below(10_000))
            rows.count("lapsed_leases")
        created = started + timedelta(seconds=below(int((anchor - started).total_seconds())))
        rows.tables["activations"].append(
            (
                self._activation_id(f"{index}:{number}:{machine}"),
                account_id,
                license_id,
                f"{self._bits(64):016x}-{machine}",
                plan.machine_mode,
                lease,
                seen,
                _LABELS[below(4)],
                created,
            )
        )

    def _counters(self, account_id: str, plan: Entitlements, started: datetime, rows: Rows) -> None:
        anchor, random_ = self.anchor, self._random
        for meter, spec in plan.meters.items():
            if spec.get("aggregation") == "unique":
                continue  # its counter is the count of member rows: none are made
            current = period_containing(spec["reset"], started, anchor, term=plan.term)
            included = int(spec["included"])
            over = random_() < 0.1
            # uniform(a, b) is a + (b - a) * random()
            used = int(included * (1.0 + 0.5 * random_() if over else 0.95 * random_()))
            rows.count("counters_over_included", over)
            periods = [(current, used)]
            if current.start > started and random_() < 0.5:
                before = period_containing(
                    spec["reset"], started, current.start - timedelta(seconds=1), term=plan.term
                )
                periods.append((before, int(included * (1.2 * random_()))))
            for span, value in periods:
                rows.tables["usage_counters"].append(
                    (account_id, meter, span.start, span.end, value, anchor)
                )

    def _stored_quotas(self, ref: str) -> tuple[_Quota, ...]:
        plan = self.plans[ref]
        target = self.plans[TARGETS[ref]] if ref in TARGETS else None
        quotas = []
        for quota, limit in sorted(plan.quotas.items()):
            if quota in _METERED_QUOTAS:
                continue
            target_limit = target.quotas.get(quota) if target else None
            # Over the target: often where the target lowers the quota, rarely elsewhere.
            lowered = target_limit is not None and target_limit < limit
            rate = OVER_TARGET_QUOTA if lowered else OVER_UNCHANGED_QUOTA
            quotas.append(_Quota(quota, limit, target_limit, rate))
        return tuple(quotas)

    def _objects(
        self,
        index: int,
        account_id: str,
        ref: str,
        created: datetime,
        rows: Rows,
    ) -> None:
        """Data objects per quota the plan has: a few projects, stored data, links; on a source
        plan some accounts hold more than the target plan allows."""
        random_, below, between = self._random, self._below, self._between
        units: list[tuple[str, int]] = []
        over_any = False
        for quota in self._quotas[ref]:
            target_limit, limit = quota.target_limit, quota.limit
            if target_limit is not None and random_() < quota.over_rate:
                total = between(target_limit + 1, max(target_limit + 2, limit, target_limit * 2))
                over_any = True
            elif quota.name == "seats":
                continue  # filed by few applications
            else:
                room = min(limit, target_limit) if target_limit is not None else limit
                total = min(room, _OBJECT_SIZES[below(6)] * max(1, room // 40))
            pieces = min(total, between(1, 4)) if total else 0
            for piece in range(pieces):
                share = total // pieces + (1 if piece < total % pieces else 0)
                units.append((quota.name, share))
        rows.count("over_target_quota_accounts", over_any)
        if not units:
            return
        span = int((self.anchor - created).total_seconds())
        seed, object_id, append = self.seed, self._object_id, rows.tables["data_objects"].append
        for number, (quota_name, amount) in enumerate(units):
            content = f"{quota_name} {number} of account {index} (seed {seed})".encode()
            when = created + timedelta(seconds=below(span))
            append(
                (
                    object_id(f"{index}:{number}"),
                    account_id,
                    quota_name,
                    f"{quota_name}-{number}",
                    amount,
                    "standard",
                    "active",
                    content,
                    hashlib.sha256(content).hexdigest(),
                    None,
                    when,
                )
            )


def _term_days(term: str) -> int | None:
    """A term's length in days (a calendar term measured from a fixed day), None: perpetual."""
    if term == "perpetual":
        return None
    base = datetime(2025, 1, 1, tzinfo=UTC)
    return max(1, (Duration.parse(term).after(base) - base).days)
