"""A database outage against a real server: a PRIVATE PostgreSQL instance (initdb into a
temporary directory, its own port — never the shared one: the ``private_postgres``
fixture) is stopped under a running `keyshift serve`. Requests that need the database get 503 with ``Retry-After`` and the usual
error body, the log says so once (no traceback per request), a validation already in the
cache keeps answering from it, and when the instance is back everything works again with
no restart of the server.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import orjson
import pytest

from keyshift.accounts import service as accounts
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.migrate import upgrade_to_head
from keyshift.licensing import service as licensing
from keyshift.security import tokens
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers
from tests.private_postgres import PrivatePostgres
from tests.support import serving

pytestmark = pytest.mark.server


async def _seed(url: str, secrets: Secrets) -> tuple[str, str, str, str]:
    """A migrated database with the catalog, one account on a plan with two licenses, and an
    admin token: (account id, key to cache, key never validated, token)."""
    db = Database(url)
    try:
        await upgrade_to_head(db.engine)
        await helpers.publish(db)
        async with db.transaction() as session:
            account = await accounts.create_account(session, SYSTEM, name="Outage Co")
            await accounts.subscribe(session, SYSTEM, account.id, helpers.NEW)
            keys = [
                (
                    await licensing.issue_license(
                        session, SYSTEM, secrets.keyring, account_id=account.id
                    )
                ).key
                for _ in range(2)
            ]
            token = await tokens.create_token(session, SYSTEM, name="ops", scopes=["admin"])
        return account.id, keys[0], keys[1], token.plaintext
    finally:
        await db.dispose()


def _log_lines(path: Path) -> list[dict[str, object]]:
    lines = []
    for raw in path.read_text().splitlines():
        try:
            lines.append(orjson.loads(raw))
        except orjson.JSONDecodeError:
            lines.append({"message": raw, "unparsed": True})
    return lines


def _poll(check: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


def test_an_outage_is_503_logged_once_cached_validations_answer_and_it_recovers(
    private_postgres: PrivatePostgres, secrets: Secrets, secrets_dir: Path, tmp_path: Path
) -> None:
    account_id, cached_key, other_key, token = asyncio.run(_seed(private_postgres.url, secrets))
    env = {
        **os.environ,
        "KEYSHIFT_DATABASE_URL": private_postgres.url,
        "KEYSHIFT_SECRETS_DIR": str(secrets_dir),
    }
    log_path = tmp_path / "serve.log"
    admin = {"Authorization": f"Bearer {token}"}

    with serving(env, log_path) as server, httpx.Client(base_url=server.base_url) as http:

        def validate(key: str) -> httpx.Response:
            return http.post("/v1/licenses/validate", json={"key": key}, timeout=10)

        assert validate(cached_key).json()["code"] == "VALID"
        assert http.get(f"/v1/accounts/{account_id}", headers=admin).status_code == 200

        private_postgres.stop()

        # Long enough for the cache's LISTEN connection to notice and fail to reconnect
        # (then every cached entry is expired: only the outage fallback can answer).
        during: list[httpx.Response] = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            during += [
                http.get(f"/v1/accounts/{account_id}", headers=admin, timeout=10),
                http.put(
                    f"/v1/accounts/{account_id}/preferences",
                    json={"x": 1},
                    headers=admin,
                    timeout=10,
                ),
                validate(other_key),  # never cached: needs the database
                http.get("/v1/accounts", headers=admin, timeout=10),
            ]
            time.sleep(0.1)
        assert len(during) >= 40
        for response in during:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert error["code"] == "database_unavailable" and error["message"]
        # A license validated before the outage keeps validating, from the cache.
        for _ in range(3):
            response = validate(cached_key)
            assert response.status_code == 200, response.text
            assert response.json()["code"] == "VALID"
        assert http.get("/readyz").status_code == 503

        private_postgres.start()

        assert _poll(
            lambda: http.get(f"/v1/accounts/{account_id}", headers=admin).status_code == 200, 30
        ), "the server did not recover"
        assert validate(other_key).json()["code"] == "VALID"
        put = http.put(f"/v1/accounts/{account_id}/preferences", json={"x": 2}, headers=admin)
        assert put.status_code == 200, put.text
        assert _poll(lambda: http.get("/readyz").status_code == 200, 30)

    lines = _log_lines(log_path)
    assert not [line for line in lines if "exc" in line or "Traceback" in str(line)], lines
    messages = [str(line.get("message")) for line in lines]
    assert sum("database unreachable" in m for m in messages) == 1, messages
    assert sum("database reachable again" in m for m in messages) == 1, messages
    assert sum("cache listener disconnected" in m for m in messages) == 1, messages
    assert not [line for line in lines if line.get("status") == 500], lines
