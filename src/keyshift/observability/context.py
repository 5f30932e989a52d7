"""What a line of log or a span is about: the run, the batch and the accounts being worked.

Context variables, so the ids set where a batch is taken (``bound``) reach every line logged
and every span opened beneath it — in the executor, the database layer, a retry — without
being passed down. The request id has its own variable (``logging.request_id_var``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkContext:
    """The run and batch being worked, and its accounts (one account: ``account_id``)."""

    run_id: str | None = None
    batch_id: str | None = None
    account_ids: tuple[str, ...] = ()

    @property
    def account_id(self) -> str | None:
        return self.account_ids[0] if len(self.account_ids) == 1 else None


#: The work in hand in this context; None outside a run's batch.
work_var: ContextVar[WorkContext | None] = ContextVar("keyshift_work", default=None)


@contextmanager
def bound(
    *, run_id: str | None = None, batch_id: str | None = None, account_ids: Sequence[str] = ()
) -> Iterator[WorkContext]:
    """Within the block, log lines and spans carry these ids."""
    work = WorkContext(run_id, batch_id, tuple(account_ids))
    token = work_var.set(work)
    try:
        yield work
    finally:
        work_var.reset(token)


def current() -> WorkContext | None:
    return work_var.get()
