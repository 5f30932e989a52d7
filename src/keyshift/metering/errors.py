"""Metering's error words; the API and CLI map them through their base classes."""

from __future__ import annotations

from keyshift.errors import Conflict, InvalidInput


class UnknownMeter(InvalidInput):
    """The account's plan declares no such meter (nor a throttled feature of that name)."""

    code = "unknown_meter"


class UsageOutOfWindow(InvalidInput):
    """The event's timestamp is too far in the future, or its period closed too long ago."""

    code = "timestamp_out_of_window"


class IdempotencyConflict(Conflict):
    """The idempotency key was used with a different body inside its window."""

    code = "idempotency_conflict"


class QuotaExceeded(Conflict):
    """A ``block`` meter (or a throttled feature) has no room for this event."""

    code = "quota_exceeded"


class ConcurrentClaim(Conflict):
    """A concurrent request recorded one of this request's idempotency keys after it looked
    them up. ``in_transaction`` retries (the retry replays the key), so a caller sees this
    only when that keeps happening."""

    code = "concurrent_request"
