"""What every step over a batch of migrations shares: one account's failure does not fail its
neighbours (``isolated``: together first, then each in a savepoint of its own), and the crash
test's hook (``fault_point``). The executor's forward steps and rollback both use them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit import service as audit
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.errors import KeyshiftError, Unavailable

#: Test hook: ``KEYSHIFT_FAULT_POINT=inside:cutover`` makes the process SIGKILL itself there.
#: Points: ``before:<step>``, ``inside:<step>`` (effects written, not committed), ``after:<step>``.
FAULT_ENV = "KEYSHIFT_FAULT_POINT"

R = TypeVar("R")

#: Work over some of a batch's keys inside the caller's transaction: a result per key, or a
#: ``KeyshiftError`` raised for the whole call (then ``isolated`` redoes it key by key).
BatchWork = Callable[[AsyncSession, Sequence[str]], Awaitable[Mapping[str, R]]]


def fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _faults(fault: str | Sequence[str]) -> None:
    for name in [fault] if isinstance(fault, str) else fault:
        fault_point(name)


async def isolated(
    db: Database, keys: Sequence[str], work: BatchWork[R], *, fault: str | Sequence[str]
) -> dict[str, R | KeyshiftError]:
    """``work`` over ``keys`` in ONE transaction. First all together; if it raises a
    ``KeyshiftError``, that transaction is rolled back and the work is done again with each key
    in a savepoint of its own, so the one that fails gets its error and leaves its neighbours
    be (a batch of one needs no second try: its error is the answer). Audit events are appended together at the end either way (the chain's head is taken
    once, last), then ``fault_point`` at each point ``fault`` names — every effect written, nothing
    committed. An
    ``Unavailable`` database is raised: the transaction is gone, the caller retries the whole."""

    async def together(session: AsyncSession) -> dict[str, R | KeyshiftError]:
        with audit.deferred(session) as events:
            out: dict[str, R | KeyshiftError] = dict(await work(session, keys))
        await audit.append_deferred(session, events)
        _faults(fault)
        return out

    async def apart(session: AsyncSession) -> dict[str, R | KeyshiftError]:
        out: dict[str, R | KeyshiftError] = {}
        events: list[tuple[Actor, audit.EventIn]] = []
        for key in keys:
            with audit.deferred(session) as mine:
                try:
                    async with session.begin_nested():
                        out |= await work(session, [key])
                except KeyshiftError as error:
                    if isinstance(error, Unavailable):
                        raise  # the transaction is gone: the whole batch is retried
                    out[key] = error
                    continue
            events += mine
        await audit.append_deferred(session, events)
        _faults(fault)
        return out

    try:
        return await db.run(together)
    except KeyshiftError as error:
        if isinstance(error, Unavailable):
            raise
        if len(keys) == 1:  # its transaction is rolled back: the one key's error is all
            return {keys[0]: error}
    return await db.run(apart)
