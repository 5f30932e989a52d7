"""The public form of a migration, its ledger and its plan: the models the API answers with
(``keyshift.api.routes.migrations``) and ``keyshift migrate …`` prints, built from the ORM rows
(``MigrationOut.model_validate(row)``) and the planner's result. They only read: what is
hashed, signed or stored (the plan, the receipt, a step's details) passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field

from keyshift.db.tables import Migration, MigrationStep
from keyshift.schemas import Instant
from keyshift.states import MigrationState, Step, StepOutcome


class _Out(BaseModel):
    """Read from attributes (an ORM row) or from the public names; written with the public
    names (``from``, ``to`` …) by default."""

    model_config = ConfigDict(from_attributes=True, serialize_by_alias=True)


def _held(value: object) -> bool:
    """``holds_account`` from the row's ``lock_account_id`` (set while the migration holds the
    account), or as given when read back from the public form."""
    return value if isinstance(value, bool) else value is not None


class StepOut(_Out):
    """One ledger row: a step, what it recorded, when."""

    seq: int
    step: Step
    outcome: StepOutcome
    snapshot_hash: str | None
    details: dict[str, Any]
    at: Instant


class MigrationOut(_Out):
    """One account's migration as listed: its rules and plans by ref and hash, its state."""

    id: str
    account_id: str
    state: MigrationState
    holds_account: Annotated[
        bool,
        BeforeValidator(_held),
        Field(validation_alias=AliasChoices("holds_account", "lock_account_id")),
    ]
    rules: str = Field(validation_alias=AliasChoices("rules", "rules_ref"))
    rules_hash: str
    source: str | None = Field(
        validation_alias=AliasChoices("from", "source_ref"), serialization_alias="from"
    )
    source_hash: str | None = Field(
        validation_alias=AliasChoices("from_hash", "source_hash"), serialization_alias="from_hash"
    )
    target: str = Field(validation_alias=AliasChoices("to", "target_ref"), serialization_alias="to")
    target_hash: str = Field(
        validation_alias=AliasChoices("to_hash", "target_hash"), serialization_alias="to_hash"
    )
    effective_at: Instant | None
    snapshot_hash: str | None
    receipt: dict[str, Any] | None = Field(description="The signed receipt, once completed.")
    error: str | None
    created_by: str
    created_at: Instant
    cutover_at: Instant | None
    finished_at: Instant | None


class MigrationDetail(MigrationOut):
    """A migration with its plan and its ledger, steps in the order they were written."""

    plan: dict[str, Any] | None
    ledger: list[StepOut]

    @classmethod
    def of(cls, row: Migration, steps: Iterable[MigrationStep]) -> MigrationDetail:
        listed = MigrationOut.model_validate(row).model_dump()
        ledger = [StepOut.model_validate(s) for s in sorted(steps, key=lambda s: s.seq)]
        return cls.model_validate({**listed, "plan": row.plan, "ledger": ledger})

    def step(self, step: Step) -> StepOut | None:
        return next((s for s in self.ledger if s.step == step), None)


class RolledBack(MigrationDetail):
    """A rolled-back migration with its proof: the rollback step's details (restored hash ==
    snapshot hash)."""

    rollback: dict[str, Any] | None


class MigrationList(_Out):
    items: list[MigrationOut]


class QuotaConflictOut(_Out):
    quota: str
    source_quota: str
    used: int
    limit: int
    policy: str
    resolution: str
    objects_to_archive: list[str]


class CounterMoveOut(_Out):
    meter: str
    period_start: str
    period_end: str
    source_meter: str | None
    source_period_start: str | None
    action: str
    factor: float


class PlanOut(_Out):
    """What migrating one account would do (``MigrationPlan.to_dict()``, field for field): the
    steps, the changes, conflicts and risks, and the expected end state. The instants inside
    (``effective_at``, the state's) are the plan's own RFC 3339 strings. A key ``to_dict`` adds
    and this model lacks is refused, not silently dropped: every plan test then says so."""

    model_config = ConfigDict(from_attributes=True, serialize_by_alias=True, extra="forbid")

    account_id: str
    rules: str
    rules_hash: str
    source: str | None = Field(alias="from")
    target: str = Field(alias="to")
    target_hash: str = Field(alias="to_hash")
    eligible: bool
    blocked: bool
    can_apply: bool
    reasons: list[str]
    effective: str
    effective_at: str | None
    steps: list[dict[str, Any]]
    changes: dict[str, Any]
    conflicts: list[QuotaConflictOut]
    counter_moves: list[CounterMoveOut]
    deactivate: list[str]
    machine_terms: dict[str, Any]
    convert: list[str]
    over_cap_before: list[str]
    archive: list[str]
    risks: list[str]
    expected: dict[str, Any]
    outcome_digest: str
