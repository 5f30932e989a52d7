"""`keyshift serve`: the HTTP API under uvicorn, after checking its settings and secrets."""

from __future__ import annotations

import logging
import os

import typer

from keyshift.cli.output import fail
from keyshift.cli.runtime import load_settings
from keyshift.errors import ConfigurationError


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8080, help="Port to bind."),
    workers: int = typer.Option(1, min=1, max=64, help="Worker processes."),
) -> None:
    """Start the HTTP API (uvicorn) on the configured database."""
    # Every setting the workers will read, checked here: a bad value is one line and a
    # non-zero exit, not a traceback from each worker.
    settings = load_settings()
    level = settings.log_level.lower()
    from keyshift.security.secrets_store import load_secrets

    # Refuse to start without secrets, with a one-line message rather than a worker's traceback.
    try:
        load_secrets(settings.secrets_dir)
    except ConfigurationError as error:
        fail(error)

    # Before uvicorn (and anything importing prometheus-client in the workers) starts.
    from keyshift.observability.metrics import prepare_multiprocess_dir, remove_multiprocess_dir

    metrics_dir = prepare_multiprocess_dir(workers)
    import uvicorn
    from sqlalchemy.engine import make_url

    from keyshift.api.protocol import PROTOCOL
    from keyshift.observability.logging import configure_logging, log_config

    configure_logging(level)
    # Workers are spawned processes: they read the settings from the environment, so pin the
    # resolved values there.
    os.environ["KEYSHIFT_DATABASE_URL"] = settings.database_url
    os.environ["KEYSHIFT_SECRETS_DIR"] = str(settings.secrets_dir)
    log = logging.getLogger("keyshift.server")
    log.info(
        "serving on http://%s:%s with %d worker(s) on %s",
        host,
        port,
        workers,
        make_url(settings.database_url).render_as_string(hide_password=True),
    )
    if metrics_dir is not None:
        log.info("metrics multiprocess dir: %s", metrics_dir)
    try:
        uvicorn.run(
            "keyshift.api.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_config=log_config(level),
            log_level=level,
            access_log=False,
            server_header=False,
            # Our protocol, not uvicorn's choice: it caps the request head (431), which
            # uvicorn's httptools protocol does not; the cap travels in the h11 setting.
            http=PROTOCOL,
            h11_max_incomplete_event_size=settings.max_header_bytes,
        )
    finally:
        remove_multiprocess_dir(metrics_dir)
