"""The one range of dates keyshift accepts, and arithmetic on stored dates that cannot fail.

Every date that comes in (an expiry, a usage timestamp, a usage period) must lie between
``EARLIEST`` and ``LATEST``, and every duration (a plan term, a grace period, a file's
``ttl``) is at most ``MAX_SPAN`` long (``keyshift.catalog.durations``): a date in range plus
any duration stays far inside what Python and both databases can represent, so a stored
value can never make a later read fail. docs/security.md ("Input limits") says the same.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from keyshift.errors import InvalidInput

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
#: The longest duration anything may have; LATEST + MAX_SPAN is still before year 9999.
MAX_SPAN = timedelta(days=100 * 366)

RANGE_TEXT = "between 1970-01-01T00:00:00Z and 9000-12-31T23:59:59Z"


def rfc3339(value: datetime | None) -> str | None:
    """The one text form of an instant keyshift writes: RFC 3339 in UTC with ``Z``
    (``2026-11-30T12:00:00Z``, microseconds only when there are any). A naive value is read
    as UTC, as both databases return stored instants; None stays None."""
    if value is None:
        return None
    # The two kinds every read gives, without a conversion: naive (SQLite) and UTC (asyncpg).
    zone = value.tzinfo
    if zone is None:
        return value.isoformat() + "Z"
    if zone is UTC:
        return value.isoformat()[:-6] + "Z"  # "+00:00"
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def in_range(value: datetime) -> bool:
    """Whether ``value`` (timezone-aware) lies in the accepted range. An offset that moves a
    date past the calendar's edge (9999-12-31T23:59-23:59) is out of range, not an error."""
    try:
        utc = value.astimezone(UTC)
    except (OverflowError, ValueError):
        return False
    return EARLIEST <= utc <= LATEST


def checked(value: datetime, *, field: str) -> datetime:
    """``value`` if it is timezone-aware and in range; InvalidInput naming ``field`` if not."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{field} needs a timezone (e.g. ...Z)", field=field)
    if not in_range(value):
        raise InvalidInput(f"{field} must be {RANGE_TEXT}", field=field)
    return value


def plus(start: datetime, span: timedelta) -> datetime:
    """``start + span``, or the last representable instant if that is past the calendar's end:
    for reads of stored dates (an expiry plus its grace), which must answer whatever is
    stored, including rows written before dates were bounded."""
    try:
        return start + span
    except OverflowError:
        return datetime.max.replace(tzinfo=start.tzinfo)
