"""The cost per account of a migration step's span, three ways: the step's accounts as parallel
arrays (``keyshift.observability.tracing.describe_accounts``, what the executor does), an event
per account, a child span per account. In this process, with the SDK's batch processor and an
in-memory exporter (no network, no encoding): the instrumentation's own CPU.

    .venv/bin/python benchmarks/tracing_cost.py [--batch 100] [--batches 2000]
"""

from __future__ import annotations

import argparse
import time
import uuid

from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keyshift.observability.tracing import describe_accounts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=100, help="accounts per step")
    parser.add_argument("--batches", type=int, default=2000, help="steps timed per way")
    args = parser.parse_args()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=SpanLimits(max_events=args.batch + 1))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    entries = [(str(uuid.uuid4()), str(uuid.uuid4()), "next") for _ in range(args.batch)]

    def bare() -> None:
        with tracer.start_as_current_span("migration.cutover") as span:
            span.set_attribute("keyshift.step", "cutover")

    def arrays() -> None:
        with tracer.start_as_current_span("migration.cutover") as span:
            span.set_attribute("keyshift.step", "cutover")
            describe_accounts(span, entries)

    def events() -> None:
        with tracer.start_as_current_span("migration.cutover") as span:
            span.set_attribute("keyshift.step", "cutover")
            for account, migration, outcome in entries:
                span.add_event(
                    "account",
                    {
                        "keyshift.account.id": account,
                        "keyshift.migration.id": migration,
                        "keyshift.outcome": outcome,
                    },
                )

    def children() -> None:
        with tracer.start_as_current_span("migration.cutover") as span:
            span.set_attribute("keyshift.step", "cutover")
            for account, migration, outcome in entries:
                attributes = {
                    "keyshift.account.id": account,
                    "keyshift.migration.id": migration,
                    "keyshift.outcome": outcome,
                }
                with tracer.start_as_current_span("account", attributes=attributes):
                    pass

    base = 0.0
    for name, way in (("bare span", bare), ("arrays", arrays), ("events", events)):
        started = time.process_time()
        for _ in range(args.batches):
            way()
        per_step = (time.process_time() - started) / args.batches
        base = base or per_step
        extra = (per_step - base) / args.batch
        print(f"{name:10} {per_step * 1e6:9.1f} µs per step, {extra * 1e6:6.2f} µs per account")
        exporter.clear()
    rounds = max(1, args.batches // 10)  # a span per account is slow: fewer rounds
    started = time.process_time()
    for _ in range(rounds):
        children()
    per_step = (time.process_time() - started) / rounds
    extra = (per_step - base) / args.batch
    print(f"{'children':10} {per_step * 1e6:9.1f} µs per step, {extra * 1e6:6.2f} µs per account")
    provider.shutdown()


if __name__ == "__main__":
    main()
