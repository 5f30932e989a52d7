"""What verification can conclude, as exceptions. Every one is a ``LicenseFileError`` (also
exported as ``VerificationError``), so an application can catch them all in one place."""

from __future__ import annotations

from typing import Any


class LicenseFileError(Exception):
    """Base of every verification failure, for license files and signed responses alike."""


VerificationError = LicenseFileError


class MalformedLicenseFile(LicenseFileError):
    """The text is not a license file (or a signed response) this SDK can read."""


class SignatureInvalid(LicenseFileError):
    """The signature does not verify with any published key: tampered, or not from the server."""


class KeyRequired(LicenseFileError):
    """The file is encrypted; pass the license key to read it."""


class DecryptionFailed(LicenseFileError):
    """The file is encrypted and the given license key does not open it."""


class NonceMismatch(LicenseFileError):
    """A signed response does not echo the nonce the application sent: a replay."""


class LicenseFileExpired(LicenseFileError):
    """The file verified, but its offline period is over. ``payload`` holds what it said."""

    def __init__(self, message: str, payload: dict[str, Any]) -> None:
        super().__init__(message)
        self.payload = payload
