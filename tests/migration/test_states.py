"""Migration states, steps and ledger outcomes are enums defined once in ``keyshift.states``:
no module spells a state as a bare string, the named sets describe the rows the code writes,
and the executor runs each step through an explicit table."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Migration
from keyshift.migration.executor import RUN_STEPS, Executor
from keyshift.migration.planner import STEPS
from keyshift.migration.rollback import rollback
from keyshift.security.secrets_store import Secrets
from keyshift.states import (
    CUT_OVER,
    HOLDING,
    IN_FLIGHT,
    REVERSIBLE,
    SETTLED,
    WAITING,
    MigrationState,
    Step,
    StepOutcome,
)
from tests.migration import helpers

SRC = Path(__file__).resolve().parents[2] / "src" / "keyshift"
VOCABULARY = (
    {m.value for m in MigrationState} | {m.value for m in Step} | {m.value for m in StepOutcome}
)
NAMES = {"state", "step", "outcome"}


def _named(node: ast.expr) -> bool:
    """``x.state``, ``x["step"]`` and the like: an expression naming a state, step or outcome."""
    if isinstance(node, ast.Attribute):
        return node.attr in NAMES
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return node.slice.value in NAMES
    return False


def _literals(node: ast.AST) -> list[ast.Constant]:
    return [
        n
        for n in ast.walk(node)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in VOCABULARY
    ]


def _a_set_of_states(node: ast.expr) -> bool:
    """``("locked", "snapshotted", …)``: a set of states kept under a name of its own."""
    states = {m.value for m in MigrationState}
    return isinstance(node, ast.Tuple | ast.Set) and all(
        isinstance(e, ast.Constant) and e.value in states for e in node.elts
    )


def bare_literals(tree: ast.AST) -> list[ast.Constant]:
    """String literals of the vocabulary used where a state, step or outcome is meant:
    compared with or assigned to one, passed as one, or collected into a set of them."""
    found: list[ast.Constant] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(_named(x) for x in [node.left, *node.comparators]):
            found += _literals(node)
        elif isinstance(node, ast.Assign):
            targets = [t for target in node.targets for t in getattr(target, "elts", [target])]
            if any(_named(t) for t in targets) or _a_set_of_states(node.value):
                found += _literals(node.value)
        elif isinstance(node, ast.keyword) and node.arg in NAMES:
            found += _literals(node.value)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value in NAMES:
                    found += _literals(value)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"in_", "frozenset", "write_step", "get"}:
                found += [c for arg in node.args for c in _literals(arg)]
    return found


def test_no_module_spells_a_state_step_or_outcome_as_a_bare_string() -> None:
    found = [
        f"{path.relative_to(SRC)}:{literal.lineno}: {literal.value!r}"
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "states.py" and "alembic" not in path.parts
        for literal in bare_literals(ast.parse(path.read_text()))
    ]
    assert found == []


def test_the_values_are_the_stored_strings_and_the_sets_nest() -> None:
    assert [m.value for m in MigrationState] == [
        "queued", "scheduled", "held", "locked", "snapshotted", "prepared", "cutover",
        "verified", "completed", "finalized", "rolled_back", "refused", "cancelled", "failed",
    ]  # fmt: skip
    assert MigrationState("locked") is MigrationState.LOCKED
    assert f"{MigrationState.LOCKED}" == "locked" and "locked" in IN_FLIGHT
    assert IN_FLIGHT < HOLDING and IN_FLIGHT < REVERSIBLE
    assert WAITING - {MigrationState.QUEUED} == HOLDING - IN_FLIGHT
    assert not (SETTLED & (HOLDING | CUT_OVER | WAITING))
    assert (Step.LOCK, *RUN_STEPS) == STEPS


async def test_the_executor_runs_each_step_through_its_table_entry(
    db: Database, secrets: Secrets
) -> None:
    executor = Executor(db, secrets.signing)
    table = executor._handlers
    assert list(table) == list(RUN_STEPS)
    assert {step: handler.__name__ for step, handler in table.items()} == {
        step: f"_{step}" for step in RUN_STEPS
    }
    assert "getattr" not in (SRC / "migration" / "executor.py").read_text()


async def _rows(db: Database) -> list[Migration]:
    async with db.transaction() as session:
        return list((await session.execute(select(Migration))).scalars())


async def test_a_migration_holds_its_account_exactly_in_the_holding_states(
    db: Database, secrets: Secrets
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    at = datetime.now(UTC) + timedelta(days=3)
    scheduled = (
        helpers.RULES.replace('version = "1"', 'version = "1-at"', 1)
        + f'\n[schedule]\neffective = "at"\nat = {at.strftime("%Y-%m-%dT%H:%M:%SZ")}\n'
    )
    executor = Executor(db, secrets.signing)
    seen: set[str] = set()

    async def check() -> None:
        for row in await _rows(db):
            seen.add(row.state)
            assert (row.lock_account_id is not None) == (row.state in HOLDING), row.state

    first = await executor.request(SYSTEM, helpers.rules(scheduled), account_id)
    await check()
    await executor.request(SYSTEM, helpers.rules(scheduled), account_id, on_pending="replace")
    await check()
    await executor.request(SYSTEM, helpers.rules(), account_id, on_pending="queue")
    await check()
    assert seen == {"scheduled", "cancelled", "queued"}, first.id

    account_id, _ = await helpers.rich_account(db, secrets)
    row = await executor.request(SYSTEM, helpers.rules(), account_id)
    await check()
    assert row.state in IN_FLIGHT
    row = await executor.run(SYSTEM, row.id)
    assert row.state == MigrationState.COMPLETED and row.state in CUT_OVER
    await check()
    await rollback(executor, SYSTEM, row.id)
    await check()
    assert {"locked", "completed", "rolled_back"} <= seen
