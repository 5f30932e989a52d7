"""`keyshift demo`: the main job, end to end, on the configured database (the embedded SQLite
file by default). It uses the same services as the API and prints what each step did.

Re-runnable: the catalog publishes as "unchanged" the second time, and each run creates its
own accounts (named with the run's time), so earlier runs stay as they were.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from keyshift.cli.runtime import run

if TYPE_CHECKING:
    from keyshift.config import Settings
    from keyshift.db.engine import Database
    from keyshift.security.secrets_store import Secrets

DEFAULT_CATALOG = Path("examples/catalog")
DEFAULT_RULES = Path("examples/migrations/pro-2023-to-2025.toml")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def _step(title: str) -> None:
    typer.secho(f"\n== {title}", bold=True)


def demo(
    catalog_dir: Path = typer.Option(
        DEFAULT_CATALOG, "--catalog", help="Manifests to publish (the repository's examples)."
    ),
) -> None:
    """Run the main job end to end on the configured database, saying what each step did.

    Publishes the example catalog, creates accounts and licenses, activates machines, validates
    keys (every outcome a client can meet), exports and verifies an offline license file,
    migrates an account and rolls it back, and verifies the audit chain."""
    if not catalog_dir.is_dir():
        typer.echo(
            f"error: {catalog_dir} is not a directory; run from the repository root or pass "
            "--catalog DIR",
            err=True,
        )
        raise typer.Exit(2)

    async def work(settings: Settings, db: Database) -> bool:
        from keyshift.db.migrate import upgrade_to_head
        from keyshift.security.secrets_store import ensure_secrets

        secrets, created = ensure_secrets(settings.secrets_dir)
        await upgrade_to_head(db.engine)
        _step(f"database {db.engine.url.render_as_string(hide_password=True)}")
        typer.echo(
            f"schema current; secrets in {settings.secrets_dir}"
            + (f" (created {', '.join(created)})" if created else "")
        )
        await _catalog(db, catalog_dir)
        return await _licensing(db, secrets)

    if not run(work):
        raise typer.Exit(1)


async def _catalog(db: Database, catalog_dir: Path) -> None:
    from keyshift.catalog import loader
    from keyshift.catalog import service as catalog
    from keyshift.cli.catalog import render_diff
    from keyshift.context import cli_actor

    _step(f"publish the catalog in {catalog_dir}")
    manifests = loader.load(catalog_dir)
    async with db.transaction() as session:
        results = await catalog.publish(session, cli_actor(), manifests)
    for result in results:
        state = "published" if result.created else "unchanged"
        typer.echo(f"  {result.kind:8} {result.ref:24} {state:9} sha256 {result.content_hash[:12]}")
    _step("what changes from Pro 2023 to Pro 2025 (keyshift catalog diff)")
    async with db.transaction() as session:
        typer.echo(render_diff(await catalog.diff(session, "pro-seat@2023", "pro-seat@2025")))


async def _licensing(db: Database, secrets: Secrets) -> bool:
    from keyshift import client
    from keyshift.accounts import service as accounts
    from keyshift.audit import service as audit
    from keyshift.context import cli_actor
    from keyshift.db.types import utcnow
    from keyshift.errors import ActivationLimitReached, MalformedKey
    from keyshift.licensing import activations
    from keyshift.licensing import service as licensing
    from keyshift.validation import license_files
    from keyshift.validation import service as validation
    from keyshift.validation.cache import LicenseStateCache

    actor, keyring, signing = cli_actor(), secrets.keyring, secrets.signing
    stamp = utcnow().strftime("%Y%m%d-%H%M%S")
    cache = LicenseStateCache(ttl_seconds=0)  # the demo reads its own writes at once
    public_keys = client.public_keys_from_jwks(signing.public_jwks())
    outcomes: dict[str, str] = {}

    async def check(label: str, key: str, expect: str, **kw: Any) -> None:
        result = await validation.validate(
            db.transaction,
            keyring,
            signing,
            key=key,
            nonce=f"demo-{len(outcomes)}",
            cache=cache,
            **kw,
        )
        # Verify as a client app would: the signature over the exact bytes, and the nonce.
        body = client.verify_response(
            result.body, result.signature_header, public_keys, nonce=f"demo-{len(outcomes)}"
        )
        outcomes[label] = body["code"]
        mark = "ok " if body["code"] == expect else "UNEXPECTED"
        typer.echo(f"  {mark} {label:46} -> {body['code']} (signature verified)")

    _step("accounts, subscriptions and licenses")
    async with db.transaction() as session:
        acme = await accounts.create_account(session, actor, name=f"Acme {stamp}")
        await accounts.subscribe(session, actor, acme.id, "pro-seat@2023")
        globex = await accounts.create_account(session, actor, name=f"Globex {stamp}")
        await accounts.subscribe(session, actor, globex.id, "pro-usage@2025")
        acme_key = await licensing.issue_license(session, actor, keyring, account_id=acme.id)
        globex_key = await licensing.issue_license(session, actor, keyring, account_id=globex.id)
        spare_key = await licensing.issue_license(session, actor, keyring, account_id=acme.id)
    typer.echo(f"  Acme   ({acme.id}) on pro-seat@2023, key {acme_key.key}")
    typer.echo(f"  Globex ({globex.id}) on pro-usage@2025, key {globex_key.key}")
    typer.echo(
        "  keys are stored AES-256-GCM encrypted and found by HMAC-SHA256; never in plaintext"
    )

    _step("activations (pro-seat@2023: 3 node-locked seats)")
    for machine in ("laptop-1", "desktop-2", "build-3"):
        async with db.transaction() as session:
            await activations.activate(session, actor, keyring, acme_key.key, machine)
        typer.echo(f"  activated {machine}")
    try:
        async with db.transaction() as session:
            await activations.activate(session, actor, keyring, acme_key.key, "tablet-4")
        typer.echo("  UNEXPECTED: a fourth machine got a seat")
        outcomes["cap"] = "broken"
    except ActivationLimitReached as exc:
        typer.echo(f"  ok  tablet-4 refused: {exc.message}")

    _step("validation (POST /v1/licenses/validate), every answer signed with Ed25519")
    await check("activated machine", acme_key.key, "VALID", fingerprint="laptop-1")
    await check("feature the edition enables", acme_key.key, "VALID", feature="exports")
    await check("feature the edition lacks", acme_key.key, "FEATURE_NOT_ENTITLED", feature="sso")
    await check(
        "machine that was never activated",
        acme_key.key,
        "FINGERPRINT_MISMATCH",
        fingerprint="tablet-4",
    )
    await check(
        "license with no machines yet", spare_key.key, "NO_ACTIVATION", fingerprint="laptop-1"
    )
    await check("usage-plan license, key only", globex_key.key, "VALID")
    await check("a key nobody issued", _unissued_like(acme_key.key), "NOT_FOUND")
    async with db.transaction() as session:
        await licensing.suspend_license(session, actor, acme_key.license.id, reason="demo")
    await check("suspended license", acme_key.key, "SUSPENDED", fingerprint="laptop-1")
    async with db.transaction() as session:
        await licensing.reinstate_license(session, actor, acme_key.license.id, reason="demo")
    await check("reinstated license", acme_key.key, "VALID", fingerprint="laptop-1")
    async with db.transaction() as session:
        await licensing.revoke_license(session, actor, spare_key.license.id, reason="demo")
    await check("revoked license", spare_key.key, "REVOKED")
    typo = acme_key.key[:-1] + ("X" if acme_key.key[-1] != "X" else "Y")
    try:
        licensing.lookup_for(keyring, typo)
        typer.echo("  UNEXPECTED: a mistyped key passed the check character")
        outcomes["typo"] = "broken"
    except MalformedKey as exc:
        typer.echo(f"  ok  mistyped key caught before any lookup: {exc.message}")

    _step("offline license file (signed; encrypted with a key derived from the license key)")
    async with db.transaction() as session:
        exported = await license_files.export_license_file(
            session,
            actor,
            keyring,
            signing,
            globex_key.license.id,
            encrypt=True,
            ttl=timedelta(days=30),
        )
    payload = client.verify_license_file(exported.text, public_keys, license_key=globex_key.key)
    typer.echo(
        f"  exported {len(exported.text)} bytes, valid until {exported.file_expires_at:%Y-%m-%d}"
    )
    typer.echo(f"  verified offline by keyshift.client: plan {payload['entitlements']['plan']}")
    lines = exported.text.splitlines()
    lines[2] = ("B" if lines[2][0] != "B" else "C") + lines[2][1:]
    try:
        client.verify_license_file("\n".join(lines), public_keys, license_key=globex_key.key)
        typer.echo("  UNEXPECTED: a tampered file verified")
        outcomes["file"] = "broken"
    except client.LicenseFileError as exc:
        typer.echo(f"  ok  one changed character is refused: {type(exc).__name__}")

    migrated = await _migration(db, secrets, acme.id, acme_key.key, check)

    _step("audit chain (keyshift audit verify)")
    async with db.transaction() as session:
        report = await audit.verify(session)
    typer.echo(f"  {report.checked} events, chain {'intact' if report.ok else 'BROKEN'}")

    expected = {
        "activated machine": "VALID",
        "feature the edition enables": "VALID",
        "feature the edition lacks": "FEATURE_NOT_ENTITLED",
        "machine that was never activated": "FINGERPRINT_MISMATCH",
        "license with no machines yet": "NO_ACTIVATION",
        "usage-plan license, key only": "VALID",
        "a key nobody issued": "NOT_FOUND",
        "suspended license": "SUSPENDED",
        "reinstated license": "VALID",
        "revoked license": "REVOKED",
        "after the migration: same key, same machine": "VALID",
        "during the grace: a feature only 2023 had": "VALID",
        "after the rollback: back on 2023": "VALID",
    }
    ok = (
        report.ok
        and migrated
        and all(outcomes.get(k) == v for k, v in expected.items())
        and not any(v == "broken" for v in outcomes.values())
    )
    _step("done" if ok else "done, with UNEXPECTED results above")
    typer.echo("  next: `keyshift serve`, then see docs/validation.md for the HTTP calls")
    return ok


def _unissued_like(key: str) -> str:
    """A well-formed key (valid check character) that was never issued."""
    from keyshift.licensing import keys

    body = "".join(reversed(key.replace("-", "")[:-1]))
    return keys.format_key(body + keys.check_character(body))


async def _migration(db: Database, secrets: Secrets, account_id: str, key: str, check: Any) -> bool:
    """Pro 2023 → Pro 2025 for Acme: plan, apply, validate, supersede its offline file, roll
    back by hash, apply again and finalize."""
    from keyshift import client
    from keyshift.canonical import canonical_json
    from keyshift.cli.migrate import plan_text
    from keyshift.client.signatures import verify_signature
    from keyshift.context import cli_actor
    from keyshift.db.types import utcnow
    from keyshift.migration import repository
    from keyshift.migration.errors import RulesInvalid
    from keyshift.migration.executor import Executor, check_rules, preview
    from keyshift.migration.loader import load_rules
    from keyshift.migration.rollback import finalize, rollback
    from keyshift.objects import service as data_objects
    from keyshift.states import MigrationState, Step
    from keyshift.validation import license_files

    actor, signing = cli_actor(), secrets.signing
    _step(f"migration: plan {DEFAULT_RULES} for Acme (keyshift migrate plan)")
    try:
        rules, _ = load_rules(DEFAULT_RULES)
    except RulesInvalid as error:
        typer.echo(f"  UNEXPECTED: {error.message} (run from the repository root)")
        return False
    async with db.transaction() as session:
        # Acme keeps 300 GB of data: over pro@2025's 250 GB, which the rules resolve with a grace.
        for name, units in (("raw-footage", 180), ("renders", 120)):
            await data_objects.put_object(
                session,
                actor,
                account_id,
                quota="storage_gb",
                name=name,
                units=units,
                content=f"{name} index".encode(),
            )
        assert not await check_rules(session, rules)
    async with db.transaction() as session:
        plan, _ = await preview(session, rules, account_id, now=utcnow())
    typer.echo("  " + plan_text(plan.to_dict()).replace("\n", "\n  "))
    async with db.transaction() as session:
        old_file = await license_files.checkout(
            session, secrets.keyring, signing, key=key, fingerprint="laptop-1"
        )

    _step("migration: apply (lock → snapshot → prepare → cutover → verify → receipt)")
    executor = Executor(db, signing)
    row = await executor.apply(actor, rules, account_id)
    snapshot = row.snapshot_hash or "none"  # set by the snapshot step, which apply ran
    typer.echo(f"  migration {row.id}: {row.state}; snapshot sha256 {snapshot[:16]}…")
    receipt = row.receipt or {}
    public = client.public_keys_from_jwks(signing.public_jwks())
    verify_signature(
        canonical_json(receipt["body"]),
        receipt["keyid"],
        "ed25519",
        base64.b64decode(receipt["signature"]),
        public,
    )
    typer.echo(
        f"  receipt signed by {receipt['keyid']} and verified: {receipt['body']['from']}"
        f" → {receipt['body']['to']} at {receipt['body']['effective_at']}"
    )
    await check("after the migration: same key, same machine", key, "VALID", fingerprint="laptop-1")
    await check(
        "during the grace: a feature only 2023 had", key, "VALID", feature="legacy_csv_export"
    )
    async with db.transaction() as session:
        answer = await license_files.check_in(
            session,
            secrets.keyring,
            signing,
            key=key,
            license_file=old_file.text,
            fingerprint="laptop-1",
        )
    typer.echo(
        f"  offline file from before: superseded={answer.superseded} ({answer.reason}); "
        f"a new one was issued"
    )

    _step("migration: roll back, prove it by hash, apply again, finalize")
    rolled = await rollback(executor, actor, row.id, reason="demo")
    async with db.transaction() as session:
        proof = (await repository.steps_done(session, rolled.id))[Step.ROLLBACK].details
    typer.echo(
        f"  restored sha256 {proof['restored_hash'][:16]}… == snapshot "
        f"{proof['snapshot_hash'][:16]}…: {proof['exact']}"
    )
    await check("after the rollback: back on 2023", key, "VALID", fingerprint="laptop-1")
    again = await executor.apply(actor, rules, account_id)
    done = await finalize(executor, actor, again.id)
    typer.echo(f"  migration {done.id}: {done.state} (old copies released, snapshot retired)")
    return bool(proof["exact"]) and answer.superseded and done.state == MigrationState.FINALIZED
