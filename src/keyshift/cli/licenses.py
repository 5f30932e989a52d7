"""`keyshift licenses …`: issue and manage license keys, and their activations."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer

from keyshift.cli.output import emit_json
from keyshift.cli.runtime import run
from keyshift.errors import InvalidInput

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from keyshift.config import Settings
    from keyshift.db.engine import Database
    from keyshift.db.tables import License
    from keyshift.licensing.service import StatusChange

group = typer.Typer(help="License keys, their lifecycle and activations.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(group, name="licenses")


async def _shown(session: AsyncSession, row: License) -> dict[str, Any]:
    """A license as the API shows it (``LicenseOut``), with its standing now."""
    from keyshift.licensing import service
    from keyshift.licensing.schemas import LicenseOut

    standing = await service.license_standing(session, row)
    shown: dict[str, Any] = LicenseOut.of(row, standing).model_dump(mode="json")
    return shown


def _when(text: str | None, field: str = "expires_at") -> datetime | None:
    """An ISO 8601 instant with a timezone (``2026-01-01T00:00:00Z``)."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"{text!r} is not an ISO 8601 date-time", field=field) from exc
    if value.tzinfo is None:
        raise InvalidInput("give a timezone, e.g. 2026-01-01T00:00:00Z", field=field)
    return value


@group.command("issue")
def issue(
    account_id: str,
    expires_at: str | None = typer.Option(None, help="ISO 8601; default: the plan's term."),
    max_activations: int | None = typer.Option(None, help="Override the plan's seat cap."),
) -> None:
    """Issue a key; the plaintext key is printed this once (as JSON with the license)."""

    async def work(settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.licensing import service
        from keyshift.licensing.schemas import LicenseIssued, LicenseOut
        from keyshift.security.secrets_store import load_secrets

        keyring = load_secrets(settings.secrets_dir).keyring
        async with db.transaction() as session:
            issued = await service.issue_license(
                session,
                cli_actor(),
                keyring,
                account_id=account_id,
                expires_at=_when(expires_at),
                max_activations_override=max_activations,
            )
            standing = await service.license_standing(session, issued.license)
        out = LicenseIssued(**LicenseOut.of(issued.license, standing).model_dump(), key=issued.key)
        emit_json(out.model_dump(mode="json"))

    run(work)


@group.command("show")
def show(license_id: str) -> None:
    """Show a license (never its key; see `reveal`)."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.licensing import service

        async with db.transaction() as session:
            row = await service.get_license(session, license_id)
            emit_json(await _shown(session, row))

    run(work)


@group.command("list")
def list_licenses(account_id: str) -> None:
    """List an account's licenses."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.licensing import service

        async with db.transaction() as session:
            rows = await service.list_licenses(session, account_id)
            emit_json([await _shown(session, row) for row in rows])

    run(work)


def _status_changes() -> dict[str, StatusChange]:
    """The service behind each status command (imported when one runs)."""
    from keyshift.licensing import service

    return {
        "suspend": service.suspend_license,
        "reinstate": service.reinstate_license,
        "revoke": service.revoke_license,
    }


def _status_command(name: str, help_text: str) -> None:
    def command(
        license_id: str, reason: str | None = typer.Option(None, help="Recorded in the audit log.")
    ) -> None:
        async def work(_settings: Settings, db: Database) -> None:
            from keyshift.context import cli_actor

            change = _status_changes()[name]
            async with db.transaction() as session:
                row = await change(session, cli_actor(), license_id, reason=reason)
                emit_json(await _shown(session, row))

        run(work)

    command.__doc__ = help_text
    group.command(name)(command)


_status_command("suspend", "Suspend a license (reversible).")
_status_command("reinstate", "Reinstate a suspended license.")
_status_command("revoke", "Revoke a license for good; frees its seats.")


@group.command("renew")
def renew(
    license_id: str,
    until: str | None = typer.Option(None, help="ISO 8601; default: add the plan's term."),
) -> None:
    """Extend a license by its plan's term from the later of now and its expiry."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.licensing import service

        async with db.transaction() as session:
            row = await service.renew_license(
                session, cli_actor(), license_id, until=_when(until, "until")
            )
            emit_json(await _shown(session, row))

    run(work)


@group.command("reveal")
def reveal(license_id: str) -> None:
    """Print a license's key (decrypted; the reveal is audited)."""

    async def work(settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.licensing import service
        from keyshift.security.secrets_store import load_secrets

        keyring = load_secrets(settings.secrets_dir).keyring
        async with db.transaction() as session:
            key = await service.reveal(session, cli_actor(), keyring, license_id)
        typer.echo(key)

    run(work)


@group.command("activate")
def activate(
    key: str,
    fingerprint: str,
    label: str | None = typer.Option(None, help="A name for the machine."),
) -> None:
    """Activate a machine on a license, as its client would."""

    async def work(settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.licensing import activations
        from keyshift.licensing.schemas import ActivationCreated, ActivationOut
        from keyshift.security.secrets_store import load_secrets

        keyring = load_secrets(settings.secrets_dir).keyring
        async with db.transaction() as session:
            outcome = await activations.activate(
                session, cli_actor(), keyring, key, fingerprint, label=label
            )
        out = ActivationOut.of(outcome.activation)
        created = ActivationCreated(**out.model_dump(), created=outcome.created)
        emit_json(created.model_dump(mode="json"))

    run(work)


@group.command("deactivate")
def deactivate(
    activation_id: str | None = typer.Option(None, "--id", help="The activation's id."),
    key: str | None = typer.Option(None, help="The license key (with --fingerprint)."),
    fingerprint: str | None = typer.Option(None, help="The machine's fingerprint."),
) -> None:
    """Free a seat: by activation --id, or by --key and --fingerprint."""

    async def work(settings: Settings, db: Database) -> None:
        from keyshift.context import cli_actor
        from keyshift.licensing import activations
        from keyshift.licensing.schemas import ActivationOut
        from keyshift.security.secrets_store import load_secrets

        async with db.transaction() as session:
            if activation_id is not None:
                gone = await activations.deactivate_by_id(session, cli_actor(), activation_id)
            elif key is not None and fingerprint is not None:
                keyring = load_secrets(settings.secrets_dir).keyring
                gone = await activations.deactivate(session, cli_actor(), keyring, key, fingerprint)
            else:
                raise InvalidInput("give --id, or --key and --fingerprint", field="id")
        emit_json(ActivationOut.of(gone).model_dump(mode="json"))

    run(work)


@group.command("activations")
def list_activations(license_id: str) -> None:
    """List a license's activations (a lapsed floating lease shows is_live false)."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.licensing import activations
        from keyshift.licensing.schemas import ActivationOut

        async with db.transaction() as session:
            rows = await activations.list_activations(session, license_id)
        emit_json([ActivationOut.of(a).model_dump(mode="json") for a in rows])

    run(work)
