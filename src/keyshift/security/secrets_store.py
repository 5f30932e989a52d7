"""Loads and creates the server's secrets: the keyring and the signing keys.

They live as two JSON files (mode 0600) in ``KEYSHIFT_SECRETS_DIR`` — never in the database
that holds the ciphertexts. In production mount that directory from a secret store.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from keyshift.errors import ConfigurationError
from keyshift.security.keyring import Keyring
from keyshift.security.signing import SigningKeys

KEYRING_FILE = "keyring.json"
SIGNING_FILE = "signing.json"


@dataclass
class Secrets:
    keyring: Keyring
    signing: SigningKeys


def _write_private(path: Path, data: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one


def _read(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigurationError(f"{path} is missing; run `keyshift init` first") from exc
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} must hold a JSON object")
    return data


def ensure_secrets(directory: Path) -> tuple[Secrets, list[str]]:
    """Create whatever is missing; returns the secrets and the names of the files created."""
    created: list[str] = []
    if not (directory / KEYRING_FILE).exists():
        _write_private(directory / KEYRING_FILE, Keyring.generate().to_dict())
        created.append(KEYRING_FILE)
    if not (directory / SIGNING_FILE).exists():
        _write_private(directory / SIGNING_FILE, SigningKeys.generate().to_dict())
        created.append(SIGNING_FILE)
    return load_secrets(directory), created


def load_secrets(directory: Path) -> Secrets:
    return Secrets(
        keyring=Keyring.from_dict(_read(directory / KEYRING_FILE)),
        signing=SigningKeys.from_dict(_read(directory / SIGNING_FILE)),
    )


def save_keyring(directory: Path, keyring: Keyring) -> None:
    _write_private(directory / KEYRING_FILE, keyring.to_dict())


def save_signing(directory: Path, signing: SigningKeys) -> None:
    _write_private(directory / SIGNING_FILE, signing.to_dict())
