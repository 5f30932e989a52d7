"""The CLI as a user runs it: init, tokens and audit. Most commands run in-process (the same
Typer app, see ``invoke_keyshift``); `init`, the one-line errors and `serve`'s refusal run as
real `python -m keyshift.cli` processes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from keyshift.config import Settings, env_name
from keyshift.db.engine import Database
from keyshift.db.tables import ApiToken, AuditEvent
from keyshift.security.tokens import TOKEN_PREFIX, hash_token
from tests.support import cli_env, invoke_keyshift, run_keyshift

#: Every setting that holds a number, as its variable.
NUMERIC_SETTINGS = sorted(
    env_name(name) for name, f in Settings.model_fields.items() if f.annotation in (int, float)
)

keyshift = invoke_keyshift  # in-process
real_keyshift = run_keyshift  # a real process


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_init_creates_private_secrets_schema_and_prints_one_admin_token(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "fresh-secrets"
    env = {
        **os.environ,
        "KEYSHIFT_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}",
        "KEYSHIFT_SECRETS_DIR": str(secrets_dir),
    }
    first = real_keyshift(env, "init")
    assert first.returncode == 0, first.stderr
    for name in ("keyring.json", "signing.json"):
        mode = stat.S_IMODE((secrets_dir / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    # The token alone on stdout (`TOKEN=$(keyshift init)`), everything else on stderr.
    token = first.stdout.strip()
    assert token.startswith(TOKEN_PREFIX) and first.stdout == token + "\n"
    assert "created" in first.stderr and "schema is current" in first.stderr
    assert (tmp_path / "fresh.db").exists()

    # The token works against the CLI's database, and the schema is current.
    listed = real_keyshift(env, "tokens", "list")
    assert listed.returncode == 0 and '"first admin"' in listed.stdout

    second = real_keyshift(env, "init")
    assert second.returncode == 0, second.stderr
    assert TOKEN_PREFIX not in second.stdout
    assert "created" not in second.stdout  # nothing was missing
    assert (secrets_dir / "keyring.json").read_text() == (secrets_dir / "keyring.json").read_text()


def test_init_json_gives_the_first_token_to_a_script(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KEYSHIFT_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}",
        "KEYSHIFT_SECRETS_DIR": str(tmp_path / "secrets"),
    }
    first = real_keyshift(env, "init", "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["admin_token"].startswith(TOKEN_PREFIX)
    assert report["created"] == [
        str(tmp_path / "secrets" / "keyring.json"),
        str(tmp_path / "secrets" / "signing.json"),
    ]
    assert report["database"].endswith("fresh.db")
    listed = real_keyshift(env, "tokens", "list")
    assert listed.returncode == 0 and '"first admin"' in listed.stdout

    again = json.loads(real_keyshift(env, "init", "--json").stdout)
    assert again == {**report, "created": [], "admin_token": None}


def test_init_prints_no_token_when_tokens_exist(settings: Settings, secrets: object) -> None:
    env = cli_env(settings)
    assert TOKEN_PREFIX in keyshift(env, "init").stdout
    again = keyshift(env, "init")
    assert again.returncode == 0 and TOKEN_PREFIX not in again.stdout


async def test_tokens_create_list_revoke(settings: Settings, db: Database) -> None:
    env = cli_env(settings)
    created = keyshift(
        env,
        "tokens",
        "create",
        "--name",
        "worker",
        "--scope",
        "migrations:run",
        "--ttl-minutes",
        "15",
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith(TOKEN_PREFIX) and "\n" not in secret
    async with db.transaction() as session:
        token = (
            await session.execute(select(ApiToken).where(ApiToken.token_hash == hash_token(secret)))
        ).scalar_one()
        assert token.expires_at is not None
        lifetime = token.expires_at - token.created_at
        assert 14 * 60 < lifetime.total_seconds() <= 15 * 60 + 5
    listed = keyshift(env, "tokens", "list")
    assert token.id in listed.stdout and secret not in listed.stdout
    revoked = keyshift(env, "tokens", "revoke", token.id)
    assert revoked.returncode == 0 and f"revoked {token.id}" in revoked.stdout
    async with db.transaction() as session:
        row = await session.get(ApiToken, token.id)
        assert row is not None and row.revoked_at is not None
        actors = {e.actor for e in (await session.execute(select(AuditEvent))).scalars()}
    assert all(a.startswith("cli:") for a in actors)


async def test_audit_verify_passes_a_clean_chain_and_names_tampering(
    settings: Settings, db: Database
) -> None:
    env = cli_env(settings)
    for i in range(3):
        assert (
            keyshift(env, "tokens", "create", "--name", f"t{i}", "--scope", "audit:read").returncode
            == 0
        )
    clean = keyshift(env, "audit", "verify")
    assert clean.returncode == 0, clean.stderr
    assert "checked 3 event(s): ok" in clean.stdout

    async with db.transaction() as session:
        await session.execute(update(AuditEvent).where(AuditEvent.seq == 2).values(actor="mallory"))
    edited = keyshift(env, "audit", "verify")
    assert edited.returncode == 1
    assert "seq 2: content_edited" in edited.stderr
    assert "CHAIN BROKEN" in edited.stdout


async def test_audit_verify_names_a_deleted_event(settings: Settings, db: Database) -> None:
    env = cli_env(settings)
    for i in range(4):
        keyshift(env, "tokens", "create", "--name", f"t{i}", "--scope", "audit:read")
    async with db.transaction() as session:
        await session.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    result = keyshift(env, "audit", "verify")
    assert result.returncode == 1
    assert "seq 2: gap: seq 2 is missing" in result.stderr


def test_revoking_an_unknown_token_is_one_line_and_exit_3(settings: Settings) -> None:
    result = real_keyshift(cli_env(settings), "tokens", "revoke", "nonexistent")
    assert_one_line_error(result)
    assert result.returncode == 3
    assert "nonexistent" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("tokens", "create", "--name", "x", "--scope", "root"),
        (
            "tokens",
            "create",
            "--name",
            "x",
            "--scope",
            "admin",
            "--ttl-days",
            "1",
            "--ttl-minutes",
            "5",
        ),
    ],
)
def test_invalid_token_requests_are_one_line_errors(
    settings: Settings, args: tuple[str, ...]
) -> None:
    result = keyshift(cli_env(settings), *args)
    assert_one_line_error(result)
    assert result.returncode == 2


def test_an_unreachable_or_uninitialised_database_is_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KEYSHIFT_DATABASE_URL": f"sqlite:///{tmp_path / 'never-initialised.db'}",
        "KEYSHIFT_SECRETS_DIR": str(tmp_path / "s"),
    }
    result = real_keyshift(env, "tokens", "list")
    assert_one_line_error(result)
    assert "keyshift init" in result.stderr
    unreachable = {**env, "KEYSHIFT_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    assert_one_line_error(real_keyshift(unreachable, "audit", "verify"))


def test_serve_without_secrets_is_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KEYSHIFT_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
        "KEYSHIFT_SECRETS_DIR": str(tmp_path / "missing"),
    }
    result = real_keyshift(env, "serve", "--port", "1")
    assert_one_line_error(result)
    assert "keyshift init" in result.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KEYSHIFT_KEY_RATE_PER_SECOND", "abc"),
        ("KEYSHIFT_TOKEN_RATE_BURST", "0"),
        ("KEYSHIFT_MAX_BODY_BYTES", "-1"),
        ("KEYSHIFT_ANOMALY_WINDOW", "-5"),
        ("KEYSHIFT_IDEMPOTENCY_WINDOW_HOURS", "1"),
    ],
)
def test_serve_with_a_bad_setting_is_one_line_naming_it(
    tmp_path: Path, name: str, value: str
) -> None:
    env = {
        **os.environ,
        "KEYSHIFT_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
        "KEYSHIFT_SECRETS_DIR": str(tmp_path / "missing"),
        name: value,
    }
    result = real_keyshift(env, "serve", "--port", "1")
    assert_one_line_error(result)
    assert name in result.stderr


@pytest.mark.parametrize("name", NUMERIC_SETTINGS)
def test_every_numeric_setting_is_checked_before_serve_starts(tmp_path: Path, name: str) -> None:
    env = {
        **os.environ,
        "KEYSHIFT_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
        "KEYSHIFT_SECRETS_DIR": str(tmp_path / "missing"),
        name: "abc",
    }
    result = real_keyshift(env, "serve", "--port", "1")
    assert_one_line_error(result)
    assert result.stderr.startswith(f"error: {name}='abc': ")
    assert result.returncode == 6


@pytest.mark.parametrize("name", NUMERIC_SETTINGS)
def test_every_numeric_setting_is_checked_before_any_command_runs(
    settings: Settings, name: str
) -> None:
    result = keyshift({**cli_env(settings), name: "-1"}, "accounts", "list")
    assert_one_line_error(result)
    assert result.stderr.startswith(f"error: {name}='-1': ")
    assert result.returncode == 6


@pytest.mark.parametrize(
    ("name", "value"), [("KEYSHIFT_LOG_LEVEL", "loud"), ("KEYSHIFT_DEBUG", "?")]
)
def test_a_setting_that_is_not_a_number_is_checked_too(
    settings: Settings, name: str, value: str
) -> None:
    for args in (("serve", "--port", "1"), ("accounts", "list")):
        result = real_keyshift({**cli_env(settings), name: value}, *args)
        assert_one_line_error(result)
        assert result.stderr.startswith(f"error: {name}="), result.stderr


def test_a_page_larger_than_the_service_allows_is_one_line(settings: Settings) -> None:
    result = keyshift(cli_env(settings), "accounts", "list", "--limit", "501")
    assert_one_line_error(result)
    assert result.returncode == 2 and "[limit]" in result.stderr
