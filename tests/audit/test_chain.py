"""The audit chain: appends link up, verification names each kind of tampering."""

from __future__ import annotations

import asyncio
import itertools

from sqlalchemy import delete, insert, select, update

from keyshift.audit import service as audit
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent

ACTOR = Actor(id="tester", request_id="req-1")


async def _append(db: Database, n: int) -> None:
    for i in range(n):
        async with db.transaction() as session:
            await audit.record(session, ACTOR, "thing.do", "thing", f"t{i}", details={"i": i})


async def test_appended_events_form_a_verifiable_chain(db: Database) -> None:
    await _append(db, 5)
    async with db.transaction() as session:
        report = await audit.verify(session)
        events = await audit.list_events(session)
    assert report.ok, report.problems
    assert report.checked == 5
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert all(e.prev_hash == p.hash for p, e in itertools.pairwise(events))
    assert events[0].request_id == "req-1"


async def test_verify_names_an_edited_event(db: Database) -> None:
    await _append(db, 4)
    async with db.transaction() as session:
        await session.execute(
            update(AuditEvent).where(AuditEvent.seq == 2).values(actor="someone-else")
        )
    async with db.transaction() as session:
        report = await audit.verify(session)
    assert [(p.seq, p.kind) for p in report.problems] == [(2, "edited")]


async def test_verify_names_a_deleted_event(db: Database) -> None:
    await _append(db, 4)
    async with db.transaction() as session:
        await session.execute(delete(AuditEvent).where(AuditEvent.seq == 3))
    async with db.transaction() as session:
        report = await audit.verify(session)
    assert [(p.seq, p.kind) for p in report.problems] == [(4, "deleted")]


async def test_verify_names_a_deleted_tail(db: Database) -> None:
    await _append(db, 3)
    async with db.transaction() as session:
        await session.execute(delete(AuditEvent).where(AuditEvent.seq == 3))
    async with db.transaction() as session:
        report = await audit.verify(session)
    assert [p.kind for p in report.problems] == ["deleted"]


async def test_verify_names_an_inserted_event(db: Database) -> None:
    await _append(db, 3)
    async with db.transaction() as session:
        # A forger renumbers event 3 to 4 and inserts a forged 3 with a self-consistent hash.
        row = (await session.execute(select(AuditEvent).where(AuditEvent.seq == 3))).scalar_one()
        await session.execute(update(AuditEvent).where(AuditEvent.seq == 3).values(seq=4))
        forged = {
            "seq": 3,
            "id": "forged",
            "occurred_at": row.occurred_at,
            "actor": "mallory",
            "action": "thing.do",
            "target_type": "thing",
            "target_id": "x",
            "account_id": None,
            "request_id": None,
            "details": {},
            "prev_hash": row.prev_hash,
        }
        forged["hash"] = audit.event_hash(
            row.prev_hash, {**forged, "occurred_at": audit._ts(row.occurred_at)}
        )
        await session.execute(insert(AuditEvent).values(**forged))
    async with db.transaction() as session:
        report = await audit.verify(session)
    kinds = {(p.seq, p.kind) for p in report.problems}
    assert (4, "inserted") in kinds or (4, "edited") in kinds
    assert not report.ok


async def test_concurrent_writers_never_fork_the_chain(db: Database) -> None:
    async def writer(w: int) -> None:
        for i in range(10):
            async with db.transaction() as session:
                await audit.record(session, ACTOR, "thing.do", "thing", f"{w}-{i}")

    await asyncio.gather(*(writer(w) for w in range(8)))
    async with db.transaction() as session:
        report = await audit.verify(session)
    assert report.ok, report.problems
    assert report.checked == 80


async def test_a_batch_is_appended_in_one_statement_and_links(db: Database) -> None:
    async with db.transaction() as session:
        await audit.record_many(
            session, ACTOR, [audit.EventIn("a.b", "t", str(i)) for i in range(50)]
        )
    async with db.transaction() as session:
        report = await audit.verify(session)
    assert report.ok and report.checked == 50
