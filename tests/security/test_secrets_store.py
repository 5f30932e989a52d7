"""Secret files are written 0600 in a 0700 directory whatever was there before, and a secret
file group or others can read stops the server (and every command) with one line."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from keyshift.errors import ConfigurationError
from keyshift.security.secrets_store import (
    KEYRING_FILE,
    SIGNING_FILE,
    ensure_secrets,
    load_secrets,
    save_keyring,
)
from tests.support import invoke_keyshift, run_keyshift


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _env(tmp_path: Path, secrets_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KEYSHIFT_DATABASE_URL": f"sqlite:///{tmp_path / 'k.db'}",
        "KEYSHIFT_SECRETS_DIR": str(secrets_dir),
    }


def test_a_stale_world_readable_tmp_file_does_not_widen_the_rotated_keyring(
    tmp_path: Path,
) -> None:
    secrets, _ = ensure_secrets(tmp_path / "secrets")
    stale = tmp_path / "secrets" / "keyring.tmp"
    stale.write_text("{}")
    stale.chmod(0o644)
    save_keyring(tmp_path / "secrets", secrets.keyring.rotated())
    assert _mode(tmp_path / "secrets" / KEYRING_FILE) == 0o600
    assert not stale.exists()  # it held a copy of a secret
    assert sorted(p.name for p in (tmp_path / "secrets").iterdir()) == [KEYRING_FILE, SIGNING_FILE]


def test_rotating_from_the_command_line_leaves_the_keyring_0600(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    env = _env(tmp_path, secrets_dir)
    assert invoke_keyshift(env, "init").returncode == 0
    (secrets_dir / "keyring.tmp").write_text("{}")
    (secrets_dir / "keyring.tmp").chmod(0o644)
    rotated = invoke_keyshift(env, "keys", "rotate-keyring")
    assert rotated.returncode == 0, rotated.stderr
    assert _mode(secrets_dir / KEYRING_FILE) == 0o600


def test_init_narrows_an_existing_secrets_directory_to_0700(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o755)
    secrets_dir.chmod(0o755)  # whatever the umask
    env = _env(tmp_path, secrets_dir)
    result = invoke_keyshift(env, "init")
    assert result.returncode == 0, result.stderr
    assert _mode(secrets_dir) == 0o700
    assert _mode(secrets_dir / KEYRING_FILE) == _mode(secrets_dir / SIGNING_FILE) == 0o600

    # Also when nothing was missing: init on existing secrets still narrows the directory.
    secrets_dir.chmod(0o755)
    again = invoke_keyshift(env, "init")
    assert again.returncode == 0, again.stderr
    assert _mode(secrets_dir) == 0o700


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620], ids=lambda m: f"{m:04o}")
def test_a_secret_file_others_can_access_is_refused(tmp_path: Path, mode: int) -> None:
    secrets_dir = tmp_path / "secrets"
    ensure_secrets(secrets_dir)
    (secrets_dir / SIGNING_FILE).chmod(mode)
    with pytest.raises(ConfigurationError) as caught:
        load_secrets(secrets_dir)
    assert str(secrets_dir / SIGNING_FILE) in caught.value.message
    assert f"chmod 600 {secrets_dir / SIGNING_FILE}" in caught.value.message


def test_serve_refuses_group_readable_secrets_with_one_line(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    ensure_secrets(secrets_dir)
    keyring = secrets_dir / KEYRING_FILE
    keyring.chmod(0o640)
    env = _env(tmp_path, secrets_dir)
    result = run_keyshift(env, "serve", "--port", "1", timeout=60)
    assert result.returncode == 6
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"error: {keyring} is mode 0640: group or others can access a secret;"
        f" run `chmod 600 {keyring}`"
    )
