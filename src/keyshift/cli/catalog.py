"""`keyshift catalog …`: validate, publish, list, show and diff edition and plan manifests."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from keyshift.cli.output import emit_json, exit_code_for
from keyshift.cli.runtime import run
from keyshift.errors import ManifestError

if TYPE_CHECKING:
    from keyshift.catalog import service as catalog
    from keyshift.catalog.diff import CatalogDiff
    from keyshift.catalog.service import Manifest
    from keyshift.config import Settings
    from keyshift.db.engine import Database

group = typer.Typer(
    help="Editions and plans: manifests and published versions.", no_args_is_help=True
)

PATH_HELP = "A manifest file, or a directory searched recursively for *.toml."


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(group, name="catalog")


def _load_or_exit(path: Path) -> list[Manifest]:
    """Every manifest under ``path``; on any problem, print them all (file:line: field: reason)
    and exit with the invalid-input code."""
    from keyshift.catalog import loader

    try:
        return loader.load(path)
    except ManifestError as error:
        for problem in error.problems:
            typer.echo(str(problem), err=True)
        files = len({getattr(p, "file", "") for p in error.problems})
        typer.echo(f"{len(error.problems)} problem(s) in {files} file(s)", err=True)
        raise typer.Exit(exit_code_for(error)) from None


def _note_missing_editions(manifests: list[Manifest], path: Path) -> None:
    from keyshift.catalog import loader

    for manifest, edition in loader.missing_editions(manifests):
        typer.echo(
            f"note: {manifest.source}: plan.edition: {edition} is not in {path}; "
            "publish will need it to be published already"
        )


@group.command("validate")
def validate(path: Path = typer.Argument(..., help=PATH_HELP)) -> None:
    """Check manifests against the schema and each other; print every problem. Reads no database."""
    manifests = _load_or_exit(path)
    for manifest in manifests:
        typer.echo(f"ok  {manifest.kind:<8}{manifest.ref:<28}{manifest.source}")
    _note_missing_editions(manifests, path)
    editions = sum(1 for m in manifests if m.kind == "edition")
    typer.echo(
        f"{len(manifests)} manifest(s) valid: {editions} edition(s), "
        f"{len(manifests) - editions} plan(s)"
    )


@group.command("publish")
def publish(path: Path = typer.Argument(..., help=PATH_HELP)) -> None:
    """Store every manifest as an immutable version (key@version + SHA-256), all or nothing."""
    manifests = _load_or_exit(path)

    async def work(_settings: Settings, db: Database) -> list[catalog.PublishResult]:
        from keyshift.catalog import service as catalog
        from keyshift.context import cli_actor

        async with db.transaction() as session:
            return await catalog.publish(session, cli_actor(), manifests)

    results = run(work)
    for result in results:
        state = "published" if result.created else "unchanged"
        typer.echo(f"{state:<10} {result.kind:<8}{result.ref:<28}sha256:{result.content_hash[:12]}")
    created = sum(1 for r in results if r.created)
    typer.echo(f"{created} published, {len(results) - created} unchanged")


@group.command("list")
def list_entries(
    kind: str | None = typer.Option(None, help="Only 'edition' or 'plan'."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List published versions."""

    async def work(_settings: Settings, db: Database) -> list[dict[str, Any]]:
        from keyshift.catalog import service as catalog

        async with db.transaction() as session:
            return [
                {
                    "kind": e.kind,
                    "ref": f"{e.key}@{e.version}",
                    "content_hash": e.content_hash,
                    "published_at": e.published_at,
                    "published_by": e.published_by,
                }
                for e in await catalog.list_catalog(session, kind)
            ]

    entries = run(work)
    if as_json:
        emit_json(entries)
        return
    for e in entries:
        published = e["published_at"].strftime("%Y-%m-%d %H:%M")
        typer.echo(
            f"{e['kind']:<8}{e['ref']:<28}sha256:{e['content_hash'][:12]}  "
            f"{published}  {e['published_by']}"
        )
    if not entries:
        typer.echo("nothing published yet", err=True)


@group.command("show")
def show(
    kind: str = typer.Argument(..., help="'edition' or 'plan'."),
    ref: str = typer.Argument(..., help="key@version"),
) -> None:
    """Print a published version's content and hash as JSON."""

    async def work(_settings: Settings, db: Database) -> dict[str, Any]:
        from keyshift.catalog import service as catalog

        async with db.transaction() as session:
            entry = await catalog.get_entry(session, kind, ref)
            return {
                "kind": entry.kind,
                "ref": f"{entry.key}@{entry.version}",
                "content_hash": entry.content_hash,
                "content": entry.content,
            }

    emit_json(run(work))


@group.command("diff")
def diff(
    old: str = typer.Argument(..., help="From: a plan or edition ref (plan:/edition: to force)."),
    new: str = typer.Argument(..., help="To: a ref of the same kind."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Features and quotas gained, lost and changed between two published versions."""

    async def work(_settings: Settings, db: Database) -> CatalogDiff:
        from keyshift.catalog import service as catalog

        async with db.transaction() as session:
            return await catalog.diff(session, old, new)

    result = run(work)
    if as_json:
        emit_json(result.to_dict())
    else:
        typer.echo(render_diff(result))


def render_diff(result: CatalogDiff) -> str:
    """The diff as an aligned table, one section per aspect."""
    from keyshift.catalog.diff import describe_grant

    rows: dict[str, list[tuple[str, str, str, str]]] = {"features": [], "quotas": []}
    for f in result.features:
        rows["features"].append((f.change, f.name, describe_grant(f.old), describe_grant(f.new)))
    for q in result.quotas:
        direction = ("lowered" if q.is_lowered else "raised") if q.change == "changed" else q.change
        rows["quotas"].append((direction, q.name, _show(q.old), _show(q.new)))
    if result.kind == "plan":
        rows["licensing"] = [
            ("changed", c.field, _term(c.field, c.old), _term(c.field, c.new))
            for c in result.licensing
        ]
        rows["meters"] = [(m.change, m.name, _meter(m.old), _meter(m.new)) for m in result.meters]
    lines = [f"{result.kind} {result.old_ref} → {result.new_ref}"]
    if result.is_empty:
        lines.append("no differences")
        return "\n".join(lines)
    all_rows = [row for section in rows.values() for row in section]
    widths = [max(len(row[i]) for row in all_rows) for i in range(3)]
    for section, section_rows in rows.items():
        lines.append("")
        lines.append(f"{section}:")
        if not section_rows:
            lines.append("  (no change)")
        for change, name, before, after in section_rows:
            lines.append(
                f"  {change:<{widths[0]}}  {name:<{widths[1]}}  {before:<{widths[2]}}  →  {after}"
            )
    return "\n".join(lines)


def _show(value: Any) -> str:
    return "-" if value is None else str(value)


def _term(field: str, value: Any) -> str:
    """Seconds as the manifests write them (``14d``, ``1h``)."""
    if field.endswith("_seconds") and isinstance(value, int):
        for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
            if value and value % size == 0:
                return f"{value // size}{unit}"
        return f"{value}s"
    return _show(value)


def _meter(meter: dict[str, Any] | None) -> str:
    if meter is None:
        return "-"
    return f"{meter['included']} {meter['unit']}/{meter['reset']} ({meter['overage']})"
