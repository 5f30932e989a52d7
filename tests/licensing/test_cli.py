"""`keyshift accounts` and `keyshift licenses` on the test database: the whole lifecycle
in-process (the same Typer app, see ``invoke_keyshift``), the errors and exit codes as real
subprocesses."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from sqlalchemy import func, select

from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.db.tables import Account, Activation, AuditEvent
from keyshift.security.secrets_store import Secrets
from tests import factories
from tests.support import cli_env, invoke_keyshift, run_keyshift


def keyshift(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """In-process."""
    return invoke_keyshift(cli_env(settings), *args)


def real_keyshift(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """A real process."""
    return run_keyshift(cli_env(settings), *args)


def ok(settings: Settings, *args: str) -> Any:
    result = keyshift(settings, *args)
    assert result.returncode == 0, result.stderr
    return (
        json.loads(result.stdout)
        if result.stdout.lstrip().startswith(("{", "["))
        else result.stdout
    )


async def _count(db: Database, table: type) -> int:
    async with db.transaction() as session:
        return int((await session.execute(select(func.count()).select_from(table))).scalar_one())


async def test_accounts_and_licenses_from_the_command_line(
    db: Database, settings: Settings, secrets: Secrets
) -> None:
    await factories.publish_sample_catalog(db)
    account = ok(settings, "accounts", "create", "--name", "Acme", "--plan", factories.SEAT_NODE)
    assert account["subscription"]["plan"] == factories.SEAT_NODE
    assert ok(settings, "accounts", "show", account["id"])["name"] == "Acme"
    assert [a["id"] for a in ok(settings, "accounts", "list")] == [account["id"]]
    moved = ok(settings, "accounts", "subscribe", account["id"], factories.SEAT_FLOATING)
    assert moved["entitlements_version"] == 2

    issued = ok(settings, "licenses", "issue", account["id"], "--max-activations", "1")
    key = issued["key"]
    shown = keyshift(settings, "licenses", "show", issued["id"])
    assert key not in shown.stdout and json.loads(shown.stdout)["key_hint"] == "…" + key[-5:]
    assert ok(settings, "licenses", "reveal", issued["id"]).strip() == key
    assert [row["id"] for row in ok(settings, "licenses", "list", account["id"])] == [issued["id"]]

    activated = ok(settings, "licenses", "activate", key, "desk-1", "--label", "front desk")
    assert activated["created"] and activated["mode"] == "floating"
    full = keyshift(settings, "licenses", "activate", key, "desk-2")
    assert full.returncode == 5 and "seat" in full.stderr
    assert [a["fingerprint"] for a in ok(settings, "licenses", "activations", issued["id"])] == [
        "desk-1"
    ]
    ok(settings, "licenses", "deactivate", "--key", key, "--fingerprint", "desk-1")
    assert await _count(db, Activation) == 0

    assert (
        ok(settings, "licenses", "suspend", issued["id"], "--reason", "x")["status"] == "suspended"
    )
    assert ok(settings, "licenses", "reinstate", issued["id"])["status"] == "active"
    renewed = ok(
        settings, "licenses", "renew", issued["id"], "--until", "2040-01-01T00:00:00+00:00"
    )
    assert renewed["expires_at"].startswith("2040-01-01")
    assert ok(settings, "licenses", "revoke", issued["id"])["status"] == "revoked"
    final = keyshift(settings, "licenses", "reinstate", issued["id"])
    assert final.returncode == 5 and "revoked" in final.stderr

    async with db.transaction() as session:
        actors = {e.actor for e in (await session.execute(select(AuditEvent))).scalars()}
    assert any(a.startswith("cli:") for a in actors)


async def test_cli_errors_are_messages_with_exit_codes_and_write_nothing(
    db: Database, settings: Settings, secrets: Secrets
) -> None:
    await factories.publish_sample_catalog(db)
    events = await _count(db, AuditEvent)
    unknown_plan = real_keyshift(settings, "accounts", "create", "--name", "X", "--plan", "gold@9")
    assert unknown_plan.returncode == 3
    assert "gold@9" in unknown_plan.stderr and "Traceback" not in unknown_plan.stderr
    assert await _count(db, Account) == 0
    assert await _count(db, AuditEvent) == events

    account = await factories.create_account(db)
    _, key = await factories.issue_license(db, secrets, account.id)
    events = await _count(db, AuditEvent)
    absurd = real_keyshift(settings, "licenses", "activate", key, "f" * 10_000)
    assert absurd.returncode == 2 and "[fingerprint]" in absurd.stderr
    malformed = real_keyshift(settings, "licenses", "activate", "ABCDE-FGHJK", "m")
    assert malformed.returncode == 2 and "[key]" in malformed.stderr
    bad_date = real_keyshift(settings, "licenses", "issue", account.id, "--expires-at", "tomorrow")
    assert bad_date.returncode == 2 and "[expires_at]" in bad_date.stderr
    missing = real_keyshift(settings, "licenses", "show", "no-such-license")
    assert missing.returncode == 3
    assert await _count(db, Activation) == 0
    assert await _count(db, AuditEvent) == events
