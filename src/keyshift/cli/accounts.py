"""`keyshift accounts …`: create, list, show, update, subscribe."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer

from keyshift.cli.output import emit_json, fail
from keyshift.cli.remote import segment
from keyshift.cli.runtime import run
from keyshift.errors import InvalidInput

if TYPE_CHECKING:
    from keyshift.cli.remote import Api
    from keyshift.config import Settings
    from keyshift.db.engine import Database

group = typer.Typer(help="Customer accounts and their plan.", no_args_is_help=True)

#: The largest page `accounts list` asks for (``accounts.service.MAX_PAGE``, which a test
#: holds this to; importing it here would load the database code for `--help`).
MAX_PAGE = 500


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(group, name="accounts")


def _shown(body: Any) -> dict[str, Any]:
    """An account as the CLI prints it (``AccountOut``), from the API's answer (an
    ``AccountDetail``, whose preferences and overrides it leaves out, as the local path does)."""
    from keyshift.accounts.schemas import AccountOut

    shown: dict[str, Any] = AccountOut.model_validate(body).model_dump(mode="json")
    return shown


def _account(account_id: str) -> str:
    return f"/v1/accounts/{segment(account_id)}"


@group.command("create")
def create(
    name: str = typer.Option(..., help="The customer's name."),
    external_ref: str | None = typer.Option(None, help="Your CRM/billing id (unique)."),
    plan: str | None = typer.Option(None, help="Subscribe at once to this plan (key@version)."),
) -> None:
    """Create an account (and subscribe it, with --plan); prints it as JSON."""

    async def work(_settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.accounts import service
        from keyshift.accounts.schemas import AccountOut
        from keyshift.context import cli_actor

        async with db.transaction() as session:
            actor = cli_actor()
            account = await service.create_account(
                session, actor, name=name, external_ref=external_ref
            )
            subscription = (
                await service.subscribe(session, actor, account.id, plan) if plan else None
            )
        return AccountOut.of(account, subscription).model_dump(mode="json")

    async def remote(api: Api) -> dict[str, Any]:
        body = {"name": name, "external_ref": external_ref, "plan": plan}
        return _shown(
            await api.post("/v1/accounts", {k: v for k, v in body.items() if v is not None})
        )

    emit_json(run(work, remote=remote))


@group.command("list")
def list_accounts(
    # The service refuses a page above its maximum (500), as the API does.
    limit: int = typer.Option(100, min=1, help="Page size (at most 500)."),
    after: str | None = typer.Option(None, help="The last id of the previous page."),
) -> None:
    """List accounts as JSON, one page at a time."""
    if limit > MAX_PAGE:  # the service's (and the API's) bound, said here for both paths
        fail(InvalidInput(f"limit must be between 1 and {MAX_PAGE}", field="limit"))

    async def work(_settings: Settings, db: Database) -> list[dict[str, Any]]:
        from keyshift.accounts import service
        from keyshift.accounts.schemas import AccountOut

        async with db.transaction() as session:
            accounts = await service.list_accounts(session, limit=limit, after=after)
        return [AccountOut.of(a).model_dump(mode="json") for a in accounts]

    async def remote(api: Api) -> list[dict[str, Any]]:
        page = await api.get("/v1/accounts", limit=limit, after=after)
        return [_shown(item) for item in page["items"]]

    emit_json(run(work, remote=remote))


@group.command("show")
def show(account_id: str) -> None:
    """Show an account and its subscription."""

    async def work(_settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.accounts import service
        from keyshift.accounts.schemas import AccountOut

        async with db.transaction() as session:
            account = await service.get_account(session, account_id)
            subscription = await service.get_subscription(session, account.id)
        return AccountOut.of(account, subscription).model_dump(mode="json")

    async def remote(api: Api) -> dict[str, Any]:
        return _shown(await api.get(_account(account_id)))

    emit_json(run(work, remote=remote))


@group.command("update")
def update(
    account_id: str,
    name: str | None = typer.Option(None, help="A new name."),
    status: str | None = typer.Option(
        None, help="active or suspended (migration rules' eligibility reads it)."
    ),
    attributes: str | None = typer.Option(
        None,
        help="A JSON object merged into the attributes: each name given is set, a name given"
        " as null is removed, e.g. '{\"legal_hold\": null}'.",
    ),
) -> None:
    """Change an account's name, status or attributes, as PATCH /v1/accounts/{id} does.

    Refused while a migration runs on the account. Prints the account as JSON."""
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = name
    if status is not None:
        changes["status"] = status
    if attributes is not None:
        try:
            changes["attributes"] = json.loads(attributes)
        except ValueError as error:
            fail(InvalidInput(f"not JSON: {error}", field="attributes"))

    async def work(_settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.accounts import service
        from keyshift.accounts.schemas import AccountOut
        from keyshift.context import cli_actor

        async with db.transaction() as session:
            account = await service.update_account(session, cli_actor(), account_id, changes)
            subscription = await service.get_subscription(session, account.id)
        return AccountOut.of(account, subscription).model_dump(mode="json")

    async def remote(api: Api) -> dict[str, Any]:
        return _shown(await api.patch(_account(account_id), changes))

    emit_json(run(work, remote=remote))


@group.command("subscribe")
def subscribe(account_id: str, plan: str = typer.Argument(..., help="key@version")) -> None:
    """Put an account on a published plan version."""

    async def work(_settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.accounts import service
        from keyshift.accounts.schemas import SubscriptionOut
        from keyshift.context import cli_actor

        async with db.transaction() as session:
            subscription = await service.subscribe(session, cli_actor(), account_id, plan)
        return SubscriptionOut.of(subscription).model_dump(mode="json")

    async def remote(api: Api) -> dict[str, Any]:
        from keyshift.accounts.schemas import SubscriptionOut

        body = await api.put(f"{_account(account_id)}/subscription", {"plan": plan})
        shown: dict[str, Any] = SubscriptionOut.model_validate(body).model_dump(mode="json")
        return shown

    emit_json(run(work, remote=remote))
