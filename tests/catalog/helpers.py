"""Shared by the catalog tests: the example catalog, as files and as API payloads."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from keyshift.db.engine import Database
from keyshift.db.tables import AuditEvent, CatalogEntry

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "catalog"
EXAMPLE_EDITIONS = {
    "starter@2025",
    "pro@2023",
    "pro@2025",
    "team@2023",
    "team@2025",
    "enterprise@2025",
}
EXAMPLE_PLANS = {
    "pro-seat@2023",
    "pro-seat@2025",
    "pro-usage@2025",
    "starter-usage@2025",
    "team-seat@2023",
    "team-seat@2025",
    "enterprise-seat@2025",
}


def example_files(under: str = "") -> dict[str, str]:
    """``{"editions/pro-2025.toml": text, …}`` for the example catalog (or one folder of it)."""
    root = EXAMPLES / under if under else EXAMPLES
    return {
        str(p.relative_to(EXAMPLES)): p.read_text(encoding="utf-8")
        for p in sorted(root.rglob("*.toml"))
    }


def example_text(name: str) -> str:
    return (EXAMPLES / name).read_text(encoding="utf-8")


async def count_rows(db: Database) -> tuple[int, int]:
    """(catalog entries, audit events): what a refused publish must leave unchanged."""
    async with db.transaction() as session:
        entries = (await session.execute(select(func.count()).select_from(CatalogEntry))).scalar()
        events = (await session.execute(select(func.count()).select_from(AuditEvent))).scalar()
    return int(entries or 0), int(events or 0)
