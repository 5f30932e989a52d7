"""OpenTelemetry traces: a span per request, per migration step over a batch, per run batch
and per database statement, exported over OTLP/HTTP — only when
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set.

Off, no tracer provider is installed, nothing is instrumented and no OpenTelemetry module is
imported: each hook below is one ``is None`` check. On, a step's span carries its batch's
accounts as parallel arrays (account ids, migration ids, outcomes), not an event per account:
measured (``benchmarks/tracing_cost.py``), an event costs 7 to 11 µs and the arrays about 1 µs
per account and step, and the executor moves thousands of accounts a second.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar, cast

from keyshift.observability.context import bound, current
from keyshift.states import Step

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

#: Where spans go; either one switches tracing on (the OpenTelemetry SDK's own variables).
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: ``true`` keeps tracing off even with an endpoint (the SDK's variable).
DISABLED_VARIABLE = "OTEL_SDK_DISABLED"
#: Paths polled by load balancers and Prometheus: no span for them.
EXCLUDED_URLS = "/healthz,/readyz,/metrics"

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])

run_log = logging.getLogger("keyshift.runs.worker")

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_asyncpg: Any = None
#: Engines given a statement tracer already (an app built twice on one engine: once).
_engines: weakref.WeakSet[Any] = weakref.WeakSet()


def enabled() -> bool:
    return _tracer is not None


def endpoint_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint, and the SDK not disabled."""
    env = os.environ if environ is None else environ
    if env.get(DISABLED_VARIABLE, "").strip().lower() == "true":
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def configure_from_env(service: str) -> bool:
    """Install a provider exporting over OTLP/HTTP in batches if the environment asks for
    traces (``endpoint_configured``); else do nothing. The exporter reads the standard
    ``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers, timeout), the resource
    ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (``service`` when no name is
    given). Idempotent; True if tracing is on."""
    if _provider is not None:
        return True
    if not endpoint_configured():
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    # shutdown_on_exit (the default): the spans still queued are sent when the process ends.
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    install(provider)
    return True


def install(provider: TracerProvider) -> None:
    """Trace to ``provider`` from now on (tests pass one with an in-memory exporter):
    migration and run spans, and asyncpg's statements (PostgreSQL, through SQLAlchemy and
    the validation read pool alike)."""
    global _tracer, _provider, _asyncpg
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    from keyshift import __version__

    _provider = provider
    _tracer = provider.get_tracer("keyshift", __version__)
    _asyncpg = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    _asyncpg.instrument(tracer_provider=provider)


def uninstall() -> None:
    """Back to off (tests): no spans from hooks; asyncpg's methods unwrapped."""
    global _tracer, _provider, _asyncpg
    if _asyncpg is not None:
        _asyncpg.uninstrument()
    _tracer = _provider = _asyncpg = None


def instrument_app(app: Any) -> None:
    """A span per request (FastAPI's instrumentation), named by method and route template,
    when tracing is on. The URL's query string is left out of the span: a client that puts a
    license key there must not find it in a trace."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=_provider,
        server_request_hook=_without_query,
        excluded_urls=EXCLUDED_URLS,
        # One span per request, not one per ASGI message as well.
        exclude_spans=["receive", "send"],
    )


def _without_query(span: Span, scope: dict[str, Any]) -> None:
    if not span.is_recording() or not scope.get("query_string"):
        return
    path = scope.get("path", "")
    attributes = getattr(span, "attributes", None) or {}
    for name in ("http.target", "url.query"):
        if name in attributes:
            span.set_attribute(name, path if name == "http.target" else "")
    for name in ("http.url", "url.full"):
        url = attributes.get(name)
        if isinstance(url, str):
            span.set_attribute(name, url.split("?", 1)[0])


def instrument_engine(engine: Any) -> None:
    """A span per statement on a SQLite engine (SQLAlchemy's instrumentation), when tracing
    is on. PostgreSQL's statements are traced by asyncpg's instrumentation (``install``):
    both on one engine would trace each statement twice."""
    if _tracer is None or engine.dialect.name == "postgresql" or engine in _engines:
        return
    _engines.add(engine)
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.metrics import NoOpUpDownCounter

    assert _provider is not None
    tracer = _provider.get_tracer("opentelemetry.instrumentation.sqlalchemy")
    EngineTracer(tracer, engine.sync_engine, NoOpUpDownCounter("db.client.connections.usage"))  # type: ignore[no-untyped-call]


def trace_ids() -> tuple[str, str] | None:
    """The current span's trace and span ids (hex), for log lines; None when off or outside
    a span."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


# -- the executor's and the worker's hooks ---------------------------------------------------

#: The migration → account map of the step in hand, filled by ``note_accounts``.
_step_accounts: ContextVar[dict[str, str] | None] = ContextVar(
    "keyshift_step_accounts", default=None
)


def note_accounts(rows: Iterable[Any]) -> None:
    """The executor names the accounts of the migrations it locked for the step in hand
    (rows with ``id`` and ``account_id``), for its span. Off: nothing."""
    if _tracer is None:
        return
    accounts = _step_accounts.get()
    if accounts is not None:
        for row in rows:
            accounts[row.id] = row.account_id


def _work_attributes(**more: Any) -> dict[str, Any]:
    attributes = {f"keyshift.{name}": value for name, value in more.items() if value is not None}
    work = current()
    if work is not None:
        if work.run_id is not None:
            attributes["keyshift.run.id"] = work.run_id
        if work.batch_id is not None:
            attributes["keyshift.batch.id"] = work.batch_id
    return attributes


def outcome_of(result: Any) -> str:
    """A step's result for one account as one word: the flow (``next``, ``stop``,
    ``verify_failed``), a migration's state (the lock step, a rollback) or ``error:<code>``."""
    if isinstance(result, Exception):
        return f"error:{getattr(result, 'code', type(result).__name__)}"
    state = getattr(result, "state", None)
    return str(state if state is not None else result)


def describe_accounts(span: Span, entries: Sequence[tuple[str, str, Any]]) -> None:
    """Put a batch's (account id, migration id, result) on ``span``: parallel arrays, the
    scalars too for a batch of one, and an event for each account that failed."""
    outcomes = [outcome_of(result) for _, _, result in entries]
    span.set_attributes(
        {
            "keyshift.accounts": len(entries),
            "keyshift.account_ids": [account for account, _, _ in entries],
            "keyshift.migration_ids": [migration for _, migration, _ in entries],
            "keyshift.outcomes": outcomes,
        }
    )
    if len(entries) == 1:
        span.set_attribute("keyshift.account.id", entries[0][0])
        if entries[0][1]:
            span.set_attribute("keyshift.migration.id", entries[0][1])
    for (account, migration, result), outcome in zip(entries, outcomes, strict=True):
        if outcome.startswith("error:") or outcome == "verify_failed":
            span.add_event(
                "account.failed",
                {
                    "keyshift.account.id": account,
                    "keyshift.migration.id": migration,
                    "keyshift.outcome": outcome,
                    "keyshift.error": str(getattr(result, "message", outcome)),
                },
            )


def traced_batch_step(method: _F) -> _F:
    """Decorates ``Executor._batch_step(self, actor, migration_ids, step)``: a span
    ``migration.<step>`` over the batch, with its accounts and each one's outcome. (Steps
    that share one transaction, given as a sequence, make one span ``migration.<a>+<b>``
    with ``keyshift.steps``; each account's outcome is that of the last step it reached.)"""

    @functools.wraps(method)
    async def traced(self: Any, actor: Any, migration_ids: Sequence[str], step: Any) -> Any:
        tracer = _tracer
        if tracer is None:
            return await method(self, actor, migration_ids, step)
        steps = [str(s) for s in step] if isinstance(step, tuple | list) else [str(step)]
        attributes = _work_attributes(step=steps[0] if len(steps) == 1 else None)
        if len(steps) > 1:
            attributes["keyshift.steps"] = steps
        with tracer.start_as_current_span(
            "migration." + "+".join(steps), attributes=attributes
        ) as span:
            accounts: dict[str, str] = {}
            token = _step_accounts.set(accounts)
            try:
                out = await method(self, actor, migration_ids, step)
            finally:
                _step_accounts.reset(token)
            describe_accounts(span, [(accounts.get(m, ""), m, out.get(m)) for m in migration_ids])
            return out

    return cast(_F, traced)


def traced_lock(method: _F) -> _F:
    """Decorates ``Executor.request_many(self, actor, rules, accounts, …)``: a span
    ``migration.lock`` over the batch (each account's outcome: the new migration's state, or
    the error that refused it)."""

    @functools.wraps(method)
    async def traced(
        self: Any, actor: Any, rules: Any, accounts: Sequence[tuple[str, Any]], **kwargs: Any
    ) -> Any:
        tracer = _tracer
        if tracer is None:
            return await method(self, actor, rules, accounts, **kwargs)
        attributes = _work_attributes(step=str(Step.LOCK), rules=getattr(rules, "ref", None))
        name = "migration.lock"
        through = kwargs.get("through")
        if through is not None:  # the lock step took on the first phase's steps (executor)
            steps = [str(Step.LOCK), str(Step.SNAPSHOT)]
            steps += [str(Step.PREPARE)] if str(through) == str(Step.PREPARE) else []
            name, attributes["keyshift.steps"] = "migration." + "+".join(steps), steps
        with tracer.start_as_current_span(name, attributes=attributes) as span:
            out = await method(self, actor, rules, accounts, **kwargs)
            entries = []
            for account, _ in accounts:
                result = out.get(account)
                entries.append(
                    (account, "" if isinstance(result, Exception) else result.id, result)
                )
            describe_accounts(span, entries)
            return out

    return cast(_F, traced)


def traced_request(method: _F) -> _F:
    """Decorates ``Executor.request(self, actor, rules, account_id, …)``, the lock step of
    one account (``migrate apply``): a span ``migration.lock``, as ``traced_lock``'s."""

    @functools.wraps(method)
    async def traced(self: Any, actor: Any, rules: Any, account_id: str, **kwargs: Any) -> Any:
        tracer = _tracer
        if tracer is None:
            return await method(self, actor, rules, account_id, **kwargs)
        attributes = _work_attributes(step=str(Step.LOCK), rules=getattr(rules, "ref", None))
        name = "migration.lock"
        through = kwargs.get("through")
        if through is not None:  # the lock step took on the first phase's steps (executor)
            steps = [str(Step.LOCK), str(Step.SNAPSHOT)]
            steps += [str(Step.PREPARE)] if str(through) == str(Step.PREPARE) else []
            name, attributes["keyshift.steps"] = "migration." + "+".join(steps), steps
        with tracer.start_as_current_span(name, attributes=attributes) as span:
            try:
                out = await method(self, actor, rules, account_id, **kwargs)
            except Exception as error:
                describe_accounts(span, [(account_id, "", error)])
                raise
            describe_accounts(span, [(account_id, out.id, out)])
            return out

    return cast(_F, traced)


def traced_rollback(function: _F) -> _F:
    """Decorates ``rollback_many(executor, actor, migration_ids, …)``: a span
    ``migration.rollback`` over the batch."""

    @functools.wraps(function)
    async def traced(executor: Any, actor: Any, migration_ids: Sequence[str], **kwargs: Any) -> Any:
        tracer = _tracer
        if tracer is None:
            return await function(executor, actor, migration_ids, **kwargs)
        with tracer.start_as_current_span(
            "migration.rollback", attributes=_work_attributes(step=str(Step.ROLLBACK))
        ) as span:
            accounts: dict[str, str] = {}
            token = _step_accounts.set(accounts)
            try:
                out = await function(executor, actor, migration_ids, **kwargs)
            finally:
                _step_accounts.reset(token)
            describe_accounts(
                span, [(accounts.get(m, ""), m, out.get(m)) for m in dict.fromkeys(migration_ids)]
            )
            return out

    return cast(_F, traced)


def observed_run_batch(method: _F) -> _F:
    """Decorates ``Worker.work(self, claim)``: every log line written while the batch is
    worked carries its run, batch and account ids (``context.bound``, on or off), and with
    tracing on a span ``run.batch`` holds the batch's step spans."""

    @functools.wraps(method)
    async def observed(self: Any, claim: Any) -> Any:
        account_ids = [account for account, *_ in claim.accounts]
        with bound(run_id=claim.run_id, batch_id=claim.batch_id, account_ids=account_ids):
            tracer = _tracer
            if tracer is None:
                return await method(self, claim)
            attributes = _work_attributes(
                phase=str(claim.phase), wave=claim.wave, accounts=len(account_ids)
            )
            attributes["keyshift.account_ids"] = account_ids
            with tracer.start_as_current_span("run.batch", attributes=attributes):
                return await method(self, claim)

    return cast(_F, observed)


def observed_settle(method: _F) -> _F:
    """Decorates ``Worker._settle_many(self, claim, outcomes)``: once they are recorded, one
    log line for the batch (its outcomes counted) and one for each account that failed (with
    its account id, migration id and error); with tracing on, a span ``run.settle`` with each
    account's outcome in the run (``migrated``, ``held`` … or ``failed``)."""

    @functools.wraps(method)
    async def observed(self: Any, claim: Any, outcomes: Mapping[str, tuple[Any, Any, Any]]) -> Any:
        tracer = _tracer
        if tracer is None:
            out = await method(self, claim, outcomes)
        else:
            with tracer.start_as_current_span(
                "run.settle", attributes=_work_attributes(step="settle")
            ) as span:
                out = await method(self, claim, outcomes)
                span.set_attributes(
                    {
                        "keyshift.accounts": len(outcomes),
                        "keyshift.account_ids": list(outcomes),
                        "keyshift.migration_ids": [m or "" for _, _, m in outcomes.values()],
                        "keyshift.outcomes": [str(s or "failed") for s, _, _ in outcomes.values()],
                    }
                )
        _log_settled(outcomes)
        return out

    return cast(_F, observed)


def _log_settled(outcomes: Mapping[str, tuple[Any, Any, Any]]) -> None:
    counts: dict[str, int] = {}
    for state, _, _ in outcomes.values():
        name = str(state or "failed")
        counts[name] = counts.get(name, 0) + 1
    if run_log.isEnabledFor(logging.INFO):
        run_log.info("batch settled", extra={"outcomes": counts})
    for account_id, (state, error, migration_id) in outcomes.items():
        if state is None:
            run_log.warning(
                "account failed: %s",
                error,
                extra={"account_id": account_id, "migration_id": migration_id},
            )
