"""One API style for the migration, catalog, audit, token, health and data-object routes: every
route declares the body it answers with (a non-empty 2xx schema in the OpenAPI document), and
every instant in a real answer is RFC 3339 in UTC with ``Z`` (docs/operations.md,
"Timestamps")."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from keyshift.api.app import create_app
from keyshift.api.routes import accounts, audit, catalog, health, migrations, tokens
from keyshift.api.state import AppState
from keyshift.db.engine import Database
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers

Headers = dict[str, str]

#: The route modules this style covers, and the data-object routes in accounts.py.
MODULES = (audit, catalog, health, migrations, tokens)
OBJECT_ENDPOINTS = {accounts.put_object, accounts.list_objects}

#: Stored documents a response passes through verbatim (what is hashed, signed or kept in the
#: ledger): their text is theirs, not the response's.
STORED = {"plan", "receipt", "details", "content", "rollback"}
INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")


def _covered() -> list[APIRoute]:
    routes = [r for m in MODULES for r in m.router.routes]
    routes += [
        r for r in accounts.router.routes if getattr(r, "endpoint", None) in OBJECT_ENDPOINTS
    ]
    return [r for r in routes if isinstance(r, APIRoute)]


def test_every_route_declares_a_response_body(app_state: AppState) -> None:
    spec = create_app(state=app_state).openapi()
    routes = _covered()
    assert len(routes) > 20  # the modules were found
    for route in routes:
        if not route.include_in_schema:
            continue  # /metrics: Prometheus text, not JSON
        for method in sorted(route.methods or ()):
            operation = spec["paths"][route.path_format][method.lower()]
            where = f"{method} {route.path_format}"
            ok = {s: r for s, r in operation["responses"].items() if s.startswith("2")}
            assert ok, where
            for status, response in ok.items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                assert schema, (where, status)
                # A model, or a list of one: not a bare object (``dict[str, Any]``).
                model = schema.get("items", schema)
                assert "$ref" in model, (where, status, schema)
                name = model["$ref"].rsplit("/", 1)[-1]
                assert spec["components"]["schemas"][name].get("properties"), (where, name)


def _instants(body: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in ``body`` that reads as a date-time, with where it is, outside the
    stored documents."""
    if isinstance(body, dict):
        for key, value in body.items():
            if key not in STORED:
                yield from _instants(value, f"{path}.{key}")
    elif isinstance(body, list):
        for index, value in enumerate(body):
            yield from _instants(value, f"{path}.{index}")
    elif isinstance(body, str) and INSTANT.match(body):
        yield path, body


async def test_every_instant_in_an_answer_is_utc_with_z(
    db: Database, secrets: Secrets, client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    await helpers.publish(db)
    account_id, _ = await helpers.rich_account(db, secrets)
    answers: dict[str, Any] = {}

    async def call(method: str, url: str, status: int = 200, **kwargs: Any) -> Any:
        response = await client.request(method, url, headers=admin_headers, **kwargs)
        assert response.status_code == status, (url, response.text)
        answers[f"{method} {url}"] = response.json()
        return response.json()

    made = await call(
        "POST", "/v1/tokens", 201, json={"name": "z", "scopes": ["audit:read"], "ttl_seconds": 600}
    )
    await call("GET", "/v1/tokens")
    revoked = await call("DELETE", f"/v1/tokens/{made['id']}")
    await call("GET", "/v1/catalog")
    await call("GET", f"/v1/catalog/plan/{helpers.OLD}")
    stored = await call(
        "POST",
        f"/v1/accounts/{account_id}/objects",
        201,
        json={
            "quota": "storage",
            "name": "r",
            "units": 1,
            "content_base64": base64.b64encode(b"x").decode(),
        },
    )
    await call("GET", f"/v1/accounts/{account_id}/objects")
    applied = await call(
        "POST", "/v1/migrations", 201, json={"rules": helpers.RULES, "account_id": account_id}
    )
    await call("GET", f"/v1/migrations/{applied['id']}")
    await call("GET", f"/v1/accounts/{account_id}/migrations")
    rolled = await call("POST", f"/v1/migrations/{applied['id']}/rollback")
    await call("GET", "/v1/audit/events", params={"limit": 1000})

    # Each kind of instant is there to be checked, with and without microseconds.
    assert made["expires_at"] and revoked["revoked_at"] and stored["created_at"]
    assert applied["cutover_at"] and applied["finished_at"] and rolled["ledger"][-1]["at"]
    found = [(url, where, text) for url, body in answers.items() for where, text in _instants(body)]
    assert len(found) > 30
    wrong = [f for f in found if not f[2].endswith("Z") or "+00:00" in f[2]]
    assert not wrong, wrong

    # What a token.create event records of the expiry is the same text the API shows.
    events = answers["GET /v1/audit/events"]
    created = next(
        e for e in events if e["action"] == "token.create" and e["target_id"] == made["id"]
    )
    assert created["details"]["expires_at"] == made["expires_at"]
    verified = await call("GET", "/v1/audit/verify")
    assert verified["ok"], verified


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_answers_fit_their_declared_models(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 200, response.text
    model = health.Liveness if path == "/healthz" else health.Readiness
    assert model.model_validate(response.json()).model_dump() == response.json()
