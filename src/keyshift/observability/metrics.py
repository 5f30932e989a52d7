"""Prometheus metrics: requests by route template and status, latency, validations by code,
usage ingest and activations (migration and run series: ``migration_metrics``).

Under several uvicorn workers each process writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` adds them up (prometheus-client's multiprocess
mode). prometheus-client decides its mode when it is first imported, so
:func:`prepare_multiprocess_dir` runs in `keyshift serve` before any worker starts; workers are
spawned processes and inherit the variable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client import values as _values

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The route label of a request no route matched (404s, and bodies refused before routing).
UNMATCHED = "unmatched"

# Latency buckets for an API whose hot path answers in about a millisecond.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "keyshift_http_requests",
    "HTTP requests handled, by route template, method and status.",
    ("route", "method", "status"),
)
HTTP_LATENCY = Histogram(
    "keyshift_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response, by route template and method.",
    ("route", "method"),
    buckets=_BUCKETS,
)
VALIDATIONS = Counter(
    "keyshift_validations",
    "License validations, by result code (VALID, NOT_FOUND, EXPIRED ...).",
    ("code",),
)
VALIDATION_CACHE = Counter(
    "keyshift_validation_cache",
    "License state lookups on the validation path, by result (hit: served from the process's"
    " cache; miss: read from the database).",
    ("result",),
)
ANOMALIES = Counter(
    "keyshift_anomalies",
    "Anomalies flagged (key_many_fingerprints, migration_burst); each also writes an"
    " anomaly.* audit event.",
    ("kind",),
)
RATE_LIMITED = Counter(
    "keyshift_rate_limited",
    "Requests refused with 429, by the limit that refused them (address, key, token).",
    ("limit",),
)
USAGE_EVENTS = Counter(
    "keyshift_usage_events",
    "Usage events received, by result: recorded (counted now), replayed (an idempotency key"
    " seen before: its first answer again) or refused (the request recorded nothing).",
    ("result",),
)
USAGE_INGEST_LATENCY = Histogram(
    "keyshift_usage_ingest_duration_seconds",
    "Time to record one usage request's events (its transactions, commit included), by kind"
    " (single: POST /v1/usage; batch: POST /v1/usage/batch); refused requests included.",
    ("kind",),
    buckets=_BUCKETS,
)
ACTIVATIONS = Counter(
    "keyshift_activations",
    "Machine activations asked for by clients, by result: created (a new seat), existing"
    " (the machine already held one) or refused (answered with an error: no seat left, the"
    " license not active, the database unavailable ...).",
    ("result",),
)
WEBHOOK_DELIVERIES = Counter(
    "keyshift_webhook_deliveries",
    "Customer-notice webhook deliveries, by outcome: delivered (answered 2xx), failed (a"
    " timeout, a non-2xx answer, a redirect or no connection; retried later) or dead (the"
    " last attempt failed: the notice went to the dead-letter list).",
    ("outcome",),
)

# Labelled children cached by their labels: ``.labels()`` takes a lock and hashes on every call,
# and the label sets are few (routes x methods x statuses), so each is built once.
_request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
_validation_children: dict[str, Counter] = {}


def is_multiprocess() -> bool:
    """Whether this process's samples go to files: fixed when prometheus-client was imported,
    so it is read from there, not from the environment (which may have changed since)."""
    return _values.ValueClass is not _values.MutexValue


def prepare_multiprocess_dir(workers: int) -> Path | None:
    """Switch to multiprocess mode when serving with more than one worker.

    Uses ``PROMETHEUS_MULTIPROC_DIR`` if it is set (emptied of the previous run's files), else
    creates a fresh temporary directory and sets the variable. A single worker keeps the
    ordinary in-memory registry: there is nothing to add up. Returns the directory, or None.
    Call it before the workers start; remove a directory it created with
    :func:`remove_multiprocess_dir` after they stop.
    """
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        # Samples left by a previous run would be added to this run's (and counters of dead
        # processes are never reset), so a run starts from an empty directory.
        for stale in directory.glob("*.db"):
            stale.unlink()
        return directory
    if workers <= 1:
        return None
    directory = Path(tempfile.mkdtemp(prefix="keyshift-metrics-"))
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def remove_multiprocess_dir(directory: Path | None) -> None:
    """Remove a directory :func:`prepare_multiprocess_dir` created (not one the user set)."""
    if directory is not None and directory.name.startswith("keyshift-metrics-"):
        shutil.rmtree(directory, ignore_errors=True)


def record_request(route: str, method: str, status: int, seconds: float) -> None:
    """Count one finished request and observe its latency."""
    key = (route, method, status)
    children = _request_children.get(key)
    if children is None:
        children = (
            HTTP_REQUESTS.labels(route, method, str(status)),
            HTTP_LATENCY.labels(route, method),
        )
        _request_children[key] = children
    children[0].inc()
    children[1].observe(seconds)


def record_validation(code: str) -> None:
    """Count one validation by its result code. Called once per validation, after the
    result is decided (the code set is closed, so the label stays bounded)."""
    child = _validation_children.get(code)
    if child is None:
        child = _validation_children[code] = VALIDATIONS.labels(code)
    child.inc()


_cache_children: dict[bool, Counter] = {}


def record_cache(hit: bool) -> None:
    child = _cache_children.get(hit)
    if child is None:
        child = _cache_children[hit] = VALIDATION_CACHE.labels("hit" if hit else "miss")
    child.inc()


def record_anomaly(kind: str) -> None:
    ANOMALIES.labels(kind).inc()


def record_rate_limited(limit: str) -> None:
    RATE_LIMITED.labels(limit).inc()


def record_usage(kind: str, recorded: int, replayed: int, refused: int, seconds: float) -> None:
    """One usage request of ``kind`` (single, batch): its events by result, and its time."""
    for result, count in (("recorded", recorded), ("replayed", replayed), ("refused", refused)):
        if count:
            USAGE_EVENTS.labels(result).inc(count)
    USAGE_INGEST_LATENCY.labels(kind).observe(seconds)


def record_activation(result: str) -> None:
    ACTIVATIONS.labels(result).inc()


def record_webhook_delivery(outcome: str) -> None:
    WEBHOOK_DELIVERIES.labels(outcome).inc()


def render() -> tuple[bytes, str]:
    """The exposition text and its content type; in multiprocess mode, summed over workers."""
    if is_multiprocess():
        registry = CollectorRegistry()
        # prometheus_client ships no annotation for this constructor (its __init__ is untyped).
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
