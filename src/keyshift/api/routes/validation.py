"""Validation and license files: the calls applications make with a license key (no bearer
token: the key is the credential), the published signing keys, and the admin file export."""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Depends
from fastapi import Request as HttpRequest
from fastapi.responses import Response as RawResponse
from pydantic import Field, ValidationError
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from keyshift.api.deps import (
    ClientLimited,
    Session,
    State,
    get_state,
    get_state_of,
    limit_key,
    request_id,
    require,
)
from keyshift.api.errors import domain_error, invalid_request, unparseable_body
from keyshift.api.inputs import parameter_problems
from keyshift.api.ratelimit import RateLimited
from keyshift.api.schemas import LicenseKey, Request
from keyshift.api.state import AppState
from keyshift.catalog.manifests import KEY_PATTERN
from keyshift.context import Actor
from keyshift.errors import KeyshiftError
from keyshift.observability import metrics
from keyshift.validation import decide as policy
from keyshift.validation import license_files
from keyshift.validation import service as validation
from keyshift.validation.cache import default_cache
from keyshift.validation.schemas import CheckInOut, LicenseFileOut, SignedValidation, SigningKeys

router = APIRouter(tags=["validation"])
#: Exporting a file hands out an offline grant (and may decrypt the stored key to encrypt
#: it), so it needs the write scope, not just read.
Exporter = Annotated[Actor, Depends(require("licenses:write"))]

Key = LicenseKey
Fingerprint = Annotated[
    str, Field(min_length=1, max_length=policy.FINGERPRINT_MAX, description="Machine id.")
]
Ttl = Annotated[str, Field(min_length=2, max_length=16, description="e.g. 30d, 12h, 1y")]


class ValidateRequest(Request):
    key: Key
    fingerprint: Fingerprint | None = None
    feature: Annotated[str, Field(pattern=KEY_PATTERN)] | None = None
    meter: (
        Annotated[str, Field(pattern=KEY_PATTERN, description="A meter whose quota to check.")]
        | None
    ) = None
    nonce: (
        Annotated[
            str,
            Field(
                pattern=policy.NONCE_PATTERN,
                description="Echoed inside the signed body; defeats replay.",
            ),
        ]
        | None
    ) = None


class CheckoutRequest(Request):
    key: Key
    fingerprint: Fingerprint | None = None
    encrypt: bool = True
    ttl: Ttl = license_files.DEFAULT_TTL


class CheckInRequest(Request):
    key: Key
    license_file: Annotated[str, Field(min_length=1, max_length=64 * 1024)]
    fingerprint: Fingerprint | None = None
    encrypt: bool = True
    ttl: Ttl = license_files.DEFAULT_TTL


class ExportRequest(Request):
    encrypt: bool = False
    ttl: Ttl = license_files.DEFAULT_TTL
    fingerprint: Fingerprint | None = None


@router.post(
    "/v1/licenses/validate",
    dependencies=ClientLimited,
    response_class=RawResponse,
    responses={
        200: {
            "model": SignedValidation,
            "description": "Signed; see the Keyshift-Signature header.",
        }
    },
)
async def validate(body: ValidateRequest, request: HttpRequest) -> RawResponse:
    """Always 200 with a code from the closed set (NOT_FOUND included); 422 for bad input.

    The app serves this path with ``ValidateEndpoint`` (below), mounted ahead of the router;
    this declaration documents it in the OpenAPI schema and answers the same way wherever
    the router is used without the app factory."""
    result = await answer(get_state(request), body, request_id(request))
    return RawResponse(content=result.body, headers=signed_headers(result))


async def answer(
    state: AppState, body: ValidateRequest, rid: str | None
) -> validation.ValidationResult:
    """Apply the key's rate limit, validate, count the result and the cache outcome, and show
    the anomaly detector which machine presented the key."""
    limit_key(state, body.key)
    result = await validation.validate(
        state.db.transaction,
        state.secrets.keyring,
        state.secrets.signing,
        key=body.key,
        fingerprint=body.fingerprint,
        feature=body.feature,
        nonce=body.nonce,
        meter=body.meter,
        cache=default_cache,
        fetch=state.db.fetch,
    )
    metrics.record_validation(result.code.value)
    metrics.record_cache(result.cached)
    activation = result.payload["activation"]
    if activation is not None and result.code is not policy.Code.NOT_FOUND:
        state.anomalies.key_presented(
            result.lookup,
            body.fingerprint,
            activation["max_activations"],
            license_id=result.payload["license"]["id"],
            account_id=result.payload["account_id"],
            request_id=rid,
        )
    return result


def signed_headers(result: validation.ValidationResult) -> dict[str, str]:
    return {
        "content-type": "application/json",
        policy.SIGNATURE_HEADER: result.signature_header,
        "cache-control": "no-store",
    }


class ValidateEndpoint:
    """``POST /v1/licenses/validate`` as a bare ASGI app: the hottest route skips FastAPI's
    routing walk, dependency solving and body machinery, which measured about 40 % of its
    in-process cost (docs/benchmarks.md). It answers exactly as the declared route above:
    the same schema (``ValidateRequest``, parsed by pydantic from the raw bytes), the same
    422/429 bodies (``errors.invalid_request`` / ``errors.domain_error``), the same signed
    200. The request middleware around it has already bounded the body's size and checked
    its content type, and still adds the request id, the metrics and the access log."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = get_state_of(scope["app"])
        status, body, headers = 200, b"", {}
        try:
            # The address's limit before the body is even parsed (as the declared route's
            # dependency): a flood of malformed requests is refused as a flood.
            bucket = state.client_bucket
            if bucket is not None:
                client = scope.get("client")
                wait = bucket.take(client[0] if client else "unknown")
                if wait:
                    raise RateLimited(wait)
            _check_query(scope["query_string"])
            request = _parse(await _read_body(receive))
            result = await answer(state, request, scope["state"].get("request_id"))
            body, headers = result.body, signed_headers(result)
        except _Invalid as exc:
            status, body, headers = 422, orjson.dumps({"error": exc.body}), {}
        except KeyshiftError as exc:
            status, error, extra = domain_error(exc)
            body, headers = orjson.dumps({"error": error}), extra or {}
        headers.setdefault("content-type", "application/json")
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-length", str(len(body)).encode()),
                    *((k.encode(), v.encode()) for k, v in headers.items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _Invalid(Exception):
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body


def _check_query(query_string: bytes) -> None:
    """The route declares no query parameter: any is refused (``api/inputs.py``'s rules, which
    the request middleware has already applied to the body)."""
    if query_string:
        query = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
        problems = parameter_problems((), query, frozenset())
        if problems:
            raise _Invalid(invalid_request(problems))


def _parse(raw: bytes) -> ValidateRequest:
    """The request from the raw body: pydantic straight from the bytes, and when that refuses
    it, the way FastAPI reads a body (decode, then validate the decoded value), so that both
    routes accept the same bodies (a UTF-8 BOM, UTF-16) and word every refusal alike. Only
    the refused pay for the second parse. ``_Invalid`` carries the 422 body."""
    try:
        return ValidateRequest.model_validate_json(raw)
    except ValidationError:
        pass
    if not raw:
        raise _Invalid(
            invalid_request([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
        )
    try:
        decoded = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _Invalid(
            invalid_request([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": exc.msg}])
        ) from None
    except Exception:  # too deep, too many digits, not text: as FastAPI, "could not parse"
        raise _Invalid(unparseable_body()) from None
    try:
        return ValidateRequest.model_validate(decoded, from_attributes=True)  # as FastAPI does
    except ValidationError as exc:
        raise _Invalid(
            invalid_request(exc.errors(include_url=False, include_context=False))
        ) from None


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


class _FastRoute(Route):
    """A route that records itself in the scope when it matches, as FastAPI's own routes do:
    the request metrics and access log label requests by ``scope["route"].path``."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def fast_routes() -> list[Route]:
    """The routes the app factory mounts ahead of the API router."""
    return [_FastRoute("/v1/licenses/validate", ValidateEndpoint(), methods=["POST"])]


@router.get("/v1/keys/signing")
async def signing_keys(state: State) -> SigningKeys:
    """The Ed25519 public keys responses and license files are signed with, by key id."""
    return SigningKeys.model_validate({"keys": state.secrets.signing.public_jwks()})


@router.post("/v1/licenses/checkout", dependencies=ClientLimited)
async def checkout(body: CheckoutRequest, state: State, session: Session) -> LicenseFileOut:
    """A license file for the presenting application (key + optional fingerprint)."""
    limit_key(state, body.key)
    exported = await license_files.checkout(
        session,
        state.secrets.keyring,
        state.secrets.signing,
        key=body.key,
        fingerprint=body.fingerprint,
        encrypt=body.encrypt,
        ttl=body.ttl,
    )
    return LicenseFileOut.of(exported)


@router.post("/v1/licenses/check-in", dependencies=ClientLimited)
async def check_in(body: CheckInRequest, state: State, session: Session) -> CheckInOut:
    """The application presents the license file it holds: ``superseded`` says whether a newer
    one exists (the plan or the license changed since — a migration, a rollback), and then
    ``license_file`` is the replacement."""
    limit_key(state, body.key)
    result = await license_files.check_in(
        session,
        state.secrets.keyring,
        state.secrets.signing,
        key=body.key,
        license_file=body.license_file,
        fingerprint=body.fingerprint,
        encrypt=body.encrypt,
        ttl=body.ttl,
    )
    return CheckInOut.of(result)


@router.post("/v1/licenses/{license_id}/file")
async def export_file(
    license_id: str, body: ExportRequest, actor: Exporter, state: State, session: Session
) -> LicenseFileOut:
    exported = await license_files.export_license_file(
        session,
        actor,
        state.secrets.keyring,
        state.secrets.signing,
        license_id,
        encrypt=body.encrypt,
        ttl=body.ttl,
        fingerprint=body.fingerprint,
    )
    return LicenseFileOut.of(exported)
