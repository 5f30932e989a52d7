"""The customer notices a migration's steps write into the outbox (``keyshift.notices``), in
the step's own transaction: started (the lock), grace ending (a cutover that grants a grace),
completed (the receipt, which rides along signed) and rolled back. Each builds one row; the
batch inserts its rows together (``Batch.flush``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.db.tables import Migration
from keyshift.migration.planner import MigrationPlan
from keyshift.migration.repository import MigrationRecord
from keyshift.migration.state import iso, parse_iso
from keyshift.notices import outbox
from keyshift.notices.kinds import AHEAD, GRACE_NOTICE_LEAD, SCHEDULE_NOTICE_LEAD, NoticeKind

Row = Migration | MigrationRecord


def _about(row: Row, date: str | None) -> dict[str, Any]:
    return {
        "migration_id": row.id,
        "run_id": row.run_id,
        "from_plan": row.source_ref,
        "to_plan": row.target_ref,
        "date": date,
    }


def started(row: Row, now: datetime) -> dict[str, Any]:
    return outbox.notice(
        NoticeKind.STARTED,
        row.account_id,
        now=now,
        about=row.id,
        payload=_about(row, iso(now)),
        migration_id=row.id,
        run_id=row.run_id,
    )


def changes_of(plan: MigrationPlan) -> list[str]:
    """What changes for the account, in words, from its plan."""
    out = [f"your plan moves from {plan.source_ref or 'no plan'} to {plan.target_ref}"]
    for conflict in plan.conflicts:
        out.append(
            f"{conflict.quota}: you use {conflict.used}, the new plan allows {conflict.limit};"
            f" {conflict.resolution}"
        )
    for risk in plan.risks:
        kind, _, what = risk.partition(":")
        if kind == "loses_feature":
            out.append(f"the feature {what} is no longer included")
        elif kind == "drops_addon":
            out.append(f"the add-on {what} does not carry over")
    if plan.deactivate:
        out.append(f"{len(plan.deactivate)} machine(s) over the new seat limit are deactivated")
    if plan.archive:
        out.append(f"{len(plan.archive)} data object(s) move to the archive tier")
    return out


def scheduled(
    row: Row, plan: MigrationPlan, effective_at: datetime, now: datetime
) -> dict[str, Any]:
    """A one-off change scheduled for later: sent ``SCHEDULE_NOTICE_LEAD`` before it takes
    effect (at once if it is sooner), with what changes for the account."""
    payload = _about(row, iso(effective_at)) | {"changes": changes_of(plan)}
    return outbox.notice(
        NoticeKind.SCHEDULED,
        row.account_id,
        now=now,
        about=row.id,
        payload=payload,
        migration_id=row.id,
        run_id=row.run_id,
        due=effective_at - SCHEDULE_NOTICE_LEAD,
    )


async def cancelled(session: AsyncSession, migration_ids: Sequence[str]) -> None:
    """A change withdrawn (cancelled or replaced) before it ran: its unsent notices ahead."""
    await outbox.cancel(
        session, kinds=AHEAD, migration_ids=migration_ids, reason="the change was cancelled"
    )


def completed(row: Row, receipt: dict[str, Any], now: datetime) -> dict[str, Any]:
    payload = _about(row, receipt["body"].get("effective_at") or iso(now))
    payload |= {
        "snapshot_hash": row.snapshot_hash,
        "receipt_keyid": receipt.get("keyid"),
        "receipt": receipt,
    }
    return outbox.notice(
        NoticeKind.COMPLETED,
        row.account_id,
        now=now,
        about=row.id,
        payload=payload,
        migration_id=row.id,
        run_id=row.run_id,
    )


def grace_ending(row: Row, until: str, now: datetime) -> dict[str, Any] | None:
    """Sent ``GRACE_NOTICE_LEAD`` before the grace ends (at once if it is shorter)."""
    ends = parse_iso(until)
    if ends is None:
        return None
    return outbox.notice(
        NoticeKind.GRACE_ENDING,
        row.account_id,
        now=now,
        about=row.id,
        payload=_about(row, until),
        migration_id=row.id,
        run_id=row.run_id,
        due=ends - GRACE_NOTICE_LEAD,
    )


async def write(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """A batch's notices, in one statement."""
    await outbox.write(session, rows)


async def rolled_back(
    session: AsyncSession, rows: Sequence[Row], moments: dict[str, datetime], reason: str | None
) -> None:
    """The rolled-back notices of ``rows``, and what they announced ahead cancelled."""
    if not rows:
        return
    await outbox.cancel(
        session,
        kinds=AHEAD,
        migration_ids=[row.id for row in rows],
        reason="the migration was rolled back",
    )
    await outbox.write(
        session,
        [
            outbox.notice(
                NoticeKind.ROLLED_BACK,
                row.account_id,
                now=moments[row.id],
                about=row.id,
                payload=_about(row, iso(moments[row.id])) | {"reason": reason},
                migration_id=row.id,
                run_id=row.run_id,
            )
            for row in rows
        ],
    )
