"""Prometheus series of migrations and runs: step latency and batch sizes (observed by the
executor), accounts settled by run and outcome (counted by workers), the gauges read from the
database when ``/metrics`` is scraped, and a worker's own ``/metrics`` listener.

Counters and histograms live in the process that does the work (a ``keyshift worker``, or the
server for a ``migrate apply`` over the API) and follow that process's registry — summed over
uvicorn workers in multiprocess mode like the request series. The gauges are computed per
scrape from the database and never written to the multiprocess files, so they need no
multiprocess mode of their own.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# A batch step's transaction over up to a thousand accounts: milliseconds to minutes.
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Accounts per batch: RunOptions.batch_size is 1 … 1000.
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

STEP_DURATION = Histogram(
    "keyshift_migration_step_duration_seconds",
    "Wall time of one migration step over one batch of accounts (one observation per batch,"
    " not per account), by step; steps that raised are not observed.",
    ("step",),
    buckets=_STEP_BUCKETS,
)
BATCH_ACCOUNTS = Histogram(
    "keyshift_migration_batch_accounts",
    "Accounts in the batch one migration step worked on, by step.",
    ("step",),
    buckets=_BATCH_BUCKETS,
)
RUN_ACCOUNTS = Counter(
    "keyshift_run_accounts",
    "Accounts of a run settled by a worker, by run and outcome: migrated, prepared, scheduled,"
    " skipped, held, rolled_back, failed (an attempt that failed and will be retried) or"
    " quarantined (the failed attempt that was the last). Each settled attempt counts once.",
    ("run", "outcome"),
)

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])

log = logging.getLogger("keyshift.metrics")
#: The kinds of failure to record a sample already logged (each is logged once).
_failures: set[str] = set()


def _recorded(record: Callable[[], None]) -> None:
    """Record a sample. A failure (a PROMETHEUS_MULTIPROC_DIR that does not exist, a full
    disk) is logged once per kind and process and does not fail the migration step it
    describes: that step has committed, and retrying it would only fail again."""
    try:
        record()
    except Exception as error:
        kind = type(error).__name__
        if kind not in _failures:
            _failures.add(kind)
            log.warning("metrics cannot be recorded (%s: %s); migrating on", kind, error)


def observe_step(step: str, accounts: int, seconds: float) -> None:
    """One step over a batch of ``accounts`` took ``seconds``."""

    def record() -> None:
        STEP_DURATION.labels(step).observe(seconds)
        BATCH_ACCOUNTS.labels(step).observe(accounts)

    _recorded(record)


def observe_steps(
    steps: Sequence[str], accounts: int, timings: Mapping[Any, float], seconds: float
) -> None:
    """Steps that shared one transaction over a batch of ``accounts`` (``executor.PHASES``)
    took ``seconds`` in all: each step is observed with the time of its own work
    (``timings``), the first with the shared rest too (locks, ledger, write-back, commit) —
    so the observations add up to the transaction's time, one per step per batch."""
    shared = max(0.0, seconds - sum(timings.get(step, 0.0) for step in steps))
    for index, step in enumerate(steps):
        observe_step(str(step), accounts, timings.get(step, 0.0) + (shared if index == 0 else 0))


def timed_lock(step: str) -> Callable[[_F], _F]:
    """Decorates ``Executor.request_many(self, actor, rules, accounts, …)``, the lock step of
    a batch, observed under ``step``."""

    def decorate(method: _F) -> _F:
        @functools.wraps(method)
        async def timed(self: Any, actor: Any, rules: Any, accounts: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            out = await method(self, actor, rules, accounts, **kwargs)
            observe_step(step, len(accounts), time.perf_counter() - started)
            return out

        return cast(_F, timed)

    return decorate


def count_run_accounts(run_id: str, outcomes: Iterable[str]) -> None:
    """Count settled accounts of ``run_id``, one per outcome given. Call after the
    transaction that recorded them committed."""
    tally: dict[str, int] = {}
    for outcome in outcomes:
        tally[outcome] = tally.get(outcome, 0) + 1

    def record() -> None:
        for outcome, count in tally.items():
            RUN_ACCOUNTS.labels(run_id, outcome).inc(count)

    _recorded(record)


# -- gauges read from the database at scrape time ------------------------------------------


@dataclass(frozen=True)
class RunGauges:
    """What the run tables say at one moment (``keyshift.runs.metrics.read_gauges``)."""

    #: Runs by state, every state present (zeros included).
    runs: Mapping[str, int]
    #: The state of each run in progress (running, paused, ready, rolling back), by run id.
    run_states: Mapping[str, str] = field(default_factory=dict)
    #: Accounts waiting for a worker, by (run id, priority lane).
    queue: Mapping[tuple[str, str], int] = field(default_factory=dict)
    #: Accounts claimed under a lease, by (run id, ``held`` or ``expired``).
    leases: Mapping[tuple[str, str], int] = field(default_factory=dict)


class _Snapshot(Collector):
    """Exposes one ``RunGauges`` (or, with None, only that the database did not answer)."""

    def __init__(self, gauges: RunGauges | None) -> None:
        self.gauges = gauges

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "keyshift_database_up",
            "1 if the database answered this scrape's queries in time, else 0.",
            value=0 if self.gauges is None else 1,
        )
        if self.gauges is None:
            return
        runs = GaugeMetricFamily("keyshift_runs", "Migration runs by state.", labels=["state"])
        for state, count in sorted(self.gauges.runs.items()):
            runs.add_metric([state], count)
        yield runs
        states = GaugeMetricFamily(
            "keyshift_run_state",
            "1 for each run in progress (running, paused, ready, rolling_back), with its state.",
            labels=["run", "state"],
        )
        for run_id, state in sorted(self.gauges.run_states.items()):
            states.add_metric([run_id, state], 1)
        yield states
        queue = GaugeMetricFamily(
            "keyshift_run_queue_depth",
            "Accounts of a run in progress waiting for a worker (in a rollback: still to roll"
            " back), by run and priority lane (listed, attribute, default).",
            labels=["run", "lane"],
        )
        for (run_id, lane), count in sorted(self.gauges.queue.items()):
            queue.add_metric([run_id, lane], count)
        yield queue
        leases = GaugeMetricFamily(
            "keyshift_run_leases",
            "Accounts claimed by a worker, by run and lease status: held (the lease runs) or"
            " expired (its worker died or stalls; the next claim takes them over).",
            labels=["run", "status"],
        )
        for (run_id, status), count in sorted(self.gauges.leases.items()):
            leases.add_metric([run_id, status], count)
        yield leases


def render_gauges(gauges: RunGauges | None) -> bytes:
    """The scrape-time gauges in Prometheus text format, to append to ``metrics.render()``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(gauges))
    return generate_latest(registry)


# -- a worker's own listener ---------------------------------------------------------------


def serve_worker_metrics(host: str, port: int) -> Callable[[], None]:
    """Serve this process's registry as Prometheus text on ``host:port`` (any path, ``/metrics``
    included) from a daemon thread. Returns a function that stops it. Raises OSError when the
    address cannot be bound."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=REGISTRY)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
