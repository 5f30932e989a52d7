"""An account's state as plain JSON data: what a snapshot holds, what the planner expects after
a migration, and what rollback must give back. Pure: no I/O.

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

import copy
import uuid
from datetime import UTC, datetime
from typing import Any

from keyshift.canonical import content_hash

State = dict[str, Any]

#: Fields kept in a snapshot but left out of its hash: they change without any migration.
VOLATILE_ACTIVATION_FIELDS = ("last_seen_at", "lease_expires_at")

#: The namespace of ids the migration derives (archive copies): the same inputs, the same id,
#: so a resumed step recreates nothing.
_NAMESPACE = uuid.UUID("6f1c1f1e-6b9a-4d1e-9a55-4b657973686d")


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_iso(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def hashable(state: State) -> State:
    """The part of a state its hash covers."""
    view = {k: v for k, v in state.items() if k != "taken_at"}
    view["activations"] = [
        {k: v for k, v in a.items() if k not in VOLATILE_ACTIVATION_FIELDS}
        for a in state.get("activations", [])
    ]
    return view


def state_hash(state: State) -> str:
    return content_hash(hashable(state))


def derived_id(migration_id: str, kind: str, source_id: str) -> str:
    """A deterministic id for something a migration creates (e.g. an object's archive copy)."""
    return str(uuid.uuid5(_NAMESPACE, f"{migration_id}:{kind}:{source_id}"))


def deep_copy(state: State) -> State:
    return copy.deepcopy(state)


def counter_key(counter: dict[str, Any]) -> tuple[str, str]:
    return counter["meter"], counter["period_start"]


def sort_state(state: State) -> State:
    """Lists in their canonical order (ids; counters by meter and period)."""
    for name in ("licenses", "activations", "objects"):
        state[name] = sorted(state.get(name, []), key=lambda row: row["id"])
    state["counters"] = sorted(state.get("counters", []), key=counter_key)
    return state


def differences(expected: State, actual: State) -> list[str]:
    """Human-readable paths where two states' hashed parts differ (empty: equal)."""
    out: list[str] = []

    def walk(path: str, a: Any, b: Any) -> None:
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
