"""Liveness, readiness and the Prometheus metrics: the operator's endpoints, unauthenticated
(they reveal counts, never data; keep them off the public listener if that matters)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import Field
from sqlalchemy import text

from keyshift.api.deps import State
from keyshift.api.errors import JsonResponse
from keyshift.api.schemas import Response as Body
from keyshift.db.migrate import current_revision, head_revision
from keyshift.observability import metrics as metrics_registry
from keyshift.observability import migration_metrics
from keyshift.runs import metrics as run_metrics

router = APIRouter(tags=["health"])


class Liveness(Body):
    status: Literal["ok"]


class Readiness(Body):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(
        description="Each check (`database`, `migrations`): `ok`, or what is wrong."
    )


@router.get("/healthz")
async def healthz() -> Liveness:
    """The process is up (no dependencies checked)."""
    return Liveness(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {
            "model": Readiness,
            "description": "Not ready: the body's `checks` say which check failed.",
        }
    },
)
async def readyz(state: State) -> JsonResponse:
    """The database answers and its schema is at the code's migration head."""
    checks: dict[str, str] = {}
    try:
        async with state.db.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
        current, head = await current_revision(state.db.engine), head_revision()
        checks["migrations"] = "ok" if current == head else f"at {current}, code expects {head}"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values()) and "migrations" in checks
    return JsonResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    """Prometheus text format; summed over every worker process under ``--workers`` > 1,
    followed by the gauges read from the database now (runs, queues, leases, and whether the
    database answered at all)."""
    body, content_type = metrics_registry.render()
    gauges = await run_metrics.read_gauges(state.db)
    return Response(body + migration_metrics.render_gauges(gauges), media_type=content_type)
