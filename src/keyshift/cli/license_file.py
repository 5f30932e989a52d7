"""`keyshift license-file …`: export signed license files for offline use, and verify them
as an application would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from keyshift import dates
from keyshift.cli.output import emit_json
from keyshift.cli.runtime import run

if TYPE_CHECKING:
    from keyshift.config import Settings
    from keyshift.db.engine import Database
    from keyshift.validation import license_files

#: ``license_files.DEFAULT_TTL``, written out so that listing the commands imports no service
#: (a test holds the two equal).
DEFAULT_TTL = "30d"

files = typer.Typer(
    help="Offline license files (signed, optionally encrypted).", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(files, name="license-file")


@files.command("export")
def export(
    license_id: str = typer.Argument(..., help="The license to export."),
    out: Path | None = typer.Option(None, "--out", help="Write here instead of stdout."),
    encrypt: bool = typer.Option(False, "--encrypt", help="Encrypt with the license key."),
    ttl: str = typer.Option(DEFAULT_TTL, help="How long the file is good for."),
    fingerprint: str | None = typer.Option(None, help="Bind the file to this machine."),
) -> None:
    """Write a signed license file for offline use (capped by the plan's offline allowance)."""

    async def work(settings: Settings, db: Database) -> license_files.ExportedFile:
        from keyshift.context import cli_actor
        from keyshift.security.secrets_store import load_secrets
        from keyshift.validation import license_files

        secrets = load_secrets(settings.secrets_dir)
        async with db.transaction() as session:
            return await license_files.export_license_file(
                session,
                cli_actor(),
                secrets.keyring,
                secrets.signing,
                license_id,
                encrypt=encrypt,
                ttl=ttl,
                fingerprint=fingerprint,
            )

    exported = run(work)
    if out is None:
        typer.echo(exported.text, nl=False)
    else:
        out.write_text(exported.text)
        until = dates.rfc3339(exported.file_expires_at)
        typer.echo(f"wrote {out} (valid until {until})", err=True)


def _public_keys(path: Path) -> dict[str, str]:
    """Keys from the JSON `keyshift keys signing` prints (or `GET /v1/keys/signing` returns)."""
    from keyshift import client

    try:
        document: Any = json.loads(path.read_text())
        found = client.public_keys_from_jwks(document)
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as exc:
        raise typer.BadParameter(f"{path}: not a signing-keys JSON document ({exc})") from exc
    if not found:
        raise typer.BadParameter(f"{path}: holds no ed25519 keys")
    return found


@files.command("verify")
def verify(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="The license file."),
    public_key_file: Path = typer.Option(
        ..., exists=True, dir_okay=False, help="JSON from `keyshift keys signing`."
    ),
    key: str | None = typer.Option(None, "--key", help="The license key (encrypted files)."),
) -> None:
    """Verify a license file offline, as an application would, and print its payload.

    Exit 1 if it does not verify or has expired."""
    from keyshift import client

    try:
        payload = client.verify_license_file(
            file.read_text(), _public_keys(public_key_file), license_key=key
        )
    except client.LicenseFileExpired as exc:
        emit_json(exc.payload)
        typer.echo(f"expired: {exc}", err=True)
        raise typer.Exit(1) from exc
    except client.LicenseFileError as exc:
        typer.echo(f"invalid: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from exc
    emit_json(payload)
