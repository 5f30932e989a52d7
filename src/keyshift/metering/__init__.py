"""Usage-based licensing: meters, idempotent usage events, per-period counters, quotas,
throttles and overage (documented in ``docs/usage.md``)."""
