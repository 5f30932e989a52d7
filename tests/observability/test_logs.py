"""Logs: every line a run writes carries its run, batch and account ids; and no line ever
holds a secret — the test creates tokens, license keys and the secrets directory's keys, runs
the demo's flows (tokens minted and revoked, accounts, licenses, activations, validations of
good, mistyped and unknown keys, offline files, a migration and its rollback, refused and
oversized requests carrying a key) and a run, with every logger at DEBUG, then greps every
captured line — this process's, a real server's stderr, a real worker's — for each of them."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyshift.api.app import create_app
from keyshift.api.state import AppState
from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.licensing import keys as license_keys
from keyshift.licensing.keys import KeyFormatError
from keyshift.migration.executor import Executor
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
from tests.support import cli_env, mint_token, serving

#: The test's own HTTP client, which logs the URLs it requests (the server uses no httpx).
_CLIENT_LOGGERS = ("httpx", "httpcore")


class Captured(logging.Handler):
    """Every record logged anywhere in this process — but the test's HTTP client's —
    formatted as the server formats it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(_CLIENT_LOGGERS):
            self.lines.append(self.format(record))


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def directory_secrets(directory: Path) -> list[str]:
    """The keyring's data keys, its lookup key and the signing keys, as stored (base64) and
    as the raw bytes' hex and URL-safe base64: a leak in any of these forms is found."""
    found: list[str] = []
    for path in sorted(directory.glob("*.json")):
        document = json.loads(path.read_text())
        values = [*document.get("keys", {}).values()]
        if "lookup_key" in document:
            values.append(document["lookup_key"])
        for value in values:
            raw = base64.b64decode(value)
            found += [value, raw.hex(), base64.urlsafe_b64encode(raw).decode().rstrip("=")]
    assert len(found) >= 9, f"no keys read from {directory}"
    return found


async def demo_flows(http: httpx.AsyncClient, admin: str, account_id: str) -> list[str]:
    """What the demo does, over HTTP, plus the refusals a careless client meets; returns
    every secret it created or sent."""
    bearer = {"Authorization": f"Bearer {admin}"}

    async def ok(response: httpx.Response, *statuses: int) -> dict[str, Any]:
        assert response.status_code in statuses, (response.request.url, response.text)
        body: dict[str, Any] = response.json() if response.content else {}
        return body

    made = await ok(
        await http.post(
            "/v1/tokens", json={"name": "reader", "scopes": ["audit:read"]}, headers=bearer
        ),
        201,
    )
    reader = made["token"]
    await ok(await http.get("/v1/audit/events", headers={"Authorization": f"Bearer {reader}"}), 200)
    await ok(await http.delete(f"/v1/tokens/{made['id']}", headers=bearer), 200, 204)
    await ok(await http.get("/v1/audit/events", headers={"Authorization": f"Bearer {reader}"}), 401)
    await ok(await http.get("/v1/accounts", headers={"Authorization": f"Bearer {admin}x"}), 401)

    account = await ok(
        await http.post(
            "/v1/accounts", json={"name": "Logged Co", "plan": helpers.OLD}, headers=bearer
        ),
        201,
    )
    issued = await ok(
        await http.post("/v1/licenses", json={"account_id": account["id"]}, headers=bearer), 201
    )
    key = issued["key"]
    machine = {"key": key, "fingerprint": "machine-logged"}
    await ok(await http.post("/v1/licenses/activate", json=machine), 201)
    await ok(await http.post("/v1/licenses/heartbeat", json=machine), 200)
    await ok(await http.post("/v1/licenses/validate", json={"key": key}), 200)
    unknown = license_keys.generate()
    await ok(await http.post("/v1/licenses/validate", json={"key": unknown}), 200)
    mistyped = key[:-1] + ("0" if key[-1] != "0" else "1")
    await ok(await http.post("/v1/licenses/validate", json={"key": mistyped}), 200, 422)
    await ok(await http.post("/v1/licenses/checkout", json=machine), 200, 201)
    await ok(
        await http.post(f"/v1/licenses/{issued['id']}/file", json={}, headers=bearer),
        200,
        201,
    )
    # Refused requests that carry the key: a query parameter, broken JSON, a huge body.
    await ok(await http.post(f"/v1/licenses/validate?key={key}", json={"key": key}), 422)
    broken = await http.post(
        "/v1/licenses/validate",
        content=f'{{"key": "{key}", '.encode(),
        headers={"content-type": "application/json"},
    )
    await ok(broken, 422)
    huge = await http.post("/v1/licenses/validate", json={"key": key, "pad": "x" * 70_000})
    await ok(huge, 413)
    await ok(await http.post("/v1/licenses/deactivate", json=machine), 200)

    migration = await ok(
        await http.post(
            "/v1/migrations",
            json={"rules": helpers.RULES, "account_id": account_id},
            headers=bearer,
        ),
        201,
    )
    await ok(
        await http.post(f"/v1/migrations/{migration['id']}/rollback", json={}, headers=bearer), 200
    )
    return [admin, reader, key, unknown, mistyped]


def assert_no_secret(lines: list[str], secrets: list[str], where: str) -> None:
    assert lines, f"nothing was logged {where}"
    text = "\n".join(lines)
    for secret in secrets:
        assert secret not in text, f"a secret ({secret[:6]}…) is in the log {where}"
    # The keys' own shape, whatever key it is (one this test did not see, e.g. the demo's).
    assert not license_keys_in(text), f"a license key is in the log {where}"


def license_keys_in(text: str) -> list[str]:
    """Whatever in ``text`` is a well-formed license key (its check character holds)."""
    found = []
    for candidate in re.findall(r"\b[0-9A-Z]{5}(?:-[0-9A-Z]{5}){4}\b", text):
        try:
            found.append(license_keys.normalise(candidate))
        except KeyFormatError:
            continue
    return found


def check_run_lines(lines: list[dict[str, Any]], run_id: str, ids: list[str], failing: str) -> None:
    """Every line written while a batch was worked names the run, the batch and its accounts;
    each batch says how it settled; each failure names its account (and its migration, if one
    committed)."""
    mine = [line for line in lines if line.get("run_id") == run_id]
    batches = {line["batch_id"] for line in mine}
    assert None not in batches
    for line in mine:
        named = [line["account_id"]] if "account_id" in line else line.get("account_ids")
        assert named and set(named) <= set(ids), line
    settled = [line for line in mine if line["message"] == "batch settled"]
    assert {line["batch_id"] for line in settled} == batches
    assert sum(sum(line["outcomes"].values()) for line in settled) == len(ids) + 1  # one retry
    failures = [line for line in mine if line["message"].startswith("account failed")]
    assert failures and {line["account_id"] for line in failures} == {failing}
    # Its prepare fails inside the lock step's transaction: no migration of it ever commits,
    # so the line names none (a failure in a later phase names the migration).
    assert all(line["level"] == "WARNING" and not line.get("migration_id") for line in failures)
    assert "hash" in failures[0]["message"]
    # Nothing of the run is logged outside its batches without its ids.
    for line in lines:
        if line["logger"].startswith("keyshift.runs") and line.get("run_id") is None:
            raise AssertionError(f"a run's line without its ids: {line}")


async def test_every_line_a_run_writes_carries_its_run_batch_and_account_ids(
    db: Database, secrets: Secrets, captured: Captured
) -> None:
    ids = await cohort(db, secrets, 3)
    await corrupt_an_archived_object(db, ids[0])
    run = await approved_run(db, options=RunOptions(batch_size=3, max_attempts=2))
    await service.start(db, CREATOR, run.id)
    await drive(Executor(db, secrets.signing), run.id)
    assert (await states(db, run.id))[ids[0]] == "quarantined"
    check_run_lines([json.loads(line) for line in captured.lines], run.id, ids, ids[0])


async def test_no_secret_is_logged_in_this_process(
    db: Database,
    secrets: Secrets,
    secrets_dir: Path,
    app_state: AppState,
    captured: Captured,
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    admin = await mint_token(db, "admin")
    app = create_app(state=app_state)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://keyshift.test") as http:
        created = await demo_flows(http, admin, account_id)
    ids = await cohort(db, secrets, 2)
    run = await approved_run(db, options=RunOptions(batch_size=2))
    await service.start(db, CREATOR, run.id)
    await drive(Executor(db, secrets.signing), run.id)
    assert set((await states(db, run.id)).values()) <= {"migrated", "skipped"}, ids
    assert_no_secret(
        captured.lines,
        [*created, *(key for _, key in keys), *directory_secrets(secrets_dir)],
        "of this process",
    )


async def test_no_secret_is_logged_by_a_real_server_or_worker(
    db: Database, secrets: Secrets, secrets_dir: Path, settings: Settings, tmp_path: Path
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    admin = await mint_token(db, "admin")
    env = {**cli_env(settings), "KEYSHIFT_LOG_LEVEL": "DEBUG"}
    server_log = tmp_path / "serve.log"
    with serving(env, server_log) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            created = await demo_flows(http, admin, account_id)
    logs = {"of the server": server_log.read_text()}
    if db.dialect == "postgresql":  # workers of their own share PostgreSQL
        ids = await cohort(db, secrets, 3)
        await corrupt_an_archived_object(db, ids[0])
        run = await approved_run(db, options=RunOptions(batch_size=3, max_attempts=2))
        await service.start(db, CREATOR, run.id)
        worker_log = tmp_path / "worker.log"
        with worker_log.open("wb") as out:
            worker = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "keyshift.cli", "worker", "--run", run.id, "--until-idle",
                env=env, stdout=subprocess.DEVNULL, stderr=out,
            )  # fmt: skip
            try:
                code = await asyncio.wait_for(worker.wait(), 120)
            finally:
                if worker.returncode is None:
                    worker.kill()
                    await worker.wait()
        logs["of the worker"] = worker_log.read_text()
        assert code == 0, logs["of the worker"][-3000:]
        in_run = sorted(await states(db, run.id))  # the cohort: every account on the old plan
        assert set(ids) <= set(in_run)
        check_run_lines(json_lines(logs["of the worker"]), run.id, in_run, ids[0])
    every = [*created, *(key for _, key in keys), *directory_secrets(secrets_dir)]
    for where, text in logs.items():
        assert_no_secret(text.splitlines(), every, where)
    assert any(
        line.get("route") == "/v1/licenses/validate" for line in json_lines(logs["of the server"])
    )
