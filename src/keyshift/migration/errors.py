"""The migration engine's error words; the API and CLI map them like every KeyshiftError."""

from __future__ import annotations

from typing import Any

from keyshift.errors import Conflict, InvalidInput, NotFound


class RulesInvalid(InvalidInput):
    """The rules file is malformed or does not fit the catalog; ``problems`` lists each."""

    code = "invalid_rules"

    def __init__(self, problems: list[Any], *, source: str = "rules") -> None:
        self.problems = problems
        self.source = source
        lines = "; ".join(str(p) for p in problems[:5])
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{len(problems)} rules problem(s): {lines}{more}")

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["problems"] = [p.to_dict() if hasattr(p, "to_dict") else str(p) for p in self.problems]
        return body


class MigrationNotFound(NotFound):
    code = "migration_not_found"


class NotEligible(Conflict):
    code = "not_eligible"


class MigrationBlocked(Conflict):
    """The rules say to block the migration (a quota over its new limit, an add-on with no
    rule)."""

    code = "migration_blocked"


class NothingToRollBack(Conflict):
    code = "nothing_to_roll_back"


class MigrationFinalized(Conflict):
    code = "migration_finalized"


class RulesVersionConflict(Conflict):
    """A rules version already registered with different content (versions are immutable)."""

    code = "version_conflict"


class WrongState(Conflict):
    code = "wrong_state"


class OutcomeChanged(Conflict):
    """The account plans differently from what was approved (a run's report): it is held
    for review, not migrated silently."""

    code = "outcome_changed"
