"""Loads and creates the server's secrets: the keyring and the signing keys.

They live as two JSON files (mode 0600) in ``KEYSHIFT_SECRETS_DIR`` (mode 0700) — never in the
database that holds the ciphertexts. In production mount that directory from a secret store.
A secret file group or others can access is refused when loaded.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
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


def _make_private_dir(directory: Path) -> None:
    """Create the directory 0700, or narrow an existing one to 0700."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        try:
            os.chmod(directory, 0o700)
        except OSError as exc:
            raise ConfigurationError(
                f"{directory} is mode {mode:04o} and cannot be made 0700: {exc.strerror or exc}"
            ) from exc


def _write_private(path: Path, data: dict[str, object]) -> None:
    """Write ``path`` 0600 whatever was there: a fresh temporary file (O_EXCL, 0600), synced,
    then renamed over it, so a reader sees the old file or the new one and nothing else."""
    directory = path.parent
    _make_private_dir(directory)
    # An older keyshift wrote through ``<name>.tmp`` and could leave one behind with a wider
    # mode; it holds a copy of the secret.
    path.with_suffix(".tmp").unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o600)
            json.dump(data, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def check_private(path: Path) -> None:
    """ConfigurationError if group or others may read or write the secret file ``path``."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return  # _read says it is missing
    if mode & 0o077:
        raise ConfigurationError(
            f"{path} is mode {mode:04o}: group or others can access a secret;"
            f" run `chmod 600 {path}`"
        )


def _read(path: Path) -> dict[str, object]:
    check_private(path)
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
    """Create whatever is missing (the directory 0700, the files 0600); returns the secrets
    and the names of the files created."""
    _make_private_dir(directory)
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
