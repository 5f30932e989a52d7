"""Every class of bad input gets a clear 4xx with the one error shape; a bug gets a JSON 500
without its traceback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from keyshift.api.app import create_app
from keyshift.api.state import AppState


def _error(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    return error


async def test_body_over_the_limit_with_content_length_is_413(
    client: httpx.AsyncClient, admin_headers: dict[str, str], app_state: AppState
) -> None:
    big = b'{"name": "' + b"x" * app_state.settings.max_body_bytes + b'", "scopes": ["admin"]}'
    response = await client.post(
        "/v1/tokens",
        content=big,
        headers={**admin_headers, "content-type": "application/json"},
    )
    assert _error(response, 413, "body_too_large")["field"] == "body"


async def test_chunked_body_over_the_limit_is_413(
    client: httpx.AsyncClient, admin_headers: dict[str, str], app_state: AppState
) -> None:
    chunk = b"x" * 8192
    chunks = app_state.settings.max_body_bytes // len(chunk) + 2

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            yield chunk

    request = client.build_request(
        "POST",
        "/v1/tokens",
        content=stream(),
        headers={**admin_headers, "content-type": "application/json"},
    )
    assert "content-length" not in request.headers
    _error(await client.send(request), 413, "body_too_large")


async def test_non_numeric_content_length_is_refused(client: httpx.AsyncClient) -> None:
    request = client.build_request(
        "POST", "/v1/tokens", content=b"{}", headers={"content-type": "application/json"}
    )
    request.headers["content-length"] = "12abc"
    assert (await client.send(request)).status_code == 413


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", None]
)
async def test_non_json_content_type_is_415(
    client: httpx.AsyncClient, admin_headers: dict[str, str], content_type: str | None
) -> None:
    headers = {**admin_headers}
    if content_type:
        headers["content-type"] = content_type
    response = await client.post(
        "/v1/tokens", content=b'{"name": "x", "scopes": ["admin"]}', headers=headers
    )
    assert _error(response, 415, "unsupported_media_type")["field"] == "content-type"


async def test_json_with_charset_is_accepted(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/v1/tokens",
        content=b'{"name": "x", "scopes": ["audit:read"]}',
        headers={**admin_headers, "content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 201, response.text


async def test_invalid_json_is_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/v1/tokens",
        content=b'{"name": "x", "scopes": [',
        headers={**admin_headers, "content-type": "application/json"},
    )
    error = _error(response, 422, "invalid_request")
    assert error["field"] == "body"
    assert "JSON" in str(error["message"])


async def test_unknown_field_is_422_naming_it(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/v1/tokens",
        json={"name": "x", "scopes": ["audit:read"], "is_superuser": True},
        headers=admin_headers,
    )
    error = _error(response, 422, "invalid_request")
    assert error["field"] == "is_superuser"
    assert "unknown field" in str(error["message"])


async def test_missing_and_mistyped_fields_are_422_naming_them(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    missing = await client.post("/v1/tokens", json={"name": "x"}, headers=admin_headers)
    assert _error(missing, 422, "invalid_request")["field"] == "scopes"
    mistyped = await client.post(
        "/v1/tokens",
        json={"name": "x", "scopes": ["audit:read"], "ttl_seconds": "soon"},
        headers=admin_headers,
    )
    assert _error(mistyped, 422, "invalid_request")["field"] == "ttl_seconds"
    bad_query = await client.get("/v1/audit/events?limit=0", headers=admin_headers)
    assert _error(bad_query, 422, "invalid_request")["field"] == "query.limit"


async def test_unknown_path_is_a_json_404(client: httpx.AsyncClient) -> None:
    _error(await client.get("/v1/nothing-here"), 404, "not_found")


async def test_wrong_method_is_a_json_405(client: httpx.AsyncClient) -> None:
    _error(await client.put("/healthz"), 405, "method_not_allowed")


async def test_a_bug_is_a_json_500_without_traceback(
    app_state: AppState, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(state=app_state)

    @app.get("/test-only/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals: /etc/keyshift/db password=hunter2")

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://keyshift.test"
    ) as c:
        response = await c.get("/test-only/boom", headers={"x-request-id": "boom-1"})
    error = _error(response, 500, "internal_error")
    assert response.headers["x-request-id"] == "boom-1"
    assert "hunter2" not in response.text and "Traceback" not in response.text
    assert error["message"] == "internal server error"
    logged = [r for r in caplog.records if r.name == "keyshift.api"]
    assert logged and logged[0].exc_info is not None
