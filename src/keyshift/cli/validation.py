"""`keyshift validate`, `keyshift license-file …` and `keyshift keys …`: validation, offline
license files and the Ed25519 signing keys from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from keyshift import client
from keyshift.audit import service as audit
from keyshift.cli.output import emit_json
from keyshift.cli.runtime import run
from keyshift.config import Settings
from keyshift.context import cli_actor
from keyshift.db.engine import Database
from keyshift.errors import ConfigurationError
from keyshift.licensing import license_files, validation
from keyshift.security.rotation import ReencryptReport, reencrypt_licenses
from keyshift.security.secrets_store import load_secrets, save_keyring, save_signing

files = typer.Typer(
    help="Offline license files (signed, optionally encrypted).", no_args_is_help=True
)
keys_group = typer.Typer(
    help="The Ed25519 keys that sign responses and files.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("validate")(validate)
    app.add_typer(files, name="license-file")
    app.add_typer(keys_group, name="keys")


def validate(
    key: str = typer.Argument(..., help="The license key."),
    fingerprint: str | None = typer.Option(None, help="Machine fingerprint to check."),
    feature: str | None = typer.Option(None, help="Feature the application wants to use."),
    nonce: str | None = typer.Option(None, help="Echoed inside the signed answer."),
) -> None:
    """Validate a key as an application would; print the signed answer. Exit 0 if VALID, 1 if
    not (the code says why)."""

    async def work(settings: Settings, db: Database) -> validation.ValidationResult:
        secrets = load_secrets(settings.secrets_dir)
        return await validation.validate(
            db.transaction,
            secrets.keyring,
            secrets.signing,
            key=key,
            fingerprint=fingerprint,
            feature=feature,
            nonce=nonce,
        )

    result = run(work)
    emit_json(json.loads(result.body))
    typer.echo(f"{validation.SIGNATURE_HEADER}: {result.signature_header}", err=True)
    raise typer.Exit(0 if result.valid else 1)


@files.command("export")
def export(
    license_id: str = typer.Argument(..., help="The license to export."),
    out: Path | None = typer.Option(None, "--out", help="Write here instead of stdout."),
    encrypt: bool = typer.Option(False, "--encrypt", help="Encrypt with the license key."),
    ttl: str = typer.Option(license_files.DEFAULT_TTL, help="How long the file is good for."),
    fingerprint: str | None = typer.Option(None, help="Bind the file to this machine."),
) -> None:
    """Write a signed license file for offline use (capped by the plan's offline allowance)."""

    async def work(settings: Settings, db: Database) -> license_files.ExportedFile:
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
        typer.echo(f"wrote {out} (valid until {exported.file_expires_at.isoformat()})", err=True)


def _public_keys(path: Path) -> dict[str, str]:
    """Keys from the JSON `keyshift keys signing` prints (or `GET /v1/keys/signing` returns)."""
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
    """Verify a license file offline, as an application would; print its payload. Exit 1 if it
    does not verify or has expired."""
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


def _load_signing(settings: Settings) -> Any:
    try:
        return load_secrets(settings.secrets_dir).signing
    except ConfigurationError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(6) from exc


@keys_group.command("signing")
def signing() -> None:
    """Print the public signing keys (the same document as `GET /v1/keys/signing`)."""
    emit_json({"keys": _load_signing(Settings.from_env()).public_jwks()})


@keys_group.command("rotate-signing")
def rotate_signing() -> None:
    """Make a fresh signing key active; older keys stay published so files and responses they
    signed still verify. Restart the servers to sign with the new key."""

    async def work(settings: Settings, db: Database) -> str:
        signing_keys = _load_signing(settings)
        rotated = signing_keys.rotated()
        async with db.transaction() as session:
            await audit.record(
                session,
                cli_actor(),
                "signing.rotate",
                "signing_key",
                rotated.active,
                details={"previous": signing_keys.active, "kids": sorted(rotated.private_keys)},
            )
            # Written inside the transaction: if the write fails, the audit event rolls back.
            save_signing(settings.secrets_dir, rotated)
        return str(rotated.active)

    active = run(work)
    typer.echo(f"signing key {active} is now active; restart servers to sign with it")


@keys_group.command("rotate-keyring")
def rotate_keyring() -> None:
    """Make a fresh AES-256 data key active for new license keys. Older data keys stay in the
    keyring, so every stored key still opens. Restart the servers so they hold the new key,
    then run `keyshift keys reencrypt` to move the stored keys onto it."""

    async def work(settings: Settings, db: Database) -> str:
        current = load_secrets(settings.secrets_dir).keyring
        rotated = current.rotated()
        async with db.transaction() as session:
            await audit.record(
                session,
                cli_actor(),
                "keyring.rotate",
                "keyring",
                rotated.active,
                details={"previous": current.active, "kids": sorted(rotated.keys)},
            )
            save_keyring(settings.secrets_dir, rotated)
        return rotated.active

    active = run(work)
    typer.echo(f"data key {active} is now active; restart servers, then `keyshift keys reencrypt`")


@keys_group.command("reencrypt")
def reencrypt(
    batch_size: int = typer.Option(500, min=1, max=10_000, help="License keys per transaction."),
) -> None:
    """Re-encrypt every stored license key under the keyring's active data key, in batches;
    safe to interrupt and re-run while the server is serving."""

    async def work(settings: Settings, db: Database) -> ReencryptReport:
        keyring = load_secrets(settings.secrets_dir).keyring
        return await reencrypt_licenses(db, keyring, cli_actor(), batch_size=batch_size)

    report = run(work)
    typer.echo(
        f"re-encrypted {report.reencrypted} license key(s); {report.remaining} left on older "
        f"data keys; by key: {report.by_kid}"
    )
