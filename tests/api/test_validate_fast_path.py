"""The app serves `POST /v1/licenses/validate` with a bare ASGI endpoint ahead of the router
(``routes.validation.ValidateEndpoint``). These tests hold it to the declared FastAPI route:
the same answer for the same request, good or bad, and the same metrics labels."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from keyshift import client as sdk
from keyshift.api.app import create_app
from keyshift.api.routes.validation import ValidateEndpoint
from keyshift.api.state import AppState
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.licensing import activations
from keyshift.security.secrets_store import Secrets
from keyshift.validation import cache
from tests import factories
from tests.api.test_operations import sample

VALIDATE = "/v1/licenses/validate"


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    cache.default_cache.clear()


def _served_by_fast_path(app: FastAPI) -> bool:
    return any(isinstance(getattr(r, "app", None), ValidateEndpoint) for r in app.router.routes)


@pytest.fixture
async def declared(app_state: AppState) -> AsyncIterator[httpx.AsyncClient]:
    """The same app with the fast route taken out: FastAPI's declared route answers."""
    app = create_app(state=app_state)
    app.router.routes[:] = [
        r for r in app.router.routes if not isinstance(getattr(r, "app", None), ValidateEndpoint)
    ]
    assert not _served_by_fast_path(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://keyshift.test") as c:
        yield c


async def _key(db: Database, secrets: Secrets) -> str:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)
    _, key = await factories.issue_license(db, secrets, account.id)
    async with db.transaction() as session:
        await activations.activate(session, SYSTEM, secrets.keyring, key, "m1")
    return key


def test_the_app_serves_validation_from_the_fast_path(app_state: AppState) -> None:
    app = create_app(state=app_state)
    first = app.router.routes[0]
    assert isinstance(getattr(first, "app", None), ValidateEndpoint)
    # Still documented: the declared route is in the OpenAPI schema.
    assert "post" in app.openapi()["paths"][VALIDATE]


#: Shaped like a key (the schema's pattern and length), so that the problem is the other field.
KEYISH = b'"' + b"A" * 25 + b'"'

BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("not json", b"{nope", "body"),
    ("empty body", b"", "body"),
    ("a list", b"[]", "body"),
    ("a string", b'"key"', "body"),
    ("unknown field", b'{"key": ' + KEYISH + b', "admin": true}', "admin"),
    ("no key", b'{"fingerprint": "m1"}', "key"),
    ("key of wrong type", b'{"key": 12}', "key"),
    ("key too long", b'{"key": "' + b"A" * 65 + b'"}', "key"),
    (
        "absurd fingerprint",
        b'{"key": ' + KEYISH + b', "fingerprint": "' + b"f" * 10_000 + b'"}',
        "fingerprint",
    ),
    ("bad nonce", b'{"key": ' + KEYISH + b', "nonce": "has space"}', "nonce"),
    ("bad feature", b'{"key": ' + KEYISH + b', "feature": "DROP TABLE"}', "feature"),
    ("nested too deep", b'{"key": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body"),
    ("a number too long to convert", b'{"key": ' + b"1" * 4301 + b"}", "body"),
    ("not UTF-8", b'{"key": "\xff\xfe"}', "body"),
]


@pytest.mark.parametrize(("case", "raw", "field"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_input_answers_as_the_declared_route(
    client: httpx.AsyncClient,
    declared: httpx.AsyncClient,
    case: str,
    raw: bytes,
    field: str,
) -> None:
    headers = {"content-type": "application/json"}
    fast = await client.post(VALIDATE, content=raw, headers=headers)
    slow = await declared.post(VALIDATE, content=raw, headers=headers)
    assert fast.status_code == 422, (case, fast.text)
    assert fast.json()["error"]["field"] == field, fast.text
    assert fast.json()["error"]["code"] == "invalid_request"
    assert fast.status_code == slow.status_code
    assert fast.json() == slow.json()


async def test_a_malformed_key_answers_as_the_declared_route(
    client: httpx.AsyncClient, declared: httpx.AsyncClient
) -> None:
    body = {"key": "not-a-key"}
    fast, slow = await client.post(VALIDATE, json=body), await declared.post(VALIDATE, json=body)
    assert fast.status_code == slow.status_code == 422
    assert fast.json() == slow.json()
    assert fast.json()["error"]["field"] == "key"


async def test_valid_answers_match_and_verify(
    client: httpx.AsyncClient, declared: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    key = await _key(db, secrets)
    jwks = sdk.public_keys_from_jwks((await client.get("/v1/keys/signing")).json())
    answers: list[dict[str, Any]] = []
    for http in (client, declared):
        response = await http.post(
            VALIDATE, json={"key": key, "fingerprint": "m1", "feature": "export", "nonce": "n-1"}
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-request-id"]
        signed = sdk.verify_response(
            response.content, response.headers["keyshift-signature"], jwks, nonce="n-1"
        )
        assert signed["code"] == "VALID"
        answers.append({k: v for k, v in signed.items() if k not in ("issued_at", "server_time")})
    assert answers[0] == answers[1]


async def test_bodies_the_declared_route_accepts_are_accepted(
    client: httpx.AsyncClient, declared: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    key = await _key(db, secrets)
    text = json.dumps({"key": key, "fingerprint": "m1"})
    headers = {"content-type": "application/json"}
    for raw in (b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16")):
        fast = await client.post(VALIDATE, content=raw, headers=headers)
        slow = await declared.post(VALIDATE, content=raw, headers=headers)
        assert (fast.status_code, slow.status_code) == (200, 200), (fast.text, slow.text)
        assert fast.json()["code"] == slow.json()["code"] == "VALID"


async def test_metrics_label_the_fast_route_by_its_template(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    key = await _key(db, secrets)
    before = (await client.get("/metrics")).text
    for _ in range(2):
        assert (await client.post(VALIDATE, json={"key": key})).status_code == 200
    assert (
        await client.post(VALIDATE, content=b"{", headers={"content-type": "application/json"})
    ).status_code == 422
    after = (await client.get("/metrics")).text
    name = "keyshift_http_requests_total"

    def delta(**labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta(route=VALIDATE, method="POST", status="200") == 2
    assert delta(route=VALIDATE, method="POST", status="422") == 1
    assert delta(route="unmatched", method="POST", status="200") == 0


async def test_other_methods_answer_as_before(
    client: httpx.AsyncClient, declared: httpx.AsyncClient
) -> None:
    # GET /v1/licenses/validate is the admin read of a license whose id is "validate": it
    # needs a token, and the fast route must not shadow it.
    fast, slow = await client.get(VALIDATE), await declared.get(VALIDATE)
    assert fast.status_code == slow.status_code == 401
    assert fast.json() == slow.json()
    put = await client.put(VALIDATE, json={})
    assert put.status_code == (await declared.put(VALIDATE, json={})).status_code
    assert put.json()["error"]["code"] == "method_not_allowed"
