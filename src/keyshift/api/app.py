"""The application factory."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from keyshift import __version__
from keyshift.api import dashboard, errors, inputs, responses
from keyshift.api.retry import RetryRolledBackRequests
from keyshift.api.routes import ROUTERS, validation
from keyshift.api.state import AppState
from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.observability import tracing
from keyshift.observability.middleware import RequestContextMiddleware
from keyshift.security.secrets_store import load_secrets
from keyshift.validation import cache


def create_app(
    settings: Settings | None = None,
    *,
    db: Database | None = None,
    state: AppState | None = None,
) -> FastAPI:
    """Build the app. Tests pass ``state``; `keyshift serve` passes nothing and reads the env."""
    owns_db = state is None and db is None
    if state is None:
        settings = settings or Settings.from_env()
        # `keyshift serve` (each of its worker processes): traces if OTEL_* asks for them.
        tracing.configure_from_env("keyshift")
        state = AppState(
            settings=settings,
            db=db or Database(settings.database_url, read_pool_size=settings.db_read_pool_size),
            secrets=load_secrets(settings.secrets_dir),
        )

    cache.default_cache.configure(state.settings)
    tracing.instrument_engine(state.db.engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # On PostgreSQL, hear other processes' cache invalidations (LISTEN/NOTIFY); the
        # cache's TTL bounds staleness whenever the listener is down, and on SQLite.
        listener = await cache.start_listener(state.settings.database_url)
        # Everything imported and built at start-up lives as long as the process: move it out
        # of the collector's sight, so each collection walks only request garbage (measured:
        # about a quarter of the server's CPU on batched usage ingest).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await state.anomalies.drain()  # anomaly events still being written
            if listener is not None:
                await listener.stop()
            if owns_db:
                await state.db.dispose()

    app = FastAPI(
        title="keyshift",
        version=__version__,
        lifespan=lifespan,
        # Every route's path and query parameters pass the same input rules (api/inputs.py).
        dependencies=[Depends(inputs.check_parameters)],
    )
    app.state.keyshift = state
    errors.install(app)
    # Bare ASGI routes for the hottest paths first, so routing finds them before the walk
    # through the API's routers (each is also declared on its router, for the schema).
    app.router.routes[:0] = validation.fast_routes()
    for router in ROUTERS:
        responses.document(router)  # each route's error statuses, in the OpenAPI spec
        app.include_router(router)
    dashboard.install(app)  # HTML pages at /dashboard, outside the OpenAPI document
    # Inside the request middleware: one access-log line and one metric per request, however
    # many times a deadlock's victim ran.
    app.add_middleware(RetryRolledBackRequests)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=state.settings.max_body_bytes,
        check_body=inputs.body_error,
        form_paths=("/dashboard/",),
    )
    tracing.instrument_app(app)  # outermost: the span covers the whole request
    return app
