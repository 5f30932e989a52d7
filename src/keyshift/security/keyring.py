"""AES-256-GCM encryption at rest under a versioned keyring, and keyed lookup hashes.

Ciphertexts record the id (``kid``) of the key that sealed them, so the active key can rotate
while older rows stay readable until they are re-encrypted. The lookup key (HMAC-SHA256) is
separate and does not rotate with the encryption keys: rotating it means re-indexing.
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyshift.errors import ConfigurationError

_NONCE_BYTES = 12


@dataclass(frozen=True)
class Sealed:
    kid: str
    ciphertext: bytes  # nonce || AES-GCM(ciphertext + tag)


@dataclass
class Keyring:
    """Versioned data keys plus the lookup key. Serialises to/from a JSON-able dict."""

    active: str
    keys: dict[str, bytes]
    lookup_key: bytes
    _aead: dict[str, AESGCM] = field(default_factory=dict, repr=False)

    @classmethod
    def generate(cls) -> Keyring:
        return cls(active="k1", keys={"k1": AESGCM.generate_key(256)}, lookup_key=os.urandom(32))

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Keyring:
        try:
            raw_keys = data["keys"]
            assert isinstance(raw_keys, dict)
            keys = {str(k): base64.b64decode(str(v)) for k, v in raw_keys.items()}
            active = str(data["active"])
            lookup = base64.b64decode(str(data["lookup_key"]))
        except (KeyError, AssertionError, ValueError) as exc:
            raise ConfigurationError(f"keyring is malformed: {exc}") from exc
        if active not in keys:
            raise ConfigurationError(f"keyring's active key {active!r} is not in its keys")
        if any(len(k) != 32 for k in keys.values()) or len(lookup) != 32:
            raise ConfigurationError("keyring keys must be 32 bytes (AES-256, HMAC-SHA256)")
        return cls(active=active, keys=keys, lookup_key=lookup)

    def to_dict(self) -> dict[str, object]:
        return {
            "format": 1,
            "active": self.active,
            "keys": {k: base64.b64encode(v).decode() for k, v in self.keys.items()},
            "lookup_key": base64.b64encode(self.lookup_key).decode(),
        }

    def rotated(self) -> Keyring:
        """A new keyring whose active key is fresh; old keys stay for decryption."""
        number = 1 + max(int(k[1:]) for k in self.keys if k[1:].isdigit())
        kid = f"k{number}"
        return Keyring(
            active=kid,
            keys={**self.keys, kid: AESGCM.generate_key(256)},
            lookup_key=self.lookup_key,
        )

    def _cipher(self, kid: str) -> AESGCM:
        if kid not in self._aead:
            if kid not in self.keys:
                raise ConfigurationError(f"keyring has no key {kid!r}; was it removed too early?")
            self._aead[kid] = AESGCM(self.keys[kid])
        return self._aead[kid]

    def seal(self, plaintext: bytes, *, context: bytes) -> Sealed:
        """Encrypt under the active key. ``context`` is bound as associated data (e.g. a row id),
        so a ciphertext copied onto another row fails to open."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return Sealed(
            self.active, nonce + self._cipher(self.active).encrypt(nonce, plaintext, context)
        )

    def open(self, sealed: Sealed, *, context: bytes) -> bytes:
        nonce, body = sealed.ciphertext[:_NONCE_BYTES], sealed.ciphertext[_NONCE_BYTES:]
        try:
            return self._cipher(sealed.kid).decrypt(nonce, body, context)
        except InvalidTag as exc:
            raise ConfigurationError(
                "ciphertext failed authentication (tampered or wrong key)"
            ) from exc

    def lookup_hash(self, value: str) -> str:
        """A keyed hash for finding a secret without storing it: HMAC-SHA256, hex."""
        return hmac.digest(self.lookup_key, value.encode(), "sha256").hex()  # one-shot, in C
