"""`keyshift accounts …`: create, list, show, update, subscribe."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer

from keyshift.cli.output import emit_json, fail
from keyshift.cli.runtime import run
from keyshift.errors import InvalidInput

if TYPE_CHECKING:
    from keyshift.config import Settings
    from keyshift.db.engine import Database

group = typer.Typer(help="Customer accounts and their plan.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(group, name="accounts")


@group.command("create")
def create(
    name: str = typer.Option(..., help="The customer's name."),
    external_ref: str | None = typer.Option(None, help="Your CRM/billing id (unique)."),
    plan: str | None = typer.Option(None, help="Subscribe at once to this plan (key@version)."),
) -> None:
    """Create an account (and subscribe it, with --plan); prints it as JSON."""

    async def work(_settings: Settings, db: Database) -> None:
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
        emit_json(AccountOut.of(account, subscription).model_dump(mode="json"))

    run(work)


@group.command("list")
def list_accounts(
    # The service refuses a page above its maximum (500), as the API does.
    limit: int = typer.Option(100, min=1, help="Page size (at most 500)."),
    after: str | None = typer.Option(None, help="The last id of the previous page."),
) -> None:
    """List accounts as JSON, one page at a time."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.accounts import service
        from keyshift.accounts.schemas import AccountOut

        async with db.transaction() as session:
            accounts = await service.list_accounts(session, limit=limit, after=after)
        emit_json([AccountOut.of(a).model_dump(mode="json") for a in accounts])

    run(work)


@group.command("show")
def show(account_id: str) -> None:
    """Show an account and its subscription."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.accounts import service
        from keyshift.accounts.schemas import AccountOut

        async with db.transaction() as session:
            account = await service.get_account(session, account_id)
            subscription = await service.get_subscription(session, account.id)
        emit_json(AccountOut.of(account, subscription).model_dump(mode="json"))

    run(work)


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

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.accounts import service
        from keyshift.accounts.schemas import AccountOut
        from keyshift.context import cli_actor

        async with db.transaction() as session:
            account = await service.update_account(session, cli_actor(), account_id, changes)
            subscription = await service.get_subscription(session, account.id)
        emit_json(AccountOut.of(account, subscription).model_dump(mode="json"))

    run(work)


@group.command("subscribe")
def subscribe(account_id: str, plan: str = typer.Argument(..., help="key@version")) -> None:
    """Put an account on a published plan version."""

    async def work(_settings: Settings, db: Database) -> None:
        from keyshift.accounts import service
        from keyshift.accounts.schemas import SubscriptionOut
        from keyshift.context import cli_actor

        async with db.transaction() as session:
            subscription = await service.subscribe(session, cli_actor(), account_id, plan)
        emit_json(SubscriptionOut.of(subscription).model_dump(mode="json"))

    run(work)
