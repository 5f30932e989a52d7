"""During a downgrade's grace, validation shows the merged entitlements, the account's grant
before the migration (``entitlements.previous``) and ``grace_until``, all signed; outside the
grace there is no previous set. On both databases, through the fast path and the declared
route."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from keyshift import client as sdk
from keyshift.api.app import create_app
from keyshift.api.routes.validation import ValidateEndpoint
from keyshift.api.state import AppState
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Subscription
from keyshift.migration.executor import Executor
from keyshift.security.secrets_store import Secrets
from keyshift.validation import cache
from keyshift.validation import service as validation
from tests.migration import helpers

VALIDATE = "/v1/licenses/validate"
GRACE_RULES = helpers.RULES.replace(
    'projects = { on_conflict = "archive" }',
    'projects = { on_conflict = "grace", grace_days = 30 }',
)
#: rich_account's grant on old-seat@1: the plan's features and quotas, plus the ``extra``
#: add-on's 50 units of storage.
PREVIOUS = {
    "plan": helpers.OLD,
    "edition": "old@1",
    "features": {
        "a": {"mode": "enabled"},
        "b": {"mode": "enabled"},
        "c": {"mode": "throttled", "limit": 10, "period": "day"},
    },
    "quotas": {"projects": 10, "storage": 150},
}


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    cache.default_cache.clear()


async def _validate(
    db: Database, secrets: Secrets, key: str, now: datetime | None = None
) -> dict[str, Any]:
    """Validate at ``now`` and return the body after checking its signature and nonce."""
    result = await validation.validate(
        db.transaction, secrets.keyring, secrets.signing, key=key, nonce="n-1", now=now
    )
    jwks = sdk.public_keys_from_jwks({"keys": secrets.signing.public_jwks()})
    return sdk.verify_response(result.body, result.signature_header, jwks, nonce="n-1")


async def test_grace_shows_the_previous_set_beside_the_merged_one_and_signs_both(
    app_state: AppState, client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    key = keys[0][1]
    before = await _validate(db, secrets, key)
    assert "previous" not in before["entitlements"]
    assert "grace_until" not in before["entitlements"]

    row = await Executor(db, secrets.signing).apply(SYSTEM, helpers.rules(GRACE_RULES), account_id)
    assert row.state == "completed", row.error

    # The app's fast path and the declared route: the same signed answer.
    declared_app = create_app(state=app_state)
    declared_app.router.routes[:] = [
        r
        for r in declared_app.router.routes
        if not isinstance(getattr(r, "app", None), ValidateEndpoint)
    ]
    transport = httpx.ASGITransport(app=declared_app)
    jwks = sdk.public_keys_from_jwks((await client.get("/v1/keys/signing")).json())
    answers = []
    async with httpx.AsyncClient(transport=transport, base_url="http://keyshift.test") as declared:
        for http in (client, declared):
            response = await http.post(VALIDATE, json={"key": key, "nonce": "n-2"})
            assert response.status_code == 200, response.text
            signed = sdk.verify_response(
                response.content, response.headers["keyshift-signature"], jwks, nonce="n-2"
            )
            answers.append(
                {k: v for k, v in signed.items() if k not in ("issued_at", "server_time")}
            )
    assert answers[0] == answers[1]
    during = answers[0]["entitlements"]
    assert during["plan"] == helpers.NEW
    assert during["previous"] == PREVIOUS
    # The merged set: the new plan with the old grants the grace keeps.
    assert during["quotas"]["projects"] == 10
    assert during["features"]["b"] == {"mode": "enabled"}
    assert during["features"]["d"] == {"mode": "enabled"}
    grace_until = datetime.fromisoformat(during["grace_until"].replace("Z", "+00:00"))

    after = await _validate(db, secrets, key, now=grace_until + timedelta(seconds=1))
    assert after["code"] == "VALID"
    assert "previous" not in after["entitlements"]
    assert "grace_until" not in after["entitlements"]
    assert after["entitlements"]["quotas"]["projects"] == 3


async def test_a_grace_stored_without_the_previous_set_still_validates(
    db: Database, secrets: Secrets
) -> None:
    # Graces planned before the previous set was recorded: the merged set, nothing more.
    await helpers.publish(db)
    account_id, keys = await helpers.rich_account(db, secrets)
    row = await Executor(db, secrets.signing).apply(SYSTEM, helpers.rules(GRACE_RULES), account_id)
    assert row.state == "completed", row.error
    async with db.transaction() as session:
        sub = await session.get(Subscription, account_id)
        assert sub is not None
        grace = {k: v for k, v in sub.overrides["grace"].items() if k != "previous"}
        sub.overrides = {**sub.overrides, "grace": grace}

    body = await _validate(db, secrets, keys[0][1])

    assert body["code"] == "VALID"
    assert "grace_until" in body["entitlements"]
    assert "previous" not in body["entitlements"]
