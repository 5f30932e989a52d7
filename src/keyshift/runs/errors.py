"""The runs' error words; the API and CLI map them like every KeyshiftError."""

from __future__ import annotations

from keyshift.errors import Conflict, InvalidInput, NotFound, PermissionDenied


class RunNotFound(NotFound):
    code = "run_not_found"


class CohortInvalid(InvalidInput):
    """The cohort names unknown plans or ids, or selects no account."""

    code = "invalid_cohort"


class OptionsInvalid(InvalidInput):
    """A run's options do not fit together (a canary on a blue-green run, an unknown time
    zone …)."""

    code = "invalid_options"


class AccountsInAnotherRun(Conflict):
    """Some accounts of the cohort are held by another active run."""

    code = "accounts_in_another_run"


class RunChanged(Conflict):
    """The rules or the catalog plans a run was reported and approved against changed."""

    code = "run_changed"


class FourEyes(PermissionDenied):
    """Four eyes are required: the creator of a run may not approve it."""

    code = "four_eyes"


class NoReport(NotFound):
    """The run has not been reported yet."""

    code = "no_report"
