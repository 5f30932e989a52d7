"""Offline license files: the format, and verification with no network.

A file is armored text: between the BEGIN/END lines, base64 (wrapped at 64 columns) of a JSON
envelope ``{"alg", "enc", "kid", "lid", "payload", "sig"}``. ``sig`` is Ed25519 over
``b"keyshift-license-file/v1\\n" + enc + b"\\n" + payload bytes``; when encrypted the payload
is ``nonce || AES-256-GCM ciphertext`` under HKDF-SHA256(license key, salt=license id), and
the signature covers the ciphertext so it is checked before anything is decrypted.

The server builds files with these same functions (``keyshift.validation.license_files``).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyshift.client.errors import (
    DecryptionFailed,
    KeyRequired,
    LicenseFileExpired,
    MalformedLicenseFile,
    SignatureInvalid,
)
from keyshift.client.keys import KeyFormatError, normalise_key
from keyshift.client.signatures import ALGORITHM, PublicKeys, b64decode_strict, verify_signature

BEGIN = "-----BEGIN KEYSHIFT LICENSE FILE-----"
END = "-----END KEYSHIFT LICENSE FILE-----"
ENC_NONE = "none"
ENC_AES = "aes-256-gcm+hkdf-sha256"
SIGNATURE_CONTEXT = b"keyshift-license-file/v1\n"
HKDF_INFO = b"keyshift license file v1"
FORMAT = 1
_NONCE_BYTES = 12
_ENVELOPE_FIELDS = frozenset({"alg", "enc", "kid", "lid", "payload", "sig"})


def signed_message(enc: str, payload: bytes) -> bytes:
    return SIGNATURE_CONTEXT + enc.encode("ascii") + b"\n" + payload


def derive_file_key(license_key: str, license_id: str) -> bytes:
    """The AES-256 key of an encrypted file: HKDF-SHA256 over the normalised license key."""
    try:
        normalised = normalise_key(license_key)
    except KeyFormatError as exc:
        raise DecryptionFailed(f"the license key is malformed: {exc}") from exc
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=license_id.encode(), info=HKDF_INFO
    ).derive(normalised.encode())


def encrypt_payload(plaintext: bytes, license_key: str, license_id: str) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(derive_file_key(license_key, license_id)).encrypt(nonce, plaintext, None)


def decrypt_payload(blob: bytes, license_key: str, license_id: str) -> bytes:
    key = derive_file_key(license_key, license_id)
    try:
        return AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], None)
    except InvalidTag as exc:
        raise DecryptionFailed("this license key does not open the file") from exc


def canonical_envelope(envelope: Mapping[str, str]) -> bytes:
    """The one byte form of an envelope (sorted keys, no spaces): any edit is detectable."""
    return json.dumps(dict(envelope), sort_keys=True, separators=(",", ":")).encode("ascii")


def armor(envelope: Mapping[str, str]) -> str:
    text = base64.b64encode(canonical_envelope(envelope)).decode("ascii")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return "\n".join([BEGIN, *lines, END]) + "\n"


def dearmor(text: str) -> dict[str, str]:
    """The envelope inside armored text, or MalformedLicenseFile. Whitespace between the
    armor lines is ignored (mail clients rewrap); any other change is an error."""
    stripped = text.strip()
    if not (stripped.startswith(BEGIN) and stripped.endswith(END)):
        raise MalformedLicenseFile("not a keyshift license file (BEGIN/END lines missing)")
    body = "".join(stripped[len(BEGIN) : -len(END)].split())
    raw = b64decode_strict(body)
    try:
        envelope = json.loads(raw)
    except ValueError as exc:
        raise MalformedLicenseFile("the envelope is not JSON") from exc
    if (
        not isinstance(envelope, dict)
        or set(envelope) != _ENVELOPE_FIELDS
        or not all(isinstance(v, str) for v in envelope.values())
    ):
        raise MalformedLicenseFile(f"the envelope must hold exactly {sorted(_ENVELOPE_FIELDS)}")
    if canonical_envelope(envelope) != raw:
        raise MalformedLicenseFile("the envelope is not in canonical form")
    return envelope


def _parse_time(value: object, name: str) -> datetime:
    if not isinstance(value, str):
        raise MalformedLicenseFile(f"{name} is missing")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise MalformedLicenseFile(f"{name} is not a timestamp") from exc
    if parsed.tzinfo is None:
        raise MalformedLicenseFile(f"{name} has no timezone")
    return parsed


def verify_license_file(
    text: str,
    public_keys: PublicKeys,
    *,
    license_key: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Verify a license file offline and return its payload.

    Order: armor and envelope form, then the Ed25519 signature (over the ciphertext when
    encrypted), then decryption with ``license_key``, then the file's expiry. Raises
    MalformedLicenseFile, SignatureInvalid, KeyRequired, DecryptionFailed or
    LicenseFileExpired (which carries the verified payload).
    """
    envelope = dearmor(text)
    enc = envelope["enc"]
    if enc not in (ENC_NONE, ENC_AES):
        raise MalformedLicenseFile(f"unknown encryption {enc!r}")
    if envelope["alg"] != ALGORITHM:
        raise SignatureInvalid(f"unsupported signature algorithm {envelope['alg']!r}")
    payload_bytes = b64decode_strict(envelope["payload"])
    signature = b64decode_strict(envelope["sig"])
    verify_signature(
        signed_message(enc, payload_bytes), envelope["kid"], ALGORITHM, signature, public_keys
    )
    if enc == ENC_AES:
        if license_key is None:
            raise KeyRequired("the license file is encrypted; pass the license key")
        payload_bytes = decrypt_payload(payload_bytes, license_key, envelope["lid"])
    try:
        payload = json.loads(payload_bytes)
    except ValueError as exc:
        raise MalformedLicenseFile("the payload is not JSON") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise MalformedLicenseFile(f"unsupported payload format (this SDK reads format {FORMAT})")
    license_part = payload.get("license")
    if not isinstance(license_part, dict) or license_part.get("id") != envelope["lid"]:
        raise MalformedLicenseFile("the envelope and the payload name different licenses")
    expires = _parse_time(payload.get("file_expires_at"), "file_expires_at")
    if (now or datetime.now(UTC)) >= expires:
        raise LicenseFileExpired(
            f"the license file expired at {payload['file_expires_at']}; check out a new one",
            payload,
        )
    return payload
