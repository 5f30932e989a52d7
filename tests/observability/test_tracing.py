"""Traces in this process, on both databases, with the SDK's in-memory exporter: one account's
migration in a run is reconstructed from its spans (the run's batch, each step, the outcome
the worker recorded), a failing account's failure is on its step's span, a migration over the
API hangs under its request's span, a query string never reaches a span, and tracing off
installs nothing; a log line names the span it was written in."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keyshift.api.app import create_app
from keyshift.api.state import AppState
from keyshift.db.engine import Database
from keyshift.migration.executor import PHASES, Executor
from keyshift.observability import tracing
from keyshift.observability.logging import JsonFormatter
from keyshift.runs import service
from keyshift.runs.model import RunOptions
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers
from tests.runs.helpers import (
    CREATOR,
    approved_run,
    cohort,
    corrupt_an_archived_object,
    drive,
    states,
)
from tests.support import mint_token


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.uninstall()
        provider.shutdown()


def _ours(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """keyshift's spans (not the database's or the HTTP instrumentation's), in start order."""
    found = [
        s
        for s in exporter.get_finished_spans()
        if s.instrumentation_scope is not None and s.instrumentation_scope.name == "keyshift"
    ]
    return sorted(found, key=lambda s: s.start_time or 0)


def _attr(span: ReadableSpan, name: str) -> Any:
    assert span.attributes is not None
    return span.attributes.get(name)


def story_of(spans: Sequence[ReadableSpan], account_id: str) -> list[tuple[str, str, str]]:
    """One account's migration as (span, batch id, outcome), in order, from nothing but the
    spans: every span whose accounts include it, with its outcome at the same position."""
    story = []
    for span in spans:
        accounts = list(_attr(span, "keyshift.account_ids") or ())
        if account_id not in accounts:
            continue
        outcomes = _attr(span, "keyshift.outcomes")
        outcome = outcomes[accounts.index(account_id)] if outcomes is not None else ""
        story.append((span.name, str(_attr(span, "keyshift.batch.id")), outcome))
    return story


async def test_one_accounts_migration_in_a_run_is_reconstructed_from_its_spans(
    db: Database, secrets: Secrets, spans: InMemorySpanExporter
) -> None:
    ids = await cohort(db, secrets, 3)
    await corrupt_an_archived_object(db, ids[0])
    run = await approved_run(db, options=RunOptions(batch_size=3, max_attempts=2))
    await service.start(db, CREATOR, run.id)
    await drive(Executor(db, secrets.signing), run.id)
    assert (await states(db, run.id))[ids[1]] == "migrated"

    ours = _ours(spans)
    by_id = {s.context.span_id: s for s in ours if s.context is not None}
    story = story_of(ours, ids[1])
    batch = story[0][1]
    # The lock step takes on the first phase (snapshot, prepare) in its transaction; the
    # other phases follow, each a span (steps that share a transaction share one).
    names = ["migration." + "+".join(("lock", *PHASES[0]))]
    names += ["migration." + "+".join(phase) for phase in PHASES[1:]]
    assert story == [
        ("run.batch", batch, ""),
        (names[0], batch, "prepared"),
        *[(name, batch, "next") for name in names[1:]],
        ("run.settle", batch, "migrated"),
    ]
    # The steps of the batch hang under its span, which says whose run and batch it is.
    parent = next(
        s for s in ours if s.name == "run.batch" and _attr(s, "keyshift.batch.id") == batch
    )
    assert _attr(parent, "keyshift.run.id") == run.id
    assert _attr(parent, "keyshift.accounts") == 3
    for span in ours:
        if span.name.startswith("migration.") and _attr(span, "keyshift.batch.id") == batch:
            assert span.parent is not None and by_id[span.parent.span_id] is parent
            assert _attr(span, "keyshift.run.id") == run.id
            assert span.name in names
            migrations = list(_attr(span, "keyshift.migration_ids"))
            accounts = list(_attr(span, "keyshift.account_ids"))
            assert len(migrations) == len(accounts) == _attr(span, "keyshift.accounts")
    # One migration id follows the account through its steps: the ledger's.
    mine = {
        list(_attr(s, "keyshift.migration_ids"))[
            list(_attr(s, "keyshift.account_ids")).index(ids[1])
        ]
        for s in ours
        if s.name.startswith("migration.") and ids[1] in (_attr(s, "keyshift.account_ids") or ())
    }
    assert len(mine) == 1 and "" not in mine

    # The failing account: its prepare failed inside the lock step's transaction (an event
    # says why), then it was tried alone in a batch of its own, and failed again.
    failing = story_of(ours, ids[0])
    assert failing[0] == ("run.batch", batch, "")
    assert failing[1][:2] == (names[0], batch) and failing[1][2].startswith("error:")
    assert ("run.settle", batch, "failed") in failing
    assert len({b for _, b, _ in failing}) == 2  # the first batch, and its retry alone
    prepare = next(s for s in ours if s.name == names[0] and _attr(s, "keyshift.batch.id") == batch)
    (event,) = [e for e in prepare.events if e.name == "account.failed"]
    assert event.attributes is not None
    assert event.attributes["keyshift.account.id"] == ids[0]
    assert "hash" in str(event.attributes["keyshift.error"])


async def test_a_migration_over_the_api_is_traced_under_its_request(
    db: Database, secrets: Secrets, app_state: AppState, spans: InMemorySpanExporter
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    token = await mint_token(db, "admin")
    app = create_app(state=app_state)  # after install: the request spans are on
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://keyshift.test") as client:
        response = await client.post(
            "/v1/migrations",
            json={"rules": helpers.RULES, "account_id": account_id},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 201, response.text
        migration_id = response.json()["id"]
        # A key in the query string (refused: not a parameter) must not reach a span.
        key = keys[0][1]
        refused = await client.get(f"/v1/accounts?key={key}", headers={"Authorization": "x"})
        assert refused.status_code in (401, 422)

    finished = spans.get_finished_spans()
    (request,) = [s for s in finished if s.name == "POST /v1/migrations"]
    assert request.context is not None
    steps = [s for s in _ours(spans) if s.name.startswith("migration.")]
    assert [s.name for s in steps] == [
        "migration.lock",
        *["migration." + "+".join(phase) for phase in PHASES],
    ]
    for step in steps:
        assert step.context is not None and step.context.trace_id == request.context.trace_id
        assert _attr(step, "keyshift.account.id") == account_id
        assert _attr(step, "keyshift.migration.id") == migration_id
    # Each statement has a span of its own, in the request's trace (asyncpg's or SQLAlchemy's).
    statements = [
        s for s in finished if s is not request and s not in steps and s.name != "GET /v1/accounts"
    ]
    assert statements and all(
        s.context is not None and s.context.trace_id == request.context.trace_id
        for s in statements
        if s.parent is not None
    )
    assert any((s.attributes or {}).get("db.system") for s in statements)
    for span in finished:
        for value in (span.attributes or {}).values():
            assert key not in str(value), span.name


def test_tracing_is_off_without_an_endpoint() -> None:
    assert not tracing.enabled()
    assert not tracing.endpoint_configured({})
    assert not tracing.endpoint_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": " "})
    assert tracing.endpoint_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.endpoint_configured(
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}
    )
    assert not tracing.endpoint_configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}
    )
    assert tracing.trace_ids() is None


def test_a_line_logged_in_a_span_names_its_trace(spans: InMemorySpanExporter) -> None:
    record = logging.LogRecord("keyshift.test", logging.INFO, __file__, 1, "inside", None, None)
    outside = json.loads(JsonFormatter().format(record))
    assert "trace_id" not in outside
    tracer = TracerProvider().get_tracer("test")  # any recording span in the context
    with tracer.start_as_current_span("work") as span:
        line = json.loads(JsonFormatter().format(record))
    context = span.get_span_context()
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"
