"""What the planner and the state reader give for a seeded synthetic dataset, as hashes: the
reference ``test_planner_outputs.py`` compares the current code with, so a change made for speed
is proven to change no output byte.

``outputs(db)`` seeds the dataset into ``db`` (an empty, migrated database), reads every
account's state with ``repository.read_states`` and plans it under each rules file of
``RULES``. Run as a script, it writes the fixture from a scratch SQLite file and checks that a
scratch PostgreSQL database gives the same (``--no-postgres`` to skip that)::

    .venv/bin/python -m tests.migration.planner_reference [--no-postgres]

Regenerate the fixture only on purpose, when an output is meant to change (and say so in the
commit), never to make the test pass after an optimisation.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from keyshift.canonical import canonical_json, content_hash, sha256_hex
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.migrate import upgrade_to_head
from keyshift.migration import repository
from keyshift.migration.executor import plan_pair
from keyshift.migration.loader import load_rules
from keyshift.migration.planner import MigrationPlan, plan_migration
from keyshift.migration.rules import MigrationRules, PlanPair, check_against_catalog
from keyshift.migration.state import Snapshot, state_hash
from keyshift.security.keyring import Keyring
from keyshift.simulation.seed import seed
from keyshift.simulation.synthetic import synthetic_id

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "examples" / "catalog"
FIXTURE = Path(__file__).resolve().parent / "data" / "planner_outputs.json"
#: The example rules, and test rules that reach the policies the examples leave out (counters
#: converted, reset and prorated; grace, read-only and trimmed machines on usage plans; caps
#: pinned; renames; two source plans).
RULES = (
    *sorted((ROOT / "examples" / "migrations").glob("*.toml")),
    *sorted((Path(__file__).resolve().parent / "data" / "rules").glob("*.toml")),
)
SEED = 77
ACCOUNTS = 400
#: A fixed keyring and anchor, as tests/simulation/test_seed.py pins them: the same rows.
KEYRING = Keyring(active="k1", keys={"k1": b"k" * 32}, lookup_key=b"l" * 32)
ANCHOR = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
#: When the states are read and the plans made: 45 minutes after the anchor, so some floating
#: leases (an hour long, renewed within half of it) have lapsed since and some have not.
NOW = ANCHOR + timedelta(minutes=45)
MIGRATION_ID = "00000000-0000-4000-8000-0000000000aa"


def account_ids() -> list[str]:
    return [synthetic_id(SEED, "account", i) for i in range(ACCOUNTS)]


async def seed_dataset(db: Database) -> None:
    await seed(
        db,
        accounts=ACCOUNTS,
        seed=SEED,
        keyring=KEYRING,
        actor=SYSTEM,
        catalog_dir=CATALOG,
        at=ANCHOR,
        chunk=150,
    )


async def read(db: Database) -> list[Snapshot]:
    async with db.transaction() as session:
        return await repository.read_states(session, account_ids(), NOW)


async def plan_pairs(db: Database, rules: list[MigrationRules]) -> dict[str, PlanPair]:
    """Every plan a rules file or an account names, with its edition."""
    from keyshift.simulation.synthetic import PLAN_REFS

    refs = set(PLAN_REFS)
    for r in rules:
        refs.update(r.rules.from_plans)
        refs.add(r.rules.to)
    out: dict[str, PlanPair] = {}
    async with db.transaction() as session:
        for ref in sorted(refs):
            pair = await plan_pair(session, ref)
            assert pair is not None, ref
            out[ref] = pair
    return out


def load_all_rules() -> list[MigrationRules]:
    return [load_rules(path)[0] for path in RULES]


def plan_all(
    states: list[Snapshot], rules: list[MigrationRules], pairs: dict[str, PlanPair]
) -> dict[str, list[MigrationPlan]]:
    """Each rules file's plan of every account (eligible or not), by rules ref."""
    out: dict[str, list[MigrationPlan]] = {}
    for r in rules:
        problems = check_against_catalog(
            r, {ref: pairs.get(ref) for ref in r.rules.from_plans}, pairs.get(r.rules.to)
        )
        assert not problems, (r.ref, problems)
        target = pairs[r.rules.to]
        out[r.ref] = [
            plan_migration(
                state,
                r,
                pairs[state["subscription"]["plan"]] if state["subscription"] else None,
                target,
                migration_id=MIGRATION_ID,
                now=NOW,
            )
            for state in states
        ]
    return out


def short(digest: str) -> str:
    """A hash as the fixture keeps it: its first 128 bits (the fixture stays small; a changed
    byte still changes them)."""
    return digest[:32]


def plan_output(plan: MigrationPlan) -> str:
    """The plan's canonical JSON (``to_dict``, which holds ``outcome_digest()`` too), hashed."""
    return short(sha256_hex(canonical_json(plan.to_dict())))


def state_output(state: Snapshot) -> list[str]:
    """The state's canonical JSON (every field, ``taken_at`` too), hashed, and its
    ``state_hash``."""
    return [short(sha256_hex(canonical_json(state))), short(state_hash(state))]


def coverage(plans: dict[str, list[MigrationPlan]]) -> list[str]:
    """What the plans reach (each a word): the test requires the dataset to reach these, so a
    fixture over plans that decide nothing cannot pass for proof."""
    seen: set[str] = set()
    for plan_list in plans.values():
        for plan in plan_list:
            seen.add("eligible" if plan.eligible else "ineligible")
            seen.add(f"effective:{plan.effective}")
            if plan.blocked:
                seen.add("blocked")
            seen.update(f"conflict:{c.policy}" for c in plan.conflicts)
            seen.update(f"counter:{m.action}" for m in plan.counter_moves)
            seen.update(f"risk:{r.split(':', 1)[0]}" for r in plan.risks)
            changes = plan.changes
            for key in ("licenses", "activations_converted", "activations_grandfathered"):
                if changes[key]:
                    seen.add(f"changes:{key}")
            if plan.deactivate:
                seen.add("deactivate")
            if plan.over_cap_before:
                seen.add("over_cap_before")
            overrides = plan.expected["subscription"]
            assert overrides is not None
            seen.update(f"overrides:{k}" for k in overrides["overrides"])
    return sorted(seen)


async def outputs(db: Database) -> dict[str, Any]:
    """Seed, read and plan; everything the fixture holds."""
    await seed_dataset(db)
    states = await read(db)
    assert len(states) == ACCOUNTS
    rules = load_all_rules()
    pairs = await plan_pairs(db, rules)
    plans = plan_all(states, rules, pairs)
    return {
        # Lists in account order (``account_ids()``).
        "states": [state_output(s) for s in states],
        "plans": {ref: [plan_output(p) for p in plan_list] for ref, plan_list in plans.items()},
        # One per rules file: the outcome digests in account order, hashed.
        "outcome_digests": {
            ref: short(content_hash([p.outcome_digest() for p in plan_list]))
            for ref, plan_list in plans.items()
        },
        "rules_hashes": {r.ref: r.content_hash() for r in rules},
        "coverage": coverage(plans),
    }


def describe(data: dict[str, Any]) -> dict[str, Any]:
    """The fixture: the outputs, how they were made, and a hash over them all."""
    return {
        "about": "tests/migration/planner_reference.py; compared by test_planner_outputs.py",
        "seed": SEED,
        "accounts": ACCOUNTS,
        "anchor": ANCHOR.isoformat(),
        "now": NOW.isoformat(),
        "rules": [str(p.relative_to(ROOT)) for p in RULES],
        "all": content_hash(data),
        **data,
    }


def _pretty(value: Any) -> str:
    """JSON indented, but a list of hashes (or of pairs of them) one item a line."""
    text = orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    return re.sub(r'\[\n\s*("[0-9a-f]{32}"),\n\s*("[0-9a-f]{32}")\n\s*\]', r"[\1, \2]", text) + "\n"


async def _make(url: str) -> dict[str, Any]:
    db = Database(url)
    try:
        await upgrade_to_head(db.engine)
        return await outputs(db)
    finally:
        await db.dispose()


async def _main(postgres: bool) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        data = await _make(f"sqlite+aiosqlite:///{scratch}/reference.db")
    if postgres:
        from tests.support import create_pg_database, drop_pg_database

        name, url = await create_pg_database()
        try:
            on_postgres = await _make(url)
        finally:
            await drop_pg_database(name)
        if on_postgres != data:
            print("PostgreSQL gives other outputs than SQLite: fixture not written")
            return 1
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(_pretty(describe(data)))
    print(
        f"wrote {FIXTURE.relative_to(ROOT)}: {len(data['states'])} states,"
        f" {sum(len(p) for p in data['plans'].values())} plans; coverage {data['coverage']}"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-postgres", action="store_true")
    sys.exit(asyncio.run(_main(not parser.parse_args().no_postgres)))
