"""`keyshift usage …`: record metered usage and show an account's counters."""

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
    from keyshift.metering import service as metering

group = typer.Typer(help="Metered usage: record events, show counters.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(group, name="usage")


def _timestamp(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"{text!r} is not an ISO 8601 date-time", field="timestamp") from exc
    if value.tzinfo is None:
        raise InvalidInput("give a timezone, e.g. 2026-01-01T00:00:00Z", field="timestamp")
    return value


@group.command("record")
def record(
    meter: str = typer.Option(..., help="The meter (or throttled feature) to count against."),
    quantity: int = typer.Option(1, help="Units, an integer >= 0."),
    idempotency_key: str = typer.Option(..., help="Same key + same event = counted once."),
    key: str | None = typer.Option(None, help="Record as this license key."),
    account: str | None = typer.Option(None, help="Record for this account id."),
    timestamp: str | None = typer.Option(None, help="ISO 8601 with timezone; default now."),
    member: str | None = typer.Option(None, help="What a unique meter counts."),
) -> None:
    """Record one usage event (printed as JSON, with `replayed` for a repeated key)."""
    if (key is None) == (account is None):
        raise typer.BadParameter("give exactly one of --key or --account")
    try:
        when = _timestamp(timestamp)
    except KeyshiftError as error:
        fail(error)

    async def work(settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.context import cli_actor
        from keyshift.metering import service as metering
        from keyshift.metering import subjects
        from keyshift.security.secrets_store import load_secrets

        event = metering.UsageIn(meter, quantity, idempotency_key, when, member)
        policy = metering.UsagePolicy.from_settings(settings)

        async def once(session: AsyncSession) -> metering.Recorded:
            if key is not None:
                keyring = load_secrets(settings.secrets_dir).keyring
                subject = await subjects.subject_for_key(session, keyring, key)
            else:
                assert account is not None
                subject = await subjects.subject_for_account(session, account)
            return await metering.record(session, cli_actor(), subject, event, policy=policy)

        recorded = await metering.in_transaction(db, once)
        return recorded.to_dict()

    async def remote(api: Api) -> dict[str, Any]:
        # By key: as the application would; by account: as a service, with usage:write.
        body: dict[str, Any] = {"key": key} if key is not None else {"account_id": account}
        body |= {"meter": meter, "quantity": quantity, "idempotency_key": idempotency_key}
        if when is not None:
            body["timestamp"] = when.isoformat()
        if member is not None:
            body["member"] = member
        recorded: dict[str, Any] = await api.post("/v1/usage", body)
        return recorded

    emit_json(run(work, remote=remote))


@group.command("show")
def show(
    account_id: str,
    period: str = typer.Option("current", help="current, previous or an ISO date."),
    history_limit: int = typer.Option(20, help="Recent events per meter (0-1000)."),
) -> None:
    """An account's meters: used / included / remaining and recent events."""

    async def work(_settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.metering import reports
        from keyshift.metering.schemas import UsageReportOut

        async with db.transaction() as session:
            report = await reports.account_usage(
                session, account_id, period=period, history_limit=history_limit
            )
            shown: dict[str, Any] = UsageReportOut.model_validate(report).model_dump(mode="json")
        return shown

    async def remote(api: Api) -> dict[str, Any]:
        shown: dict[str, Any] = await api.get(
            f"/v1/accounts/{segment(account_id)}/usage",
            period=period,
            history_limit=history_limit,
        )
        return shown

    emit_json(run(work, remote=remote))


@group.command("prune")
def prune() -> None:
    """Release idempotency keys older than their window (events are kept)."""

    async def work(_settings: Settings, db: Database) -> int:
        from keyshift.context import cli_actor
        from keyshift.metering import service as metering

        async with db.transaction() as session:
            return await metering.prune(session, cli_actor())

    async def remote(api: Api) -> int:
        return int((await api.post("/v1/usage/prune"))["released"])

    emit_json({"released": run(work, remote=remote)})
