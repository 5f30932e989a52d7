"""An account's state as plain JSON data: what a snapshot holds, what the planner expects after
a migration, and what rollback must give back. Pure: no I/O.

The shape is declared as TypedDicts (``Snapshot``, ``ExpectedState`` and their parts): the
values stay plain dicts, so their canonical JSON and hashes are the data's own, and
tests/migration/test_state_shape.py checks real states against the declarations.

Shape (every list sorted by id, every instant an RFC 3339 string)::

    {"account": {id, name, status, external_ref, attributes, preferences},
     "subscription": {plan, plan_hash, started_at, overrides} | None,
     "licenses": [{id, key_lookup, status, expires_at, max_activations_override, overrides}],
     "activations": [{id, license_id, fingerprint, mode, label, created_at,
                      last_seen_at, lease_expires_at}],
     "counters": [{meter, period_start, period_end, used}],      # current periods only
     "objects": [{id, quota, name, units, tier, state, content_hash, created_at}],
     "taken_at": "…"}

``state_hash`` hashes it without the fields that move on their own while a migration runs
(a heartbeat's ``last_seen_at``/``lease_expires_at``, ``taken_at``): those are restored
exactly by rollback but are not the migration's to prove.
"""

from __future__ import annotations

import hashlib
import operator
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NotRequired, TypeVar, cast, overload

from pydantic import ConfigDict, with_config

# typing_extensions' TypedDict: pydantic reads its shape on Python 3.11 (typing's from 3.12).
from typing_extensions import TypedDict

from keyshift import dates
from keyshift.canonical import content_hash

#: Free-form JSON the account's owner gives (attributes, preferences): carried, never read
#: by shape.
JsonObject = dict[str, Any]

# Each shape forbids keys it does not name, so a test validating a real snapshot against it
# (tests/migration/test_state_shape.py) fails when the code and the types drift apart.
_EXACT = ConfigDict(extra="forbid")


@with_config(_EXACT)
class AccountData(TypedDict):
    id: str
    name: str
    status: str
    external_ref: str | None
    attributes: JsonObject
    preferences: JsonObject


@with_config(_EXACT)
class FeatureGrantData(TypedDict):
    """``FeatureGrant.to_dict()``: ``limit`` and ``period`` only when throttled."""

    mode: str
    limit: NotRequired[int | None]
    period: NotRequired[str | None]


@with_config(_EXACT)
class GrantsData(TypedDict):
    """Hand-set features (``enabled``/``disabled``) and extra quota units: an add-on, or a
    license's overrides (where either kind may be left out)."""

    features: NotRequired[dict[str, str]]
    quotas: NotRequired[dict[str, int]]


@with_config(_EXACT)
class EntitlementsView(TypedDict):
    """Features and quotas as a plan and its add-ons grant them (``planner.effective_view``)."""

    features: dict[str, FeatureGrantData]
    quotas: dict[str, int]


@with_config(_EXACT)
class PreviousView(EntitlementsView):
    """The whole grant before a downgrade (``planner.previous_view``)."""

    plan: str
    edition: str


@with_config(_EXACT)
class GraceData(TypedDict):
    until: str
    entitlements: EntitlementsView
    previous: NotRequired[PreviousView]  # absent from graces planned before it was recorded


@with_config(_EXACT)
class IncludedData(TypedDict):
    included: int


@with_config(_EXACT)
class SubscriptionOverrides(TypedDict, total=False):
    """What an account has beyond its plan (``Subscription.overrides``; see
    ``catalog.entitlements.with_overrides``)."""

    addons: dict[str, GrantsData]
    read_only: list[str]  # quota names
    grace: GraceData
    meters: dict[str, IncludedData]


@with_config(_EXACT)
class SubscriptionData(TypedDict):
    plan: str  # key@version
    plan_hash: str
    started_at: str
    overrides: SubscriptionOverrides


@with_config(_EXACT)
class LicenseData(TypedDict):
    id: str
    key_lookup: str
    status: str
    expires_at: str | None
    max_activations_override: int | None
    overrides: GrantsData


@with_config(_EXACT)
class ActivationData(TypedDict):
    id: str
    license_id: str
    fingerprint: str
    mode: str  # node | floating
    label: str | None
    created_at: str
    last_seen_at: str
    lease_expires_at: str | None


@with_config(_EXACT)
class CounterData(TypedDict):
    meter: str
    period_start: str
    period_end: str
    used: int


@with_config(_EXACT)
class ObjectData(TypedDict):
    id: str
    quota: str
    name: str
    units: int
    tier: str  # standard | archive
    state: str  # active | superseded
    content_hash: str
    created_at: str


@with_config(_EXACT)
class ExpectedState(TypedDict):
    """An account's state without the time it was read: what the planner expects after a
    migration (``MigrationPlan.expected``)."""

    account: AccountData
    subscription: SubscriptionData | None
    licenses: list[LicenseData]
    activations: list[ActivationData]
    counters: list[CounterData]  # current periods only
    objects: list[ObjectData]


@with_config(_EXACT)
class Snapshot(ExpectedState):
    """An account's state as read at ``taken_at`` (``repository.read_state``; stored as
    ``Migration.snapshot``)."""

    taken_at: str


_S = TypeVar("_S", ExpectedState, Snapshot)

#: Fields kept in a snapshot but left out of its hash: they change without any migration.
VOLATILE_ACTIVATION_FIELDS = ("last_seen_at", "lease_expires_at")

#: The namespace of ids the migration derives (archive copies): the same inputs, the same id,
#: so a resumed step recreates nothing.
_NAMESPACE = uuid.UUID("6f1c1f1e-6b9a-4d1e-9a55-4b657973686d")


@overload
def iso(value: datetime) -> str: ...
@overload
def iso(value: None) -> None: ...
@overload
def iso(value: datetime | None) -> str | None: ...
def iso(value: datetime | None) -> str | None:
    """``keyshift.dates.rfc3339``, typed for the state's fields (a datetime gives a str)."""
    return dates.rfc3339(value)


def as_snapshot(stored: dict[str, Any] | None) -> Snapshot:
    """A snapshot as stored (``Migration.snapshot``: JSON, written from a ``Snapshot``) read
    back as its shape. A migration without one reads as empty, as the steps always have."""
    return cast(Snapshot, stored or {})


def parse_iso(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def hashable(state: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a state its hash covers (any mapping shaped like one: ``normalise`` and
    verification hash and compare partial or rebuilt states)."""
    view = dict(state)
    view.pop("taken_at", None)
    activations = []
    for activation in state.get("activations", []):
        row = dict(activation)
        for name in VOLATILE_ACTIVATION_FIELDS:
            row.pop(name, None)
        activations.append(row)
    view["activations"] = activations
    return view


def state_hash(state: Mapping[str, Any]) -> str:
    return content_hash(hashable(state))


#: The SHA-1 of the namespace, to go on from (``uuid.uuid5`` hashes it first every time).
_NAMESPACE_SHA1 = hashlib.sha1(_NAMESPACE.bytes)


def derived_id(migration_id: str, kind: str, source_id: str) -> str:
    """A deterministic id for something a migration creates (e.g. an object's archive copy):
    ``uuid5(_NAMESPACE, "migration:kind:source")``, as ``uuid.uuid5`` makes it."""
    sha1 = _NAMESPACE_SHA1.copy()
    sha1.update(f"{migration_id}:{kind}:{source_id}".encode())
    return str(uuid.UUID(bytes=sha1.digest()[:16], version=5))


def counter_key(counter: CounterData) -> tuple[str, str]:
    return counter["meter"], counter["period_start"]


_BY_ID = operator.itemgetter("id")
_BY_COUNTER_KEY = operator.itemgetter("meter", "period_start")  # as ``counter_key``


def sort_state(state: _S) -> _S:
    """Lists in their canonical order (ids; counters by meter and period)."""
    state["licenses"] = sorted(state["licenses"], key=_BY_ID)
    state["activations"] = sorted(state["activations"], key=_BY_ID)
    state["objects"] = sorted(state["objects"], key=_BY_ID)
    state["counters"] = sorted(state["counters"], key=_BY_COUNTER_KEY)
    return state


def differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Human-readable paths where two states' hashed parts differ (empty: equal)."""
    out: list[str] = []

    def walk(path: str, a: Any, b: Any) -> None:
        if a == b:  # one comparison in C for the common case: nothing differs below
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(f"{path}.{key}" if path else str(key), a.get(key), b.get(key))
        elif isinstance(a, list) and isinstance(b, list) and _by_id(a) and _by_id(b):
            left = {row["id"]: row for row in a}
            right = {row["id"]: row for row in b}
            for key in sorted(set(left) | set(right)):
                walk(f"{path}[{key}]", left.get(key), right.get(key))
        elif a != b:
            out.append(f"{path}: expected {a!r}, found {b!r}")

    walk("", hashable(expected), hashable(actual))
    return out


def _by_id(rows: list[Any]) -> bool:
    return all(isinstance(r, dict) and "id" in r for r in rows)
