"""Queries over licenses and activations. No domain decisions here: the service and
activation modules decide, these functions read, lock and delete."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from keyshift.db.tables import Activation, License


async def lock_license(session: AsyncSession, license_id: str) -> License | None:
    """The license row under ``SELECT … FOR UPDATE`` (refreshed if already in the session).

    Every read-check-write on a license (status changes, activation caps) takes this lock
    first, so concurrent writers on PostgreSQL serialise on the row. SQLite has no row locks;
    its transactions take the database write lock at BEGIN IMMEDIATE instead.
    """
    query = (
        select(License)
        .where(License.id == license_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return (await session.execute(query)).scalar_one_or_none()


async def list_licenses(session: AsyncSession, account_id: str) -> list[License]:
    query = (
        select(License)
        .where(License.account_id == account_id)
        .order_by(License.created_at, License.id)
    )
    return list((await session.execute(query)).scalars())


async def list_activations(session: AsyncSession, license_id: str) -> list[Activation]:
    query = (
        select(Activation)
        .where(Activation.license_id == license_id)
        .order_by(Activation.created_at, Activation.id)
    )
    return list((await session.execute(query)).scalars())


async def find_activation(
    session: AsyncSession, license_id: str, fingerprint: str
) -> Activation | None:
    query = select(Activation).where(
        Activation.license_id == license_id, Activation.fingerprint == fingerprint
    )
    return (await session.execute(query)).scalar_one_or_none()


def _is_live(now: datetime) -> ColumnElement[bool]:
    return or_(Activation.lease_expires_at.is_(None), Activation.lease_expires_at > now)


async def count_live_activations(session: AsyncSession, license_id: str, now: datetime) -> int:
    """Seats in use: node-locked activations plus floating leases that have not expired."""
    query = (
        select(func.count())
        .select_from(Activation)
        .where(Activation.license_id == license_id, _is_live(now))
    )
    return int((await session.execute(query)).scalar_one())


async def expired_leases(
    session: AsyncSession, license_id: str, now: datetime, *, keep: str | None = None
) -> list[Activation]:
    query = select(Activation).where(
        Activation.license_id == license_id,
        Activation.lease_expires_at.is_not(None),
        Activation.lease_expires_at <= now,
    )
    if keep is not None:
        query = query.where(Activation.id != keep)
    return list((await session.execute(query)).scalars())


async def delete_activations(session: AsyncSession, ids: Sequence[str]) -> None:
    if ids:
        await session.execute(delete(Activation).where(Activation.id.in_(list(ids))))
