"""Health, readiness, metrics, request ids and JSON logs, in process."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text

from keyshift.db.engine import Database
from keyshift.db.migrate import head_revision
from keyshift.db.tables import AuditEvent
from keyshift.licensing import keys
from keyshift.observability import metrics
from keyshift.observability.logging import JsonFormatter, request_id_var
from tests.support import mint_token


def sample(exposition: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def test_healthz_answers_without_the_database(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_readyz_is_ready_on_a_migrated_database(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "migrations": "ok"},
    }


async def test_readyz_is_503_naming_an_old_schema_revision(
    client: httpx.AsyncClient, db: Database
) -> None:
    head = head_revision()
    async with db.transaction() as session:
        await session.execute(text("UPDATE alembic_version SET version_num = 'old0'"))
    try:
        response = await client.get("/readyz")
    finally:
        async with db.transaction() as session:
            await session.execute(text("UPDATE alembic_version SET version_num = :h"), {"h": head})
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["migrations"] == f"at old0, code expects {head}"
    assert (await client.get("/readyz")).status_code == 200


async def test_metrics_count_requests_by_route_template_and_status(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    before = (await client.get("/metrics")).text
    route = "/v1/tokens/{token_id}"
    for _ in range(3):
        assert (await client.delete("/v1/tokens/nope", headers=admin_headers)).status_code == 404
    await client.get("/no/such/path/unrouted-zq")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text
    name = "keyshift_http_requests_total"

    def delta(**labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta(route=route, method="DELETE", status="404") == 3
    assert delta(route="unmatched", method="GET", status="404") == 1
    # The raw path never becomes a label value.
    assert "/v1/tokens/nope" not in after and "unrouted-zq" not in after
    count = "keyshift_http_request_duration_seconds_count"
    assert (
        sample(after, count, route=route, method="DELETE")
        - sample(before, count, route=route, method="DELETE")
        == 3
    )


async def test_record_validation_counts_by_code(client: httpx.AsyncClient) -> None:
    name = "keyshift_validations_total"
    before = (await client.get("/metrics")).text
    metrics.record_validation("VALID")
    metrics.record_validation("VALID")
    metrics.record_validation("EXPIRED")
    after = (await client.get("/metrics")).text
    assert sample(after, name, code="VALID") - sample(before, name, code="VALID") == 2
    assert sample(after, name, code="EXPIRED") - sample(before, name, code="EXPIRED") == 1


async def test_request_id_is_returned_and_a_safe_incoming_one_kept(
    client: httpx.AsyncClient,
) -> None:
    minted = (await client.get("/healthz")).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", minted)
    assert minted != (await client.get("/healthz")).headers["x-request-id"]
    kept = await client.get("/healthz", headers={"x-request-id": "lb-7f3a.2:x"})
    assert kept.headers["x-request-id"] == "lb-7f3a.2:x"
    unsafe = await client.get("/healthz", headers={"x-request-id": "a b<script>"})
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["x-request-id"])


async def test_audit_event_carries_the_responses_request_id(
    client: httpx.AsyncClient, db: Database
) -> None:
    admin = await mint_token(db, "admin")
    response = await client.post(
        "/v1/tokens",
        json={"name": "w", "scopes": ["audit:read"]},
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert response.status_code == 201
    async with db.transaction() as session:
        event = (
            await session.execute(
                select(AuditEvent).where(AuditEvent.target_id == response.json()["id"])
            )
        ).scalar_one()
    assert event.action == "token.create"
    assert event.request_id == response.headers["x-request-id"]
    assert event.actor.startswith("token:")


async def test_access_log_line_has_request_fields(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keyshift.access")
    response = await client.get("/v1/tokens/abc", headers={"x-request-id": "log-me-1"})
    records = [r for r in caplog.records if r.name == "keyshift.access"]
    assert records, "no access log line"
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["request_id"] == "log-me-1" == response.headers["x-request-id"]
    assert line["method"] == "GET"
    assert line["route"] == "/v1/tokens/{token_id}"
    assert line["status"] == 405
    assert line["duration_ms"] >= 0
    assert line["logger"] == "keyshift.access" and line["level"] == "INFO"
    assert line["message"] == "request" and line["ts"].endswith("+00:00")


def test_json_formatter_takes_the_request_id_from_context() -> None:
    token = request_id_var.set("ctx-42")
    try:
        record = logging.LogRecord(
            "keyshift.x", logging.WARNING, __file__, 1, "hi %s", ("you",), None
        )
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["request_id"] == "ctx-42" and line["message"] == "hi you"
    assert "method" not in line


def test_json_formatter_puts_a_traceback_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("k", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    out = JsonFormatter().format(record)
    assert "\n" not in out
    assert "ValueError: boom" in json.loads(out)["exc"]


def test_prepare_multiprocess_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Recorded as it was (unset, usually) and restored so after the test: a plain delenv of an
    # unset variable records nothing, and the directory prepare_multiprocess_dir(2) sets below
    # would outlive the test, removed, in every process this one spawns later.
    monkeypatch.setenv(metrics.MULTIPROC_ENV, "")
    monkeypatch.delenv(metrics.MULTIPROC_ENV)
    assert metrics.prepare_multiprocess_dir(1) is None
    assert metrics.MULTIPROC_ENV not in os.environ

    made = metrics.prepare_multiprocess_dir(2)
    assert made is not None and made.is_dir() and not any(made.iterdir())
    assert os.environ[metrics.MULTIPROC_ENV] == str(made)
    metrics.remove_multiprocess_dir(made)
    assert not made.exists()

    mine = tmp_path / "prom"
    mine.mkdir()
    (mine / "histogram_123.db").write_bytes(b"old")
    (mine / "keep.txt").write_text("not ours")
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(mine))
    assert metrics.prepare_multiprocess_dir(1) == mine
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]
    metrics.remove_multiprocess_dir(mine)
    assert mine.exists()


async def test_validate_endpoint_counts_each_answer_by_code(
    client: httpx.AsyncClient, db: Database
) -> None:
    """The real endpoint feeds keyshift_validations_total (not just the helper)."""
    name = "keyshift_validations_total"
    before = sample((await client.get("/metrics")).text, name, code="NOT_FOUND")
    unissued = keys.generate()
    for _ in range(3):
        answer = await client.post("/v1/licenses/validate", json={"key": unissued})
        assert answer.json()["code"] == "NOT_FOUND"
    after = sample((await client.get("/metrics")).text, name, code="NOT_FOUND")
    assert after - before == 3
