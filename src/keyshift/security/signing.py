"""Ed25519 signing of validation responses and license files, with key ids for rotation."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keyshift.errors import ConfigurationError

ALGORITHM = "ed25519"


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass
class SigningKeys:
    """All signing keys by id; ``active`` signs, the others remain published for verification."""

    active: str
    private_keys: dict[str, Ed25519PrivateKey]

    @classmethod
    def generate(cls) -> SigningKeys:
        return cls(active="s1", private_keys={"s1": Ed25519PrivateKey.generate()})

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> SigningKeys:
        try:
            raw = data["keys"]
            assert isinstance(raw, dict)
            keys = {
                str(k): Ed25519PrivateKey.from_private_bytes(base64.b64decode(str(v)))
                for k, v in raw.items()
            }
            active = str(data["active"])
        except (KeyError, AssertionError, ValueError) as exc:
            raise ConfigurationError(f"signing keys are malformed: {exc}") from exc
        if active not in keys:
            raise ConfigurationError(f"active signing key {active!r} is missing")
        return cls(active=active, private_keys=keys)

    def to_dict(self) -> dict[str, object]:
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        return {
            "format": 1,
            "active": self.active,
            "keys": {
                kid: base64.b64encode(
                    k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
                ).decode()
                for kid, k in self.private_keys.items()
            },
        }

    def rotated(self) -> SigningKeys:
        number = 1 + max(int(k[1:]) for k in self.private_keys if k[1:].isdigit())
        kid = f"s{number}"
        return SigningKeys(kid, {**self.private_keys, kid: Ed25519PrivateKey.generate()})

    def sign(self, message: bytes) -> tuple[str, bytes]:
        """Sign with the active key; returns (key id, 64-byte signature)."""
        return self.active, self.private_keys[self.active].sign(message)

    def public_keys(self) -> dict[str, bytes]:
        return {kid: _raw_public(k.public_key()) for kid, k in self.private_keys.items()}

    def public_jwks(self) -> list[dict[str, object]]:
        """The published form: raw public keys, base64, with ids and which one signs now."""
        return [
            {
                "kid": kid,
                "alg": ALGORITHM,
                "public_key": base64.b64encode(raw).decode(),
                "active": kid == self.active,
            }
            for kid, raw in self.public_keys().items()
        ]
