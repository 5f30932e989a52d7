"""Queries over published catalog entries."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.db.tables import CatalogEntry


async def get_entry(
    session: AsyncSession, kind: str, key: str, version: str
) -> CatalogEntry | None:
    return (
        await session.execute(
            select(CatalogEntry).where(
                CatalogEntry.kind == kind, CatalogEntry.key == key, CatalogEntry.version == version
            )
        )
    ).scalar_one_or_none()


async def list_entries(session: AsyncSession, kind: str | None = None) -> list[CatalogEntry]:
    query = select(CatalogEntry).order_by(CatalogEntry.kind, CatalogEntry.key, CatalogEntry.id)
    if kind is not None:
        query = query.where(CatalogEntry.kind == kind)
    return list((await session.execute(query)).scalars())
