"""The OpenAPI spec tells the truth: every route documents the errors it gives with the real
body (``{"error": {...}}``, never FastAPI's ``{"detail": [...]}``), request schemas carry the
constraints the server enforces, and a 405 says which methods are allowed. (That real answers
match the spec is checked by the hostile-input suite, which validates every response.)"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from keyshift import dates
from keyshift.api.app import create_app
from keyshift.api.schemas import KEY_TEXT_PATTERN
from keyshift.api.state import AppState
from keyshift.licensing import keys

ERROR_REF = "#/components/schemas/ErrorBody"
PUBLIC = {"/healthz", "/readyz", "/v1/keys/signing"}
KEY_AUTHENTICATED = {
    "/v1/licenses/validate",
    "/v1/licenses/checkout",
    "/v1/licenses/check-in",
    "/v1/licenses/activate",
    "/v1/licenses/heartbeat",
    "/v1/licenses/deactivate",
}


@pytest.fixture
def spec(app_state: AppState) -> dict[str, Any]:
    return create_app(state=app_state).openapi()


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, methods in spec["paths"].items()
        for method, operation in methods.items()
    ]


def _schema(spec: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = spec["components"]["schemas"][name]
    return schema


def _errors(operation: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(s): r for s, r in operation["responses"].items() if int(s) >= 400}


def test_every_route_documents_its_errors_with_the_real_body(spec: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "ValidationError" not in spec["components"]["schemas"]
    for method, path, operation in _operations(spec):
        errors = _errors(operation)
        where = f"{method} {path}"
        assert 422 in errors, where  # an unknown query parameter, on any route
        if path != "/healthz":
            assert 503 in errors, where
        if method in ("POST", "PUT", "PATCH"):
            assert {413, 415} <= set(errors), where
        if path not in PUBLIC | KEY_AUTHENTICATED:
            assert {401, 403, 429} <= set(errors), where
        if path in KEY_AUTHENTICATED:
            assert 429 in errors and 401 not in errors, where
        if "{" in path:
            assert 404 in errors, where
        for status, response in errors.items():
            if (path, status) == ("/readyz", 503):
                continue  # readiness answers its own body: which check failed
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": ERROR_REF}, (where, status)
    assert _errors(spec["paths"]["/v1/accounts"]["get"])[401]["headers"]["WWW-Authenticate"]
    assert _errors(spec["paths"]["/v1/usage"]["post"])[429]["headers"]["Retry-After"]


def test_the_error_body_schema_is_the_one_errors_are_sent_in(spec: dict[str, Any]) -> None:
    body = _schema(spec, "ErrorBody")
    assert body["required"] == ["error"]
    detail = _schema(spec, "ErrorDetail")
    assert set(detail["required"]) == {"code", "message"}
    assert {"field", "problems", "details"} <= set(detail["properties"])


def test_request_schemas_carry_the_enforced_constraints(spec: dict[str, Any]) -> None:
    validate = _schema(spec, "ValidateRequest")["properties"]
    key = validate["key"]
    assert (key["minLength"], key["maxLength"], key["pattern"]) == (25, 64, KEY_TEXT_PATTERN)
    assert re.fullmatch(KEY_TEXT_PATTERN, keys.generate())
    assert re.fullmatch(KEY_TEXT_PATTERN, keys.generate().lower().replace("-", " "))
    assert not re.fullmatch(KEY_TEXT_PATTERN, "not-a-key")
    fingerprint = validate["fingerprint"]["anyOf"][0]
    assert (fingerprint["minLength"], fingerprint["maxLength"]) == (1, 255)

    quantity = _schema(spec, "UsageEventIn")["properties"]["quantity"]
    assert quantity["minimum"] == 0 and quantity["maximum"] <= 2**63 - 1
    timestamp = _schema(spec, "UsageEventIn")["properties"]["timestamp"]["anyOf"][0]
    assert timestamp["format"] == "date-time"
    assert timestamp["formatMinimum"] == "1970-01-01T00:00:00Z"
    assert timestamp["formatMaximum"] == "9000-12-31T23:59:59Z"
    assert dates.LATEST.strftime("%Y-%m-%dT%H:%M:%SZ") == timestamp["formatMaximum"]
    renewal = _schema(spec, "Renewal")["properties"]["expires_at"]["anyOf"][0]
    assert renewal["formatMaximum"] == timestamp["formatMaximum"]

    usage = _schema(spec, "UsageRecord")
    assert usage["oneOf"] == [{"required": ["key"]}, {"required": ["account_id"]}]
    assert _schema(spec, "LicensePatch")["minProperties"] == 1
    assert _schema(spec, "AccountPatch")["minProperties"] == 1  # `{}` changes nothing: a 422
    scopes = _schema(spec, "TokenCreate")["properties"]["scopes"]["items"]
    assert "admin" in scopes["enum"] and "audit:read" in scopes["enum"]

    after_seq = next(
        p
        for p in spec["paths"]["/v1/audit/events"]["get"]["parameters"]
        if p["name"] == "after_seq"
    )
    assert after_seq["schema"]["maximum"] == 2**63 - 1
    ref = spec["paths"]["/v1/catalog/{kind}/{ref}"]["get"]["parameters"][1]
    assert ref["name"] == "ref" and "@" in ref["schema"]["pattern"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/healthz", "GET"),
        ("PATCH", "/v1/accounts/a/addons/b", "DELETE, PUT"),
        ("DELETE", "/v1/accounts", "GET, POST"),
    ],
)
async def test_a_405_names_every_allowed_method(
    client: httpx.AsyncClient, method: str, path: str, allowed: str
) -> None:
    response = await client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.json()["error"]["code"] == "method_not_allowed"
