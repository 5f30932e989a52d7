"""The public form of a migration and its ledger (API responses, CLI output)."""

from __future__ import annotations

from typing import Any

from keyshift.db.tables import Migration, MigrationStep


def migration_view(row: Migration, *, with_plan: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row.id,
        "account_id": row.account_id,
        "state": row.state,
        "holds_account": row.lock_account_id is not None,
        "rules": row.rules_ref,
        "rules_hash": row.rules_hash,
        "from": row.source_ref,
        "from_hash": row.source_hash,
        "to": row.target_ref,
        "to_hash": row.target_hash,
        "effective_at": row.effective_at,
        "snapshot_hash": row.snapshot_hash,
        "receipt": row.receipt,
        "error": row.error,
        "created_by": row.created_by,
        "created_at": row.created_at,
        "cutover_at": row.cutover_at,
        "finished_at": row.finished_at,
    }
    if with_plan:
        out["plan"] = row.plan
    return out


def step_view(row: MigrationStep) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "step": row.step,
        "outcome": row.outcome,
        "snapshot_hash": row.snapshot_hash,
        "details": row.details,
        "at": row.at,
    }
