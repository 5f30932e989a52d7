"""One API style for the client-facing routes (accounts, licenses, validation, usage; the
migration side is in test_response_models.py): every route of those modules declares the
shape of its success answer in the OpenAPI spec, and every instant an answer carries is
RFC 3339 in UTC with ``Z`` (docs/licensing.md, "Timestamps")."""

from __future__ import annotations

import re
from typing import Any

import httpx
from fastapi.routing import APIRoute

from keyshift.api.app import create_app
from keyshift.api.routes import accounts, licenses, usage, validation
from keyshift.api.state import AppState
from keyshift.db.engine import Database
from keyshift.security.secrets_store import Secrets
from tests.metering.helpers import metered_license
from tests.support import mint_token

MODULES = (accounts, licenses, validation, usage)
#: Something that looks like a date-time, wherever it is in an answer.
DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def _is_declared(spec: dict[str, Any], schema: dict[str, Any]) -> bool:
    """A schema that says what the answer holds: an object with named properties, or an array
    of those; not ``{}`` nor an object of anything (``dict[str, Any]``)."""
    schema = _resolve(spec, schema)
    if schema.get("type") == "array":
        return _is_declared(spec, schema.get("items", {}))
    return bool(schema.get("properties"))


def test_every_route_declares_its_success_body(app_state: AppState) -> None:
    spec = create_app(state=app_state).openapi()
    routes = [
        r
        for module in MODULES
        for r in module.router.routes
        if isinstance(r, APIRoute) and r.include_in_schema
    ]
    assert len(routes) > 30  # the four modules' routes were found
    undeclared = []
    for route in routes:
        for method in route.methods:
            responses = spec["paths"][route.path][method.lower()]["responses"]
            bodies = [
                body.get("content", {}).get("application/json", {}).get("schema", {})
                for status, body in responses.items()
                if status.startswith("2")
            ]
            if not bodies or not all(_is_declared(spec, body) for body in bodies):
                undeclared.append(f"{method} {route.path}")
    assert not undeclared, "routes without a declared success body: " + ", ".join(undeclared)


def _instants(value: Any, where: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [i for k, v in value.items() for i in _instants(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [i for n, v in enumerate(value) for i in _instants(v, f"{where}[{n}]")]
    if isinstance(value, str) and DATE_TIME.match(value):
        return [(where, value)]
    return []


async def test_every_instant_in_an_answer_is_utc_with_z(
    client: httpx.AsyncClient, db: Database, secrets: Secrets
) -> None:
    account_id, _license_id, key = await metered_license(db, secrets)  # the sample plans too
    admin = {"Authorization": f"Bearer {await mint_token(db, 'admin')}"}
    answers: dict[str, httpx.Response] = {}

    async def call(name: str, method: str, path: str, **kw: Any) -> dict[str, Any]:
        answer = await client.request(method, path, **kw)
        assert answer.status_code in (200, 201), (name, answer.text)
        answers[name] = answer
        return dict(answer.json()) if isinstance(answer.json(), dict) else {}

    created = await call(
        "create account",
        "POST",
        "/v1/accounts",
        json={"name": "Z Co", "plan": "seat-node@1"},
        headers=admin,
    )
    await call("show account", "GET", f"/v1/accounts/{created['id']}", headers=admin)
    issued = await call(
        "issue license",
        "POST",
        "/v1/licenses",
        json={"account_id": created["id"], "expires_at": "2040-01-01T02:00:00+02:00"},
        headers=admin,
    )
    assert issued["expires_at"] == "2040-01-01T00:00:00Z"  # given with an offset, shown in UTC
    await call("show license", "GET", f"/v1/licenses/{issued['id']}", headers=admin)
    await call("renew", "POST", f"/v1/licenses/{issued['id']}/renew", json={}, headers=admin)
    await call(
        "activate",
        "POST",
        "/v1/licenses/activate",
        json={"key": issued["key"], "fingerprint": "m1"},
    )
    await call("activations", "GET", f"/v1/licenses/{issued['id']}/activations", headers=admin)
    await call(
        "checkout",
        "POST",
        "/v1/licenses/checkout",
        json={"key": issued["key"], "fingerprint": "m1", "ttl": "1d"},
    )
    event = {"key": key, "meter": "calls", "quantity": 1, "idempotency_key": "z-1"}
    await call("record", "POST", "/v1/usage", json=event)
    await call("report", "GET", f"/v1/accounts/{account_id}/usage", headers=admin)
    await call("validate", "POST", "/v1/licenses/validate", json={"key": key})

    found = {name: _instants(answer.json()) for name, answer in answers.items()}
    assert all(found[name] for name in ("create account", "issue license", "activate", "record"))
    assert any(where.endswith("history[0].occurred_at") for where, _ in found["report"])
    not_z = [(name, w, v) for name, pairs in found.items() for w, v in pairs if not v.endswith("Z")]
    assert not not_z, not_z
