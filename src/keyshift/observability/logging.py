"""JSON logs: one object per line on stderr, carrying the current request's id.

``keyshift serve`` hands :func:`uvicorn_log_config` to uvicorn, so uvicorn's own loggers and
every worker process it spawns log through the same formatter.
"""

from __future__ import annotations

import logging
import logging.config
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

from keyshift.observability import tracing
from keyshift.observability.context import work_var

#: The id of the request being handled in this context (set by the request middleware).
request_id_var: ContextVar[str | None] = ContextVar("keyshift_request_id", default=None)

#: Fields a caller may pass through ``extra=`` that become top-level keys of the line.
REQUEST_FIELDS = ("method", "route", "status", "duration_ms")
#: Fields about a run's work that a caller may pass through ``extra=`` (an ``account_id`` given
#: there names the one account of the batch the line is about).
WORK_FIELDS = ("account_id", "migration_id", "outcomes", "worker", "attempt")
_OPTIONAL_FIELDS = (*REQUEST_FIELDS, "path", "error_code", *WORK_FIELDS)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, message, request_id; inside a
    run's batch (``context.bound``) run_id, batch_id and account_ids (or account_id, for a
    batch of one or a line about one account); with tracing on, trace_id and span_id; and,
    when given, method, route, status, duration_ms. A traceback goes into ``exc`` (server
    side only)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        work = work_var.get()
        if work is not None:
            line["run_id"] = work.run_id
            line["batch_id"] = work.batch_id
            if work.account_id is not None:
                line["account_id"] = work.account_id
            elif not hasattr(record, "account_id"):
                line["account_ids"] = work.account_ids
        ids = tracing.trace_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        for name in _OPTIONAL_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return orjson.dumps(line, default=str).decode()


def log_config(level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` that sends everything (ours and uvicorn's) to stderr as
    JSON. Uvicorn applies it again in each worker process, so workers log the same way."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "keyshift.observability.logging.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # Uvicorn's loggers keep no handlers of their own and propagate to root.
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            # Our middleware writes one access line per request (with route and request id);
            # uvicorn's access log would duplicate it without those.
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": True},
        },
    }


def configure_logging(level: str = "INFO") -> None:
    """Install the JSON configuration in this process."""
    logging.config.dictConfig(log_config(level))
