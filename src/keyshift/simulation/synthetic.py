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

import hashlib
import itertools
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from keyshift.catalog.durations import Duration
from keyshift.catalog.entitlements import Entitlements
from keyshift.licensing import keys
from keyshift.metering.periods import period_containing
from keyshift.security.keyring import Keyring

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


def synthetic_id(seed: int, kind: str, *parts: int) -> str:
    """``uuid5(NAMESPACE, "seed:kind:part:…")`` as text, computed without ``uuid.UUID``
    objects (a million accounts need about ten million ids)."""
    name = ":".join((str(seed), kind, *map(str, parts))).encode()
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def license_key(seed: int, account_index: int, license_index: int) -> str:
    """The plaintext key of a synthetic license (derived, so reproducible from the seed)."""
    return keys.derive(f"keyshift-simulate:{seed}:{account_index}:{license_index}".encode())


class Generator:
    """Generates accounts in index order from one ``random.Random(seed)`` stream: call
    ``accounts`` with consecutive runs (0 to 999, then 1000 to 1999 …); the rows do not depend on how the
    indexes are cut into runs."""

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
        self.next_index = 0
        self._refs = [ref for ref, _ in PLAN_SHARES]
        self._weights = list(itertools.accumulate(weight for _, weight in PLAN_SHARES))
        self._regions = [region for region, _ in REGIONS]
        self._region_weights = list(itertools.accumulate(weight for _, weight in REGIONS))
        self._term_days = {ref: _term_days(plan.term) for ref, plan in plans.items()}

    def accounts(self, start: int, count: int) -> Rows:
        if start != self.next_index:
            raise ValueError(f"accounts are generated in order: next is {self.next_index}")
        rows = Rows()
        for index in range(start, start + count):
            self._account(index, rows)
        self.next_index = start + count
        return rows

    # -- one account ---------------------------------------------------------------------------

    def _account(self, index: int, rows: Rows) -> None:
        rng, seed, anchor = self.rng, self.seed, self.anchor
        ref = rng.choices(self._refs, cum_weights=self._weights)[0]
        plan = self.plans[ref]
        rows.plans[ref] = rows.plans.get(ref, 0) + 1
        account_id = synthetic_id(seed, "account", index)
        created = anchor - timedelta(days=rng.randint(60, 1500), seconds=rng.randrange(86_400))
        started = max(created, anchor - timedelta(days=rng.randint(20, 700)))
        status = "suspended" if rng.random() < SUSPENDED_ACCOUNTS else "active"
        rows.count("suspended_accounts", status == "suspended")
        attributes = self._attributes(ref, rows)
        preferences = (
            {"locale": rng.choice(("en", "de", "fr", "ja")), "theme": rng.choice(("dark", "light"))}
            if rng.random() < 0.6
            else {}
        )
        rows.tables["accounts"].append(
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
        rows.tables["subscriptions"].append(
            (account_id, key, version, plan.plan_hash, started, 1, self._addons(ref), started)
        )
        for number in range(self._license_count(plan)):
            self._license(index, number, account_id, plan, started, status, rows)
        self._counters(account_id, plan, started, rows)
        self._objects(index, account_id, ref, plan, created, rows)

    def _attributes(self, ref: str, rows: Rows) -> dict[str, Any]:
        rng = self.rng
        region = rng.choices(self._regions, cum_weights=self._region_weights)[0]
        attributes: dict[str, Any] = {"region": region, "segment": rng.choice(("smb", "mid"))}
        ineligible = False
        if ref == "pro-seat@2023" and rng.random() < 0.06:
            attributes["pinned_contract"] = "2023-terms"
            ineligible = True
        elif ref == "enterprise-seat@2025":
            attributes["downgrade_requested"] = rng.random() < 0.6
            if region == "eu" and rng.random() < 0.5:
                attributes["data_region"] = "eu-central"
            ineligible = not attributes["downgrade_requested"] or "data_region" in attributes
        elif ref == "pro-seat@2025":
            attributes["billing"] = "usage" if rng.random() < 0.5 else "seat"
            ineligible = attributes["billing"] != "usage" or region == "cn"
        rows.count("ineligible_accounts", ineligible)
        return attributes

    def _addons(self, ref: str) -> dict[str, Any]:
        rng = self.rng
        if ref == "pro-seat@2023" and rng.random() < 0.05:
            return {"addons": {"extra_storage": {"features": {}, "quotas": {"storage_gb": 100}}}}
        if ref == "enterprise-seat@2025" and rng.random() < 0.1:
            return {"addons": {"premium_sla": {"features": {"dedicated_support": "enabled"}}}}
        if ref == "pro-seat@2025" and rng.random() < 0.03:
            # No rule maps it in pro-seat-to-usage (addons_default = "refuse"): refused.
            return {"addons": {"onboarding": {"features": {}, "quotas": {"projects": 10}}}}
        return {}

    def _license_count(self, plan: Entitlements) -> int:
        if plan.model == "usage":
            return 1
        roll = self.rng.random()
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
        rng, anchor = self.rng, self.anchor
        license_id = synthetic_id(self.seed, "license", index, number)
        key = license_key(self.seed, index, number)
        sealed = self.keyring.seal(key.encode(), context=license_id.encode())
        term_days = self._term_days[plan.plan_ref]
        roll = rng.random()
        status = "active"
        if account_status == "suspended" or roll < SUSPENDED_LICENSES:
            status = "suspended"
        elif roll < SUSPENDED_LICENSES + REVOKED_LICENSES:
            status = "revoked"
        if term_days is None:
            expires = None
        elif rng.random() < EXPIRED_LICENSES:
            lapsed = timedelta(seconds=plan.grace_seconds, days=rng.randint(1, 60))
            expires = anchor - lapsed
            rows.count("expired_licenses")
        else:
            expires = anchor + timedelta(days=rng.randint(3, term_days), hours=rng.randrange(24))
        rows.count(f"{status}_licenses")
        cap = plan.max_activations
        override = cap + rng.randint(1, 5) if cap and rng.random() < 0.04 else None
        overrides: dict[str, Any] = {}
        if rng.random() < 0.03:
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
        machines = max(0, rng.randint(-seats // 3, seats))
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
        rng, anchor = self.rng, self.anchor
        if plan.lease_seconds:  # floating: seen within half a lease, so the lease runs
            seen = anchor - timedelta(seconds=rng.randrange(1, plan.lease_seconds // 2))
        else:
            seen = anchor - timedelta(minutes=rng.randint(1, 6_000))
        lease = plan.lease_until(seen)
        if lease is not None and rng.random() < LAPSED_LEASES:
            lease = anchor - timedelta(minutes=rng.randint(1, 10_000))
            rows.count("lapsed_leases")
        created = started + timedelta(
            seconds=rng.randrange(int((anchor - started).total_seconds()))
        )
        rows.tables["activations"].append(
            (
                synthetic_id(self.seed, "activation", index, number, machine),
                account_id,
                license_id,
                f"{rng.getrandbits(64):016x}-{machine}",
                plan.machine_mode,
                lease,
                seen,
                rng.choice(("laptop", "workstation", "build-agent", None)),
                created,
            )
        )

    def _counters(self, account_id: str, plan: Entitlements, started: datetime, rows: Rows) -> None:
        rng, anchor = self.rng, self.anchor
        for meter, spec in plan.meters.items():
            if spec.get("aggregation") == "unique":
                continue  # its counter is the count of member rows: none are made
            current = period_containing(spec["reset"], started, anchor, term=plan.term)
            included = int(spec["included"])
            over = rng.random() < 0.1
            used = int(included * (rng.uniform(1.0, 1.5) if over else rng.uniform(0, 0.95)))
            rows.count("counters_over_included", over)
            periods = [(current, used)]
            if current.start > started and rng.random() < 0.5:
                before = period_containing(
                    spec["reset"], started, current.start - timedelta(seconds=1), term=plan.term
                )
                periods.append((before, int(included * rng.uniform(0, 1.2))))
            for span, value in periods:
                rows.tables["usage_counters"].append(
                    (account_id, meter, span.start, span.end, value, anchor)
                )

    def _objects(
        self,
        index: int,
        account_id: str,
        ref: str,
        plan: Entitlements,
        created: datetime,
        rows: Rows,
    ) -> None:
        """Data objects per quota the plan has: a few projects, stored data, links; on a source
        plan some accounts hold more than the target plan allows."""
        rng = self.rng
        target = self.plans[TARGETS[ref]] if ref in TARGETS else None
        units: list[tuple[str, int]] = []
        over_any = False
        for quota, limit in sorted(plan.quotas.items()):
            if quota in ("api_calls_per_month", "automation_runs_per_month"):
                continue  # metered, not stored
            target_limit = target.quotas.get(quota) if target else None
            # Over the target: often where the target lowers the quota, rarely elsewhere.
            lowered = target_limit is not None and target_limit < limit
            rate = OVER_TARGET_QUOTA if lowered else OVER_UNCHANGED_QUOTA
            if target_limit is not None and rng.random() < rate:
                total = rng.randint(
                    target_limit + 1, max(target_limit + 2, limit, target_limit * 2)
                )
                over_any = True
            elif quota == "seats":
                continue  # filed by few applications
            else:
                room = min(limit, target_limit) if target_limit is not None else limit
                total = min(room, rng.choice((0, 1, 2, 3, 5, 8)) * max(1, room // 40))
            pieces = min(total, rng.randint(1, 4)) if total else 0
            for piece in range(pieces):
                share = total // pieces + (1 if piece < total % pieces else 0)
                units.append((quota, share))
        rows.count("over_target_quota_accounts", over_any)
        span = int((self.anchor - created).total_seconds())
        for number, (quota, amount) in enumerate(units):
            object_id = synthetic_id(self.seed, "object", index, number)
            content = f"{quota} {number} of account {index} (seed {self.seed})".encode()
            when = created + timedelta(seconds=rng.randrange(span))
            rows.tables["data_objects"].append(
                (
                    object_id,
                    account_id,
                    quota,
                    f"{quota}-{number}",
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
