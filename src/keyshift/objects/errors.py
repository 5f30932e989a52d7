"""Storage's error words; the API and CLI map them through their base classes."""

from __future__ import annotations

from keyshift.errors import Conflict, InvalidInput


class UnknownQuota(InvalidInput):
    """The account's entitlements have no quota of that name to file an object under."""

    code = "unknown_quota"


class ObjectQuotaExceeded(Conflict):
    """The object would take the account's use of a quota past its limit, and the plan does
    not allow overage on it (the same ``quota_exceeded`` a ``block`` meter answers)."""

    code = "quota_exceeded"


class QuotaReadOnly(Conflict):
    """A migration made the quota read-only (``on_conflict = "read_only"``): nothing new
    may be filed under it."""

    code = "quota_read_only"
