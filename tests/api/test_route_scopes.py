"""Every route, every scope, on both databases: the route → scope table read from the code
(``keyshift.api.access``) is what the routes enforce, and docs/security.md carries exactly
that table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyshift.api import access
from keyshift.api.app import create_app
from keyshift.api.state import AppState
from keyshift.config import Settings
from keyshift.context import SCOPES
from keyshift.db.engine import Database
from tests.support import cli_env, invoke_keyshift, mint_token

SECURITY_MD = Path(__file__).resolve().parents[2] / "docs" / "security.md"
NOBODY = "00000000-0000-4000-8000-000000000000"
#: A license key of the right shape that no license has.
NO_KEY = "AAAAA-AAAAA-AAAAA-AAAAA-AAAAA"

#: Routes that authenticate after reading the body need a body that parses to get that far.
_EVENT = {"meter": "api_calls", "quantity": 1, "idempotency_key": "scope-walk"}
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/usage"): _EVENT,
    ("POST", "/v1/usage/batch"): {"events": [_EVENT]},
}


def _url(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


async def _call(
    client: httpx.AsyncClient,
    route: access.RouteAccess,
    token: str | None,
    credential: dict[str, str] | None = None,
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body: dict[str, Any] | None = None
    if route.method in ("POST", "PUT", "PATCH"):
        body = {**BODIES.get((route.method, route.path), {}), **(credential or {})}
    return await client.request(route.method, _url(route.path), json=body, headers=headers)


async def test_every_route_answers_every_scope_as_the_table_says(
    app_state: AppState, db: Database
) -> None:
    app = create_app(state=app_state)
    table = access.route_table(app.routes)
    # Every operation of the OpenAPI document is in the table (and so gets walked).
    walked = {(r.method, r.path) for r in table}
    documented = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    assert documented <= walked, documented - walked
    assert {("GET", p) for p in ("/docs", "/redoc", "/openapi.json", "/metrics")} <= walked
    tokens = {scope: await mint_token(db, scope, name=scope) for scope in sorted(SCOPES)}
    wrong: list[str] = []

    def expect(route: access.RouteAccess, who: str, response: httpx.Response, ok: bool) -> None:
        refused = response.status_code in (401, 403)
        if response.status_code >= 500 or refused == ok:
            wanted = "an answer" if ok else "403"
            wrong.append(f"{route.method} {route.path} as {who}: {response.status_code}, {wanted}")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://keyshift.test") as client:
        for route in table:
            if route.credential == "public":
                response = await _call(client, route, None)
                if response.status_code != 200:
                    wrong.append(f"{route.method} {route.path} public: {response.status_code}")
                continue
            if route.credential in ("key", "key_or_token"):
                # The key is the credential: no token needed, and a token's scope is no bar.
                for token in (None, tokens["audit:read"]):
                    who = "a key" + (" and an audit:read token" if token else "")
                    response = await _call(client, route, token, {"key": NO_KEY})
                    expect(route, who, response, ok=True)
            if route.credential == "key_or_token":
                credential = {"account_id": NOBODY}
            elif route.credential == "token":
                credential = None
            else:
                continue
            response = await _call(client, route, None, credential)
            if response.status_code != 401:
                wrong.append(f"{route.method} {route.path} without a token: {response.status_code}")
            for scope, token in tokens.items():
                allowed = scope == "admin" or scope in route.scopes
                response = await _call(client, route, token, credential)
                expect(route, scope, response, ok=allowed)
                if not allowed and response.status_code == 403:
                    assert route.scopes[0] in response.json()["error"]["message"]
    assert wrong == []


def test_security_md_carries_the_route_table_generated_from_the_code(
    app_state: AppState,
) -> None:
    generated = access.markdown(access.route_table(create_app(state=app_state).routes))
    documented = access.documented(SECURITY_MD.read_text())
    assert documented == generated, (
        "docs/security.md's route table differs from the code: replace it with the output of"
        " `keyshift tokens scopes --markdown`"
    )


def test_security_md_describes_every_scope() -> None:
    text = SECURITY_MD.read_text()
    described = text[text.index("| scope | grants |") : text.index("### Every route")]
    assert [s for s in sorted(SCOPES) if f"`{s}`" not in described] == []


def test_cli_prints_the_table_the_docs_carry(settings: Settings) -> None:
    result = invoke_keyshift(cli_env(settings), "tokens", "scopes", "--markdown")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == access.documented(SECURITY_MD.read_text())


@pytest.mark.parametrize("scope", ["licenses:write", "admin"])
async def test_licenses_write_may_remove_an_activation(
    client: httpx.AsyncClient, db: Database, scope: str
) -> None:
    from tests import factories

    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db)
    admin = {"Authorization": f"Bearer {await mint_token(db, 'admin')}"}
    issued = await client.post("/v1/licenses", json={"account_id": account.id}, headers=admin)
    key = issued.json()["key"]
    activated = await client.post(
        "/v1/licenses/activate", json={"key": key, "fingerprint": "machine-1"}
    )
    assert activated.status_code == 201, activated.text

    headers = {"Authorization": f"Bearer {await mint_token(db, scope)}"}
    removed = await client.delete(f"/v1/activations/{activated.json()['id']}", headers=headers)

    assert removed.status_code == 200, removed.text
    assert removed.json()["id"] == activated.json()["id"]
