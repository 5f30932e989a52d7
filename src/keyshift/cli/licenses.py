"""`keyshift licenses …`: issue and manage license keys, and their activations."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer

from keyshift.cli.output import emit_json, fail
from keyshift.cli.remote import segment
from keyshift.cli.runtime import run
from keyshift.errors import InvalidInput, KeyshiftError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from keyshift.cli.remote import Api
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


def _listed(body: Any) -> dict[str, Any]:
    """A license as the CLI prints it (``LicenseOut``), from the API's answer (a
    ``LicenseDetail``, whose overrides it leaves out, as the local path does)."""
    from keyshift.licensing.schemas import LicenseOut

    shown: dict[str, Any] = LicenseOut.model_validate(body).model_dump(mode="json")
    return shown


def _license(license_id: str) -> str:
    return f"/v1/licenses/{segment(license_id)}"


def _checked_when(text: str | None, field: str = "expires_at") -> datetime | None:
    """``_when``, its error printed as the command's one line (before either backend runs)."""
    try:
        return _when(text, field)
    except KeyshiftError as error:
        fail(error)


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
    expires = _checked_when(expires_at)

    async def work(settings: Settings, db: Database) -> dict[str, Any]:
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
                expires_at=expires,
                max_activations_override=max_activations,
            )
            standing = await service.license_standing(session, issued.license)
        out = LicenseIssued(**LicenseOut.of(issued.license, standing).model_dump(), key=issued.key)
        shown: dict[str, Any] = out.model_dump(mode="json")
        return shown

    async def remote(api: Api) -> dict[str, Any]:
        from keyshift.licensing.schemas import LicenseIssued

        body: dict[str, Any] = {"account_id": account_id}
        if expires is not None:
            body["expires_at"] = expires.isoformat()
        if max_activations is not None:
            body["max_activations"] = max_activations
        issued = await api.post("/v1/licenses", body)
        shown: dict[str, Any] = LicenseIssued.model_validate(issued).model_dump(mode="json")
        return shown

    emit_json(run(work, remote=remote))


@group.command("show")
def show(license_id: str) -> None:
    """Show a license (never its key; see `reveal`)."""

    async def work(_settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.licensing import service

        async with db.transaction() as session:
            row = await service.get_license(session, license_id)
            return await _shown(session, row)

    async def remote(api: Api) -> dict[str, Any]:
        return _listed(await api.get(_license(license_id)))

    emit_json(run(work, remote=remote))


@group.command("list")
def list_licenses(account_id: str) -> None:
    """List an account's licenses."""

    async def work(_settings: Settings, db: Database) -> list[dict[str, Any]]:
        from keyshift.licensing import service

        async with db.transaction() as session:
            rows = await service.list_licenses(session, account_id)
            return [await _shown(session, row) for row in rows]

    async def remote(api: Api) -> list[dict[str, Any]]:
        rows = await api.get(f"/v1/accounts/{segment(account_id)}/licenses")
        return [_listed(row) for row in rows]

    emit_json(run(work, remote=remote))


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
        async def work(_settings: Settings, db: Database) -> dict[str, Any]:
            from keyshift.context import cli_actor

            change = _status_changes()[name]
            async with db.transaction() as session:
                row = await change(session, cli_actor(), license_id, reason=reason)
                return await _shown(session, row)

        async def remote(api: Api) -> dict[str, Any]:
            body = None if reason is None else {"reason": reason}
            return _listed(await api.post(f"{_license(license_id)}/{name}", body))

        emit_json(run(work, remote=remote))

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
    when = _checked_when(until, "until")

    async def work(_settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.context import cli_actor
        from keyshift.licensing import service

        async with db.transaction() as session:
            row = await service.renew_license(session, cli_actor(), license_id, until=when)
            return await _shown(session, row)

    async def remote(api: Api) -> dict[str, Any]:
        body = None if when is None else {"expires_at": when.isoformat()}
        return _listed(await api.post(f"{_license(license_id)}/renew", body))

    emit_json(run(work, remote=remote))


@group.command("reveal")
def reveal(license_id: str) -> None:
    """Print a license's key (decrypted; the reveal is audited)."""

    async def work(settings: Settings, db: Database) -> str:
        from keyshift.context import cli_actor
        from keyshift.licensing import service
        from keyshift.security.secrets_store import load_secrets

        keyring = load_secrets(settings.secrets_dir).keyring
        async with db.transaction() as session:
            return await service.reveal(session, cli_actor(), keyring, license_id)

    async def remote(api: Api) -> str:
        body = await api.post(f"{_license(license_id)}/reveal")
        return str(body["key"])

    typer.echo(run(work, remote=remote))


@group.command("activate")
def activate(
    key: str,
    fingerprint: str,
    label: str | None = typer.Option(None, help="A name for the machine."),
) -> None:
    """Activate a machine on a license, as its client would."""

    from keyshift.licensing.schemas import ActivationCreated

    async def work(settings: Settings, db: Database) -> ActivationCreated:
        from keyshift.context import cli_actor
        from keyshift.licensing import activations
        from keyshift.licensing.schemas import ActivationOut
        from keyshift.security.secrets_store import load_secrets

        keyring = load_secrets(settings.secrets_dir).keyring
        async with db.transaction() as session:
            outcome = await activations.activate(
                session, cli_actor(), keyring, key, fingerprint, label=label
            )
        out = ActivationOut.of(outcome.activation)
        return ActivationCreated(**out.model_dump(), created=outcome.created)

    async def remote(api: Api) -> ActivationCreated:
        # The client's own call: the key authenticates it (201: a new seat, 200: held one).
        body: dict[str, Any] = {"key": key, "fingerprint": fingerprint}
        if label is not None:
            body["label"] = label
        answer = await api.call("POST", "/v1/licenses/activate", body=body)
        return ActivationCreated(**answer.json(), created=answer.status_code == 201)

    emit_json(run(work, remote=remote).model_dump(mode="json"))


@group.command("deactivate")
def deactivate(
    activation_id: str | None = typer.Option(None, "--id", help="The activation's id."),
    key: str | None = typer.Option(None, help="The license key (with --fingerprint)."),
    fingerprint: str | None = typer.Option(None, help="The machine's fingerprint."),
) -> None:
    """Free a seat: by activation --id, or by --key and --fingerprint."""
    if activation_id is None and (key is None or fingerprint is None):
        fail(InvalidInput("give --id, or --key and --fingerprint", field="id"))

    async def work(settings: Settings, db: Database) -> dict[str, Any]:
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
                raise AssertionError("checked above")
        shown: dict[str, Any] = ActivationOut.of(gone).model_dump(mode="json")
        return shown

    async def remote(api: Api) -> dict[str, Any]:
        from keyshift.licensing.schemas import ActivationOut

        if activation_id is not None:
            gone = await api.delete(f"/v1/activations/{segment(activation_id)}")
        else:
            body = {"key": key, "fingerprint": fingerprint}
            gone = await api.post("/v1/licenses/deactivate", body)
        shown: dict[str, Any] = ActivationOut.model_validate(gone).model_dump(mode="json")
        return shown

    emit_json(run(work, remote=remote))


@group.command("activations")
def list_activations(license_id: str) -> None:
    """List a license's activations (a lapsed floating lease shows is_live false)."""

    async def work(_settings: Settings, db: Database) -> list[dict[str, Any]]:
        from keyshift.licensing import activations
        from keyshift.licensing.schemas import ActivationOut

        async with db.transaction() as session:
            rows = await activations.list_activations(session, license_id)
        return [ActivationOut.of(a).model_dump(mode="json") for a in rows]

    async def remote(api: Api) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await api.get(f"{_license(license_id)}/activations")
        return rows

    emit_json(run(work, remote=remote))
