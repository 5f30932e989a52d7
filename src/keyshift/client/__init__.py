"""The keyshift client SDK: what an application embeds to check licenses.

Verifies signed validation responses and offline license files against the server's
published Ed25519 keys, and catches mistyped keys offline. Imports only the standard library
and ``cryptography`` — nothing from the server side.
"""

from keyshift.client.errors import (
    DecryptionFailed,
    KeyRequired,
    LicenseFileError,
    LicenseFileExpired,
    MalformedLicenseFile,
    NonceMismatch,
    SignatureInvalid,
    VerificationError,
)
from keyshift.client.keys import KeyFormatError, check_character, is_well_formed, normalise_key
from keyshift.client.license_files import verify_license_file
from keyshift.client.signatures import (
    SIGNATURE_HEADER,
    parse_signature_header,
    public_keys_from_jwks,
    verify_response,
)

__all__ = [
    "SIGNATURE_HEADER",
    "DecryptionFailed",
    "KeyFormatError",
    "KeyRequired",
    "LicenseFileError",
    "LicenseFileExpired",
    "MalformedLicenseFile",
    "NonceMismatch",
    "SignatureInvalid",
    "VerificationError",
    "check_character",
    "is_well_formed",
    "normalise_key",
    "parse_signature_header",
    "public_keys_from_jwks",
    "verify_license_file",
    "verify_response",
]
