"""`keyshift keys …`: the Ed25519 signing keys and the keyring's data keys — print, rotate,
re-encrypt."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from keyshift.cli.output import emit_json
from keyshift.cli.runtime import load_settings, run
from keyshift.errors import ConfigurationError

if TYPE_CHECKING:
    from keyshift.config import Settings
    from keyshift.db.engine import Database
    from keyshift.security.rotation import ReencryptReport
    from keyshift.security.signing import SigningKeys

keys_group = typer.Typer(
    help="The Ed25519 keys that sign responses and files.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(keys_group, name="keys")


def _load_signing(settings: Settings) -> SigningKeys:
    from keyshift.security.secrets_store import load_secrets

    try:
        return load_secrets(settings.secrets_dir).signing
    except ConfigurationError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(6) from exc


@keys_group.command("signing")
def signing() -> None:
    """Print the public signing keys (the same document as `GET /v1/keys/signing`)."""
    emit_json({"keys": _load_signing(load_settings()).public_jwks()})


@keys_group.command("rotate-signing")
def rotate_signing() -> None:
    """Make a fresh signing key active; older keys stay published.

    Files and responses the older keys signed still verify. Restart the servers to sign with
    the new key."""

    async def work(settings: Settings, db: Database) -> str:
        from keyshift.audit import service as audit
        from keyshift.context import cli_actor
        from keyshift.security.secrets_store import save_signing

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
    """Make a fresh AES-256 data key active for new license keys.

    Older data keys stay in the keyring, so every stored key still opens. Restart the servers
    so they hold the new key, then run `keyshift keys reencrypt` to move the stored keys onto
    it."""

    async def work(settings: Settings, db: Database) -> str:
        from keyshift.audit import service as audit
        from keyshift.context import cli_actor
        from keyshift.security.secrets_store import load_secrets, save_keyring

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
    """Re-encrypt every stored license key under the keyring's active data key.

    In batches, one transaction each; safe to interrupt and re-run while the server is
    serving."""

    async def work(settings: Settings, db: Database) -> ReencryptReport:
        from keyshift.context import cli_actor
        from keyshift.security.rotation import reencrypt_licenses
        from keyshift.security.secrets_store import load_secrets

        keyring = load_secrets(settings.secrets_dir).keyring
        return await reencrypt_licenses(db, keyring, cli_actor(), batch_size=batch_size)

    report = run(work)
    typer.echo(
        f"re-encrypted {report.reencrypted} license key(s); {report.remaining} left on older "
        f"data keys; by key: {report.by_kid}"
    )
