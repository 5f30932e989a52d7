"""The audit chain: appends link up, verification names each kind of tampering."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.audit import chain as audit_chain
from keyshift.audit import service as audit
from keyshift.audit.chain import ChainWalk, VerifyReport
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent, AuditHead

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


def _kinds(report: VerifyReport) -> list[tuple[int, str]]:
    return [(p.seq, p.kind) for p in report.problems]


async def _verify(db: Database) -> VerifyReport:
    async with db.transaction() as session:
        return await audit.verify(session)


async def _row(session: AsyncSession, seq: int) -> dict[str, Any]:
    event = (await session.execute(select(AuditEvent).where(AuditEvent.seq == seq))).scalar_one()
    return {c.key: getattr(event, c.key) for c in AuditEvent.__table__.columns}


def _hash(row: dict[str, Any]) -> str:
    """What ``record`` would have written for ``row`` (its seq, content and prev_hash)."""
    return audit.event_hash(row["prev_hash"], {**row, "occurred_at": audit._ts(row["occurred_at"])})


async def _forge(session: AsyncSession, seq: int, prev_hash: str, **content: Any) -> str:
    """Insert a self-consistent row at ``seq`` linking to ``prev_hash``; returns its hash."""
    row = {
        "seq": seq,
        "id": f"forged-{seq}",
        "occurred_at": datetime(2026, 1, 1, tzinfo=UTC),
        "actor": "mallory",
        "action": "thing.do",
        "target_type": "thing",
        "target_id": "x",
        "account_id": None,
        "request_id": None,
        "details": {},
        "prev_hash": prev_hash,
        **content,
    }
    row["hash"] = _hash(row)
    await session.execute(insert(AuditEvent).values(**row))
    return str(row["hash"])


async def test_verify_names_an_edited_event(db: Database) -> None:
    await _append(db, 4)
    async with db.transaction() as session:
        await session.execute(
            update(AuditEvent).where(AuditEvent.seq == 2).values(actor="someone-else")
        )
    assert _kinds(await _verify(db)) == [(2, "content_edited")]


async def test_an_edited_event_whose_hash_was_recomputed_is_named_not_its_successor(
    db: Database,
) -> None:
    await _append(db, 4)
    async with db.transaction() as session:
        row = {**(await _row(session, 2)), "actor": "someone-else"}
        await session.execute(
            update(AuditEvent)
            .where(AuditEvent.seq == 2)
            .values(actor="someone-else", hash=_hash(row))
        )
    report = await _verify(db)
    assert _kinds(report) == [(2, "content_edited")]
    assert "hash recomputed" in report.problems[0].message


async def test_a_last_event_edited_and_rehashed_is_a_head_mismatch_with_both_hashes(
    db: Database,
) -> None:
    await _append(db, 3)
    async with db.transaction() as session:
        row = {**(await _row(session, 3)), "details": {"forged": True}}
        await session.execute(
            update(AuditEvent)
            .where(AuditEvent.seq == 3)
            .values(details={"forged": True}, hash=_hash(row))
        )
        head = (await session.execute(select(AuditHead))).scalar_one()
    report = await _verify(db)
    assert _kinds(report) == [(3, "head_mismatch")]
    assert report.problems[0].details == {
        "head_seq": 3,
        "head_hash": head.hash,
        "chain_seq": 3,
        "chain_hash": _hash(row),
    }


async def test_an_edited_head_names_both_hashes(db: Database) -> None:
    await _append(db, 3)
    async with db.transaction() as session:
        last = await _row(session, 3)
        await session.execute(update(AuditHead).values(hash="f" * 64))
    (problem,) = (await _verify(db)).problems
    assert (problem.seq, problem.kind) == (3, "head_mismatch")
    assert "f" * 64 in problem.message and last["hash"] in problem.message


async def test_verify_names_a_deleted_event_as_a_gap(db: Database) -> None:
    await _append(db, 4)
    async with db.transaction() as session:
        await session.execute(delete(AuditEvent).where(AuditEvent.seq == 3))
    report = await _verify(db)
    assert _kinds(report) == [(3, "gap")]
    assert report.problems[0].details == {"missing_from": 3, "missing_to": 3}


async def test_verify_names_a_deleted_tail(db: Database) -> None:
    await _append(db, 3)
    async with db.transaction() as session:
        await session.execute(delete(AuditEvent).where(AuditEvent.seq == 3))
    assert _kinds(await _verify(db)) == [(3, "gap")]


async def test_a_deleted_event_with_the_later_ones_renumbered_is_a_gap(db: Database) -> None:
    await _append(db, 5)
    async with db.transaction() as session:
        await session.execute(delete(AuditEvent).where(AuditEvent.seq == 3))
        for seq in (4, 5):
            await session.execute(
                update(AuditEvent).where(AuditEvent.seq == seq).values(seq=seq - 1)
            )
    report = await _verify(db)
    assert _kinds(report) == [(3, "gap")]
    assert "renumbered" in report.problems[0].message


async def test_verify_names_an_event_inserted_by_renumbering_the_later_ones(
    db: Database,
) -> None:
    await _append(db, 4)
    async with db.transaction() as session:
        # A forger renumbers 3 and 4 up and inserts a self-consistent 3 linked to 2.
        for seq in (4, 3):
            await session.execute(
                update(AuditEvent).where(AuditEvent.seq == seq).values(seq=seq + 1)
            )
        await _forge(session, 3, (await _row(session, 2))["hash"])
    assert _kinds(await _verify(db)) == [(3, "inserted")]


async def test_an_insert_covered_by_bumping_the_heads_seq_names_the_insert_and_the_head(
    db: Database,
) -> None:
    await _append(db, 4)
    async with db.transaction() as session:
        # As above, and the forger also moves the head's seq up by one (its hash unchanged):
        # the insert is named, and so is the head, not a gap past the chain's end.
        for seq in (4, 3):
            await session.execute(
                update(AuditEvent).where(AuditEvent.seq == seq).values(seq=seq + 1)
            )
        await _forge(session, 3, (await _row(session, 2))["hash"])
        await session.execute(update(AuditHead).values(seq=AuditHead.seq + 1))
    report = await _verify(db)
    assert _kinds(report) == [(3, "inserted"), (5, "head_mismatch")]
    head = report.problems[-1]
    assert head.details["head_seq"] == 5 and head.details["chain_seq"] == 4
    assert head.details["head_hash"] == head.details["chain_hash"]


async def test_a_consistent_event_inserted_at_seq_0_is_named_at_seq_0(db: Database) -> None:
    await _append(db, 3)
    async with db.transaction() as session:
        await _forge(session, 0, audit_chain.GENESIS)
    assert _kinds(await _verify(db)) == [(0, "inserted")]


async def test_an_event_appended_past_the_head_is_inserted(db: Database) -> None:
    await _append(db, 3)
    async with db.transaction() as session:
        await _forge(session, 4, (await _row(session, 3))["hash"])
    assert _kinds(await _verify(db)) == [(4, "inserted")]


async def test_a_changed_link_is_a_broken_link(db: Database) -> None:
    await _append(db, 4)
    async with db.transaction() as session:
        await session.execute(
            update(AuditEvent).where(AuditEvent.seq == 3).values(prev_hash="e" * 64)
        )
    assert _kinds(await _verify(db)) == [(3, "link_broken")]


async def test_independent_edits_are_each_named(db: Database) -> None:
    await _append(db, 6)
    async with db.transaction() as session:
        for seq in (2, 5):
            await session.execute(
                update(AuditEvent).where(AuditEvent.seq == seq).values(target_id="changed")
            )
    assert _kinds(await _verify(db)) == [(2, "content_edited"), (5, "content_edited")]


def test_rows_appended_while_the_walk_ran_are_covered_by_the_head_read_again() -> None:
    rows, prev = [], audit_chain.GENESIS
    for seq in range(1, 6):
        row = {
            "seq": seq,
            "id": str(seq),
            "occurred_at": "2026-01-01T00:00:00.000000",
            "actor": "a",
            "action": "x.y",
            "target_type": "t",
            "target_id": str(seq),
            "account_id": None,
            "request_id": None,
            "details": {},
            "prev_hash": prev,
        }
        row["hash"] = prev = audit.event_hash(prev, row)
        rows.append(row)

    def walk(head_seq_now: int | None) -> VerifyReport:
        # The head was read when the chain had 3 events; 4 and 5 committed before the rows.
        chain = ChainWalk(3, rows[2]["hash"], renumber_hint=3 - 5)
        for row in rows:
            chain.feed(row)
        assert chain.needs_head_again
        return chain.finish(head_seq_now)

    assert walk(5).ok
    assert _kinds(walk(3)) == [(4, "inserted")]


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
