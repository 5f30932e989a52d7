"""`keyshift validate`: validate a license key as an application would."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer

from keyshift.cli.output import emit_json
from keyshift.cli.runtime import run

if TYPE_CHECKING:
    from keyshift.config import Settings
    from keyshift.db.engine import Database


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("validate")(validate)


def validate(
    key: str = typer.Argument(..., help="The license key."),
    fingerprint: str | None = typer.Option(None, help="Machine fingerprint to check."),
    feature: str | None = typer.Option(None, help="Feature the application wants to use."),
    nonce: str | None = typer.Option(None, help="Echoed inside the signed answer."),
) -> None:
    """Validate a key as an application would and print the signed answer.

    Exit 0 if VALID, 1 if not (the code says why)."""
    from keyshift.security.secrets_store import load_secrets
    from keyshift.validation import decide as policy
    from keyshift.validation import service as validation

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
    typer.echo(f"{policy.SIGNATURE_HEADER}: {result.signature_header}", err=True)
    raise typer.Exit(0 if result.valid else 1)
