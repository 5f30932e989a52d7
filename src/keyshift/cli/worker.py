"""`keyshift worker`: a worker process. Any number, on any number of machines sharing one
PostgreSQL, claim and migrate the accounts of running runs (docs/runs.md#workers)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import typer

from keyshift.cli.runtime import run

if TYPE_CHECKING:
    from keyshift.config import Settings
    from keyshift.db.engine import Database


def register(app: typer.Typer) -> None:
    """Add this module's command to the root app."""
    app.command("worker")(worker)


def worker(
    run_id: str | None = typer.Option(None, "--run", help="Work only this run."),
    until_idle: bool = typer.Option(
        False, "--until-idle", help="Exit when no run has accounts left to take."
    ),
    token: str | None = typer.Option(
        None,
        envvar="KEYSHIFT_WORKER_TOKEN",
        help="Act as this token (scope migrations:run); default: as the CLI user.",
        show_envvar=True,
    ),
    poll: float = typer.Option(1.0, min=0.05, max=60, help="Seconds between looks for work."),
    metrics_port: int | None = typer.Option(
        None,
        min=1,
        max=65535,
        help="Serve this worker's Prometheus metrics on this port (default: not served).",
    ),
    metrics_host: str = typer.Option(
        "127.0.0.1", help="Address the metrics listener binds (with --metrics-port)."
    ),
) -> None:
    """Claim and migrate accounts of running runs until stopped.

    SIGTERM finishes the batch in hand, or gives it back if it has not started."""
    # A worker is one process: its samples stay in its own memory. Inheriting the server's
    # PROMETHEUS_MULTIPROC_DIR would add them to the server's sums (and the server wipes that
    # directory when it restarts), so the variable is dropped before prometheus-client is
    # first imported, which fixes the mode for the process.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    stop_metrics = _serve_metrics(metrics_host, metrics_port) if metrics_port is not None else None

    async def work(settings: Settings, db: Database) -> None:
        from keyshift.cli.runs import stop_on_signals
        from keyshift.observability import tracing
        from keyshift.observability.logging import configure_logging

        # JSON lines on stderr, each carrying the run, batch and accounts it is about; and
        # traces if OTEL_* asks for them.
        configure_logging(settings.log_level)
        tracing.configure_from_env("keyshift-worker")
        tracing.instrument_engine(db.engine)
        from keyshift.context import Actor, cli_actor
        from keyshift.errors import PermissionDenied
        from keyshift.migration.executor import Executor
        from keyshift.runs.worker import Worker, tune_collector
        from keyshift.security import tokens
        from keyshift.security.secrets_store import load_secrets

        actor: Actor = cli_actor()
        if token is not None:
            async with db.transaction() as session:
                actor = await tokens.authenticate(session, token.strip())
            if not actor.can("migrations:run"):
                raise PermissionDenied("this token lacks the 'migrations:run' scope")
        executor = Executor(db, load_secrets(settings.secrets_dir).signing)
        w = Worker(executor, actor, poll_seconds=poll)
        tune_collector()
        with stop_on_signals(w.stopping):
            typer.echo(f"worker {w.worker_id} as {actor.id}: waiting for runs", err=True)
            processed = await w.run(run_id=run_id, until_idle=until_idle)
        typer.echo(f"worker {w.worker_id}: {processed} account(s) processed", err=True)

    try:
        run(work)
    finally:
        if stop_metrics is not None:
            stop_metrics()


def _serve_metrics(host: str, port: int) -> Callable[[], None]:
    """Start the worker's /metrics listener, or stop with a usage error naming the option."""
    from keyshift.observability.migration_metrics import serve_worker_metrics

    try:
        return serve_worker_metrics(host, port)
    except OSError as error:
        # An address that does not resolve is the host's fault; one in use, the port's.
        option = "--metrics-host" if isinstance(error, socket.gaierror) else "--metrics-port"
        reason = error.strerror or str(error)
        raise typer.BadParameter(
            f"cannot listen on {host}:{port}: {reason}", param_hint=f"'{option}'"
        ) from None
