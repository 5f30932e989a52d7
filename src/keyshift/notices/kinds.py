"""The notice vocabulary: what a notice announces (``NoticeKind``), where its delivery is
(``NoticeState``), and the webhook event type each kind is sent as. Pure: stdlib only."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum


class NoticeKind(StrEnum):
    """What a notice announces (``notices.kind``)."""

    SCHEDULED = "scheduled"  # a run will move the account on a date (sent N days before)
    STARTED = "started"  # the account's migration started (its lock step)
    COMPLETED = "completed"  # it completed: the signed receipt rides along
    ROLLED_BACK = "rolled_back"  # it was rolled back to its snapshot
    GRACE_ENDING = "grace_ending"  # a grace period the migration granted is about to end


class NoticeState(StrEnum):
    """Where a notice's delivery is (``notices.state``)."""

    PENDING = "pending"  # due at ``next_attempt_at`` (a deliverer may hold a lease on it)
    DELIVERED = "delivered"  # the endpoint answered 2xx
    DEAD = "dead"  # every attempt failed: on the dead-letter list until replayed
    CANCELLED = "cancelled"  # what it announced no longer holds (a rolled-back migration …)


#: The webhook ``type`` of each kind.
EVENT_TYPES: dict[NoticeKind, str] = {
    NoticeKind.SCHEDULED: "migration.scheduled",
    NoticeKind.STARTED: "migration.started",
    NoticeKind.COMPLETED: "migration.completed",
    NoticeKind.ROLLED_BACK: "migration.rolled_back",
    NoticeKind.GRACE_ENDING: "migration.grace_ending",
}

#: Kinds announcing something ahead of time: cancelled when the change they announce is
#: undone before they are sent.
AHEAD: frozenset[NoticeKind] = frozenset({NoticeKind.SCHEDULED, NoticeKind.GRACE_ENDING})

#: How long before a one-off scheduled change takes effect its notice is sent (at once if
#: sooner); a run's announcement says its own lead.
SCHEDULE_NOTICE_LEAD = timedelta(days=7)
#: How long before a grace period ends its notice is sent (at once if the grace is shorter).
GRACE_NOTICE_LEAD = timedelta(days=7)
