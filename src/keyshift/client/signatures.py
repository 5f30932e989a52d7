"""Ed25519 verification of signed validation responses, against the server's published keys.

The server signs the exact response body bytes and sends
``Keyshift-Signature: keyid="s1", algorithm="ed25519", signature="<base64>"``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keyshift.client.errors import MalformedLicenseFile, NonceMismatch, SignatureInvalid

ALGORITHM = "ed25519"
SIGNATURE_HEADER = "Keyshift-Signature"
PublicKeys = Mapping[str, bytes | str]

_PARAM = re.compile(r'\s*([a-z]+)="([^"]*)"\s*(?:,|$)')


def b64decode_strict(text: str) -> bytes:
    """Standard base64 that must round-trip exactly, so no two texts decode to the same bytes."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedLicenseFile(f"invalid base64: {exc}") from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise MalformedLicenseFile("base64 is not in canonical form")
    return raw


def load_public_key(value: bytes | str) -> Ed25519PublicKey:
    """A raw 32-byte Ed25519 public key, given as bytes or as base64 text."""
    raw = b64decode_strict(value) if isinstance(value, str) else value
    if len(raw) != 32:
        raise MalformedLicenseFile("an Ed25519 public key has 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_keys_from_jwks(
    document: Mapping[str, Any] | Iterable[Mapping[str, Any]],
) -> dict[str, str]:
    """``{kid: base64 key}`` from the body of ``GET /v1/keys/signing`` (or its ``keys`` list)."""
    entries = document.get("keys", []) if isinstance(document, Mapping) else document
    keys: dict[str, str] = {}
    for entry in entries:
        if entry.get("alg") == ALGORITHM and isinstance(entry.get("kid"), str):
            keys[entry["kid"]] = str(entry["public_key"])
    return keys


def parse_signature_header(header: str) -> tuple[str, str, bytes]:
    """``(keyid, algorithm, signature bytes)`` from a ``Keyshift-Signature`` value."""
    params: dict[str, str] = {}
    position = 0
    while position < len(header):
        match = _PARAM.match(header, position)
        if match is None or match.end() == position:
            raise MalformedLicenseFile('signature header is not a list of name="value" pairs')
        params[match.group(1)] = match.group(2)
        position = match.end()
    try:
        keyid, algorithm, signature = params["keyid"], params["algorithm"], params["signature"]
    except KeyError as exc:
        raise MalformedLicenseFile(f"signature header lacks {exc.args[0]}") from exc
    return keyid, algorithm, b64decode_strict(signature)


def verify_signature(
    message: bytes, keyid: str, algorithm: str, signature: bytes, public_keys: PublicKeys
) -> None:
    """Raise SignatureInvalid unless ``signature`` is ``keyid``'s Ed25519 signature of ``message``."""
    if algorithm != ALGORITHM:
        raise SignatureInvalid(f"unsupported signature algorithm {algorithm!r}")
    if keyid not in public_keys:
        raise SignatureInvalid(f"signed with unknown key id {keyid!r}")
    try:
        load_public_key(public_keys[keyid]).verify(signature, message)
    except InvalidSignature as exc:
        raise SignatureInvalid("signature does not verify") from exc


def verify_response(
    body: bytes,
    signature_header: str,
    public_keys: PublicKeys,
    *,
    nonce: str | None = None,
) -> dict[str, Any]:
    """Verify a validation response and return its parsed body.

    Pass the exact bytes received (not a re-serialisation) and the header's value. With
    ``nonce``, the body must echo it (NonceMismatch otherwise): a recorded answer to another
    request cannot be replayed.
    """
    keyid, algorithm, signature = parse_signature_header(signature_header)
    verify_signature(body, keyid, algorithm, signature, public_keys)
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        raise MalformedLicenseFile("signed body is not JSON") from exc
    if not isinstance(parsed, dict):
        raise MalformedLicenseFile("signed body is not a JSON object")
    if nonce is not None and parsed.get("nonce") != nonce:
        raise NonceMismatch("the response does not echo this request's nonce")
    return parsed
