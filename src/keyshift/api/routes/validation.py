"""Validation and license files: the calls applications make with a license key (no bearer
token: the key is the credential), the published signing keys, and the admin file export."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Request as HttpRequest
from fastapi.responses import Response as RawResponse
from pydantic import Field

from keyshift.api.deps import ClientLimited, Session, State, get_state, require
from keyshift.api.schemas import Request, Response
from keyshift.catalog.manifests import KEY_PATTERN
from keyshift.context import Actor
from keyshift.licensing import license_files, validation
from keyshift.licensing.cache import default_cache
from keyshift.observability import metrics

router = APIRouter(tags=["validation"])
#: Exporting a file hands out an offline grant (and may decrypt the stored key to encrypt
#: it), so it needs the write scope, not just read.
Exporter = Annotated[Actor, Depends(require("licenses:write"))]

Key = Annotated[str, Field(min_length=1, max_length=64, description="The license key.")]
Fingerprint = Annotated[
    str, Field(min_length=1, max_length=validation.FINGERPRINT_MAX, description="Machine id.")
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
                pattern=validation.NONCE_PATTERN,
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


class CheckInOut(Response):
    superseded: bool
    reason: str | None
    presented_revision: dict[str, Any] | None
    current_revision: dict[str, Any]
    license_file: str | None
    file_expires_at: datetime | None


class ExportRequest(Request):
    encrypt: bool = False
    ttl: Ttl = license_files.DEFAULT_TTL
    fingerprint: Fingerprint | None = None


class LicenseFileOut(Response):
    license_file: str
    file_expires_at: datetime
    encrypted: bool


@router.post(
    "/v1/licenses/validate",
    dependencies=ClientLimited,
    response_class=RawResponse,
    responses={200: {"description": "Signed; see the Keyshift-Signature header."}},
)
async def validate(body: ValidateRequest, request: HttpRequest) -> RawResponse:
    """Always 200 with a code from the closed set (NOT_FOUND included); 422 for bad input."""
    # The app state straight from the request, not through a dependency: on the hottest
    # route FastAPI's dependency resolution is a measurable share of the request's CPU.
    state = get_state(request)
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
        reads=state.db.read,
    )
    metrics.record_validation(result.code.value)
    metrics.record_cache(result.cached)
    return RawResponse(
        content=result.body,
        media_type="application/json",
        headers={validation.SIGNATURE_HEADER: result.signature_header, "Cache-Control": "no-store"},
    )


@router.get("/v1/keys/signing")
async def signing_keys(state: State) -> dict[str, object]:
    """The Ed25519 public keys responses and license files are signed with, by key id."""
    return {"keys": state.secrets.signing.public_jwks()}


def _file_out(exported: license_files.ExportedFile) -> dict[str, object]:
    return {
        "license_file": exported.text,
        "file_expires_at": exported.file_expires_at,
        "encrypted": exported.encrypted,
    }


@router.post("/v1/licenses/checkout", dependencies=ClientLimited, response_model=LicenseFileOut)
async def checkout(body: CheckoutRequest, state: State, session: Session) -> dict[str, object]:
    """A license file for the presenting application (key + optional fingerprint)."""
    exported = await license_files.checkout(
        session,
        state.secrets.keyring,
        state.secrets.signing,
        key=body.key,
        fingerprint=body.fingerprint,
        encrypt=body.encrypt,
        ttl=body.ttl,
    )
    return _file_out(exported)


@router.post("/v1/licenses/check-in", dependencies=ClientLimited, response_model=CheckInOut)
async def check_in(body: CheckInRequest, state: State, session: Session) -> dict[str, object]:
    """The application presents the license file it holds: ``superseded`` says whether a newer
    one exists (the plan or the license changed since — a migration, a rollback), and then
    ``license_file`` is the replacement."""
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
    return result.to_dict()


@router.post("/v1/licenses/{license_id}/file", response_model=LicenseFileOut)
async def export_file(
    license_id: str, body: ExportRequest, actor: Exporter, state: State, session: Session
) -> dict[str, object]:
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
    return _file_out(exported)
