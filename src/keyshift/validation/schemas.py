"""How validation's answers are shown: license files handed out, a check-in's verdict, the
published signing keys, and the body of ``POST /v1/licenses/validate``. That body is signed
and built byte for byte by ``decide.response_body``; ``SignedValidation`` only describes it."""

from __future__ import annotations

from typing import Any, Self

from pydantic import Field

from keyshift.schemas import Instant, Response
from keyshift.validation.decide import Code
from keyshift.validation.license_files import CheckIn, ExportedFile


class LicenseFileOut(Response):
    license_file: str = Field(description="The armored, signed file.")
    file_expires_at: Instant
    encrypted: bool

    @classmethod
    def of(cls, exported: ExportedFile) -> Self:
        return cls(
            license_file=exported.text,
            file_expires_at=exported.file_expires_at,
            encrypted=exported.encrypted,
        )


class CheckInOut(Response):
    superseded: bool
    reason: str | None
    presented_revision: dict[str, Any] | None
    current_revision: dict[str, Any]
    license_file: str | None = Field(description="The replacement, when superseded.")
    file_expires_at: Instant | None

    @classmethod
    def of(cls, result: CheckIn) -> Self:
        return cls(
            superseded=result.superseded,
            reason=result.reason,
            presented_revision=result.presented_revision,
            current_revision=result.current_revision,
            license_file=result.file.text if result.file else None,
            file_expires_at=result.file.file_expires_at if result.file else None,
        )


class SigningKey(Response):
    kid: str
    alg: str
    public_key: str = Field(description="The raw Ed25519 public key, base64.")
    active: bool = Field(description="Whether this key signs now.")


class SigningKeys(Response):
    keys: list[SigningKey]


class ValidatedLicense(Response):
    id: str
    status: str
    expires_at: Instant | None


class ValidatedExpiry(Response):
    expires_at: Instant | None
    grace_until: Instant | None
    in_grace: bool


class SignedValidation(Response):
    """The signed body (``Keyshift-Signature`` covers its exact bytes). For an unknown key
    (``NOT_FOUND``) every field but ``valid``, ``code``, ``detail``, ``nonce`` and the times
    is null."""

    valid: bool
    code: Code
    detail: str
    license: ValidatedLicense | None
    account_id: str | None
    entitlements: dict[str, Any] | None
    expiry: ValidatedExpiry | None
    activation: dict[str, Any] | None
    feature: dict[str, Any] | None
    meters: dict[str, Any] | None
    throttle: dict[str, Any] | None
    nonce: str | None
    issued_at: Instant
    server_time: Instant
