"""Prometheus metrics (filled in by the observability work)."""

from __future__ import annotations


def prepare_multiprocess_dir(workers: int) -> None:
    """Placeholder replaced by the metrics module."""
