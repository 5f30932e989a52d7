"""`keyshift migrate …`: plan, apply, resume, roll back, finalize, and manage scheduled changes
for one account."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from keyshift.cli.output import emit_json, readable
from keyshift.cli.remote import segment
from keyshift.cli.rules import RULES_HELP, checked, load, sending
from keyshift.cli.runtime import run
from keyshift.states import MigrationState, Step

if TYPE_CHECKING:
    from keyshift.cli.remote import Api
    from keyshift.config import Settings
    from keyshift.db.engine import Database

group = typer.Typer(
    help="Move one account between plans: plan, apply, roll back, finalize.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(group, name="migrate")


def _executor(settings: Settings, db: Database) -> Any:
    from keyshift.migration.executor import Executor
    from keyshift.security.secrets_store import load_secrets

    return Executor(db, load_secrets(settings.secrets_dir).signing)


def _view(row: Any) -> dict[str, Any]:
    """A migration as the API lists it (``MigrationOut``), as JSON data: from a row, or from
    the API's answer (a ``MigrationDetail``, whose plan and ledger it leaves out)."""
    from keyshift.migration.schemas import MigrationOut

    return MigrationOut.model_validate(row).model_dump(mode="json")


def _migration(path: str) -> str:
    return f"/v1/migrations/{segment(path)}"


def plan_text(plan: dict[str, Any]) -> str:
    lines = [
        f"account {plan['account_id']}: {plan['from']} → {plan['to']}  (rules {plan['rules']})",
        f"eligible: {'yes' if plan['eligible'] else 'NO'}   can apply: "
        f"{'yes' if plan['can_apply'] else 'NO'}   effective: {plan['effective']}"
        + (f" ({plan['effective_at']})" if plan["effective_at"] else ""),
    ]
    lines += [f"  reason: {reason}" for reason in plan["reasons"]]
    lines.append("steps:")
    lines += [f"  {i}. {s['step']}: {s['does']}" for i, s in enumerate(plan["steps"], 1)]
    ent = plan["changes"]["entitlements"]
    lines.append("changes:")
    for kind in ("features", "quotas"):
        for verb in ("gained", "lost", "changed"):
            for name, value in ent[kind][verb].items():
                lines.append(f"  {kind[:-1]} {verb}: {name} {readable(value)}")
    for change in plan["changes"]["counters"]:
        lines.append(
            f"  counter {change['meter']} @ {change['period_start']}: "
            f"{change['before']} → {change['after']}"
        )
    for activation in plan["deactivate"]:
        lines.append(f"  activation deactivated: {activation}")
    for change in plan["changes"].get("activations_converted", []):
        lines.append(
            f"  activation switched: {change['activation_id']} ({change['fingerprint']}) on"
            f" license {change['license_id']}: {_machine_from(change['from'])} →"
            f" {_machine_to(change['to'])}"
        )
    for pin in plan["changes"].get("activations_grandfathered", []):
        lines.append(
            f"  license {pin['license_id']} seats pinned: {pin['kept']} kept > the target's cap"
            f" of {pin['target_cap']} → cap {pin['pinned_cap']}"
        )
    for obj in plan["archive"]:
        lines.append(f"  object archived: {obj}")
    for lic in plan["changes"]["licenses"]:
        lines.append(
            f"  license {lic['license_id']}: {readable(lic['before'])} → {readable(lic['after'])}"
        )
    lines.append("conflicts:" if plan["conflicts"] else "conflicts: none")
    lines += [
        f"  {c['quota']}: {c['used']} used > {c['limit']} allowed → {c['policy']}: "
        f"{c['resolution']}"
        for c in plan["conflicts"]
    ]
    lines.append("risks: " + (", ".join(plan["risks"]) if plan["risks"] else "none"))
    return "\n".join(lines)


def _machine_from(before: dict[str, Any]) -> str:
    lease = before.get("lease_expires_at")
    return f"{before['mode']}, lease until {lease}" if lease else f"{before['mode']}, no lease"


def _machine_to(after: dict[str, Any]) -> str:
    seconds = after.get("lease_seconds")
    if seconds:
        return f"{after['mode']}, a lease of {seconds} s from the cutover"
    return f"{after['mode']}, no lease"


@group.command("plan")
def plan(
    rules_path: Path = typer.Option(..., "--rules", help=RULES_HELP),
    account: str = typer.Option(..., help="The account id."),
    as_json: bool = typer.Option(False, "--json", help="The whole plan as JSON."),
) -> None:
    """Show what a migration would do to one account, writing nothing.

    Steps, changes (entitlements, counters, licenses), conflicts and risks."""

    async def work(settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.db.types import utcnow
        from keyshift.migration.executor import preview

        rules = await checked(db, rules_path)
        async with db.transaction() as session:
            result, _ = await preview(session, rules, account, now=utcnow())
            # A plan is read-only: make sure of it whatever a future change does.
            await session.rollback()
        return result.to_dict()

    async def remote(api: Api) -> dict[str, Any]:
        # The route checks the rules against the catalog first, as `checked` does here.
        _, text = load(rules_path)
        body = {"rules": text, "account_id": account}
        plan: dict[str, Any] = await sending(rules_path, api.post("/v1/migrations/plan", body))
        return plan

    shown = run(work, remote=remote)
    if as_json:
        emit_json(shown)
    else:
        typer.echo(plan_text(shown))


@group.command("apply")
def apply(
    rules_path: Path = typer.Option(..., "--rules", help=RULES_HELP),
    account: str = typer.Option(..., help="The account id."),
    on_pending: str = typer.Option(
        "refuse", help="If the account has a scheduled change: refuse, replace or queue."
    ),
) -> None:
    """Migrate one account, or schedule it if the rules take effect later.

    Prints the migration with its receipt. Exit 5 if another migration holds the account."""

    async def work(settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.context import cli_actor

        rules = await checked(db, rules_path)
        executor = _executor(settings, db)
        row = await executor.request(cli_actor(), rules, account, on_pending=on_pending)
        if row.state == MigrationState.LOCKED:
            row = await executor.run(cli_actor(), row.id)
        return _view(row)

    async def remote(api: Api) -> dict[str, Any]:
        # The route checks the rules against the catalog first, as `checked` does here (and
        # one request, not two, counts towards the server's migration-burst flag).
        _, text = load(rules_path)
        body = {"rules": text, "account_id": account, "on_pending": on_pending}
        return _view(await sending(rules_path, api.post("/v1/migrations", body)))

    shown = run(work, remote=remote)
    emit_json(shown)
    if shown["state"] not in (
        MigrationState.COMPLETED,
        MigrationState.SCHEDULED,
        MigrationState.QUEUED,
    ):
        raise typer.Exit(5)


@group.command("resume")
def resume(migration_id: str = typer.Argument(..., help="The migration id.")) -> None:
    """Run the steps of a migration that a crash interrupted (safe to repeat)."""

    async def work(settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.context import cli_actor

        return _view(await _executor(settings, db).run(cli_actor(), migration_id))

    async def remote(api: Api) -> dict[str, Any]:
        return _view(await api.post(f"{_migration(migration_id)}/resume"))

    emit_json(run(work, remote=remote))


@group.command("rollback")
def rollback_command(
    migration_id: str | None = typer.Argument(None, help="The migration id."),
    account: str | None = typer.Option(None, help="Or: the account's latest migration."),
) -> None:
    """Restore the account to its snapshot; prints the restored and snapshot hashes."""
    if (migration_id is None) == (account is None):
        raise typer.BadParameter("give a migration id or --account, not both")

    async def work(settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.context import cli_actor
        from keyshift.migration import repository
        from keyshift.migration.rollback import latest_for_account, rollback

        executor = _executor(settings, db)
        target = migration_id
        if target is None:
            assert account is not None
            async with db.transaction() as session:
                target = (await latest_for_account(session, account)).id
        row = await rollback(executor, cli_actor(), target, reason="requested")
        async with db.transaction() as session:
            step = (await repository.steps_done(session, row.id)).get(Step.ROLLBACK)
        return {**_view(row), "rollback": step.details if step else None}

    async def remote(api: Api) -> dict[str, Any]:
        if migration_id is not None:
            body = await api.post(f"{_migration(migration_id)}/rollback")
        else:
            assert account is not None
            body = await api.post(f"/v1/accounts/{segment(account)}/migrations/rollback")
        return {**_view(body), "rollback": body["rollback"]}

    emit_json(run(work, remote=remote))


@group.command("finalize")
def finalize_command(migration_id: str = typer.Argument(..., help="The migration id.")) -> None:
    """Release the old copies and retire the snapshot (no rollback after this)."""

    async def work(settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.context import cli_actor
        from keyshift.migration.rollback import finalize

        return _view(await finalize(_executor(settings, db), cli_actor(), migration_id))

    async def remote(api: Api) -> dict[str, Any]:
        return _view(await api.post(f"{_migration(migration_id)}/finalize"))

    emit_json(run(work, remote=remote))


@group.command("cancel")
def cancel_command(migration_id: str = typer.Argument(..., help="The migration id.")) -> None:
    """Withdraw a scheduled, held or queued change."""

    async def work(settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.context import cli_actor
        from keyshift.migration.rollback import cancel

        return _view(await cancel(_executor(settings, db), cli_actor(), migration_id))

    async def remote(api: Api) -> dict[str, Any]:
        return _view(await api.post(f"{_migration(migration_id)}/cancel"))

    emit_json(run(work, remote=remote))


@group.command("approve")
def approve_command(migration_id: str = typer.Argument(..., help="The migration id.")) -> None:
    """Apply a change held for review, as it stands now."""

    async def work(settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.context import cli_actor
        from keyshift.migration.schedule import approve

        return _view(await approve(_executor(settings, db), cli_actor(), migration_id))

    async def remote(api: Api) -> dict[str, Any]:
        return _view(await api.post(f"{_migration(migration_id)}/approve"))

    emit_json(run(work, remote=remote))


@group.command("run-due")
def run_due_command() -> None:
    """Execute scheduled changes whose time has come (run it from cron or a timer)."""

    async def work(settings: Settings, db: Database) -> list[dict[str, Any]]:
        from keyshift.context import cli_actor
        from keyshift.migration.schedule import run_due

        return [_view(r) for r in await run_due(_executor(settings, db), cli_actor())]

    async def remote(api: Api) -> list[dict[str, Any]]:
        body = await api.post("/v1/migrations/run-due")
        return [_view(item) for item in body["items"]]

    emit_json(run(work, remote=remote))


@group.command("status")
def status(
    migration_id: str | None = typer.Argument(None, help="The migration id."),
    account: str | None = typer.Option(None, help="Or: every migration of the account."),
) -> None:
    """A migration with its plan and ledger, or an account's migrations."""
    if (migration_id is None) == (account is None):
        raise typer.BadParameter("give a migration id or --account, not both")

    async def work(settings: Settings, db: Database) -> Any:
        from sqlalchemy import select

        from keyshift.accounts import service as accounts
        from keyshift.db.tables import MigrationStep
        from keyshift.migration import repository
        from keyshift.migration.schemas import MigrationDetail

        if account is not None:
            async with db.transaction() as session:
                await accounts.get_account(session, account)  # as the API: 404 if none
                rows = await repository.latest_migrations(session, account, limit=LATEST)
            return [_view(r) for r in rows]
        assert migration_id is not None
        row = await _executor(settings, db).get(migration_id)
        async with db.transaction() as session:
            steps = (
                await session.execute(
                    select(MigrationStep)
                    .where(MigrationStep.migration_id == row.id)
                    .order_by(MigrationStep.seq)
                )
            ).scalars()
            return MigrationDetail.of(row, steps).model_dump(mode="json")

    async def remote(api: Api) -> Any:
        if account is not None:
            body = await api.get(
                f"/v1/accounts/{segment(account)}/migrations", state="all", limit=LATEST
            )
            return [_view(item) for item in body["items"]]
        assert migration_id is not None
        return await api.get(_migration(migration_id))

    emit_json(run(work, remote=remote))


#: How many of an account's migrations `migrate status --account` shows, newest first.
LATEST = 50
