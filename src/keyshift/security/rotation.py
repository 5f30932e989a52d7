"""Keyring rotation without downtime: a new data key becomes active, then the stored license
keys are re-encrypted under it in small batches while the server keeps serving.

Readers never need the plaintext on the validation path (they find licenses by HMAC), and the
old key stays in the keyring until every row has moved, so each row is readable throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from keyshift.audit import service as audit
from keyshift.context import Actor
from keyshift.db.engine import Database
from keyshift.db.tables import License, NoticeEndpoint
from keyshift.security.keyring import Keyring, Sealed


@dataclass(frozen=True)
class ReencryptReport:
    reencrypted: int
    remaining: int
    by_kid: dict[str, int]


async def key_usage(db: Database) -> dict[str, int]:
    """How many stored license keys each data key still seals."""
    async with db.transaction() as session:
        rows = await session.execute(
            select(License.key_kid, func.count()).group_by(License.key_kid)
        )
        return {kid: count for kid, count in rows.all()}


async def reencrypt_licenses(
    db: Database,
    keyring: Keyring,
    actor: Actor,
    *,
    batch_size: int = 500,
    max_batches: int | None = None,
) -> ReencryptReport:
    """Move every license key sealed by an older data key onto the active one.

    Each batch is one transaction that locks its rows (``SKIP LOCKED`` on PostgreSQL, so
    several rotators or a busy server don't block each other) and audits what it moved.
    Re-running after an interruption continues where it stopped.
    """
    await _reencrypt_endpoint_secret(db, keyring, actor)
    moved, batches = 0, 0
    while max_batches is None or batches < max_batches:
        async with db.transaction() as session:
            query = (
                select(License)
                .where(License.key_kid != keyring.active)
                .order_by(License.id)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            )
            rows = list((await session.execute(query)).scalars())
            if not rows:
                break
            for row in rows:
                context = row.id.encode()
                plaintext = keyring.open(Sealed(row.key_kid, row.key_ciphertext), context=context)
                sealed = keyring.seal(plaintext, context=context)
                row.key_kid, row.key_ciphertext = sealed.kid, sealed.ciphertext
            await audit.record(
                session,
                actor,
                "keyring.reencrypt",
                "keyring",
                keyring.active,
                details={"licenses": len(rows), "to_kid": keyring.active},
            )
        moved += len(rows)
        batches += 1
    usage = await key_usage(db)
    remaining = sum(count for kid, count in usage.items() if kid != keyring.active)
    return ReencryptReport(moved, remaining, usage)


async def _reencrypt_endpoint_secret(db: Database, keyring: Keyring, actor: Actor) -> None:
    """The customer-notice webhook secret (one row) onto the active key, as a license key."""
    async with db.transaction() as session:
        row = (
            await session.execute(
                select(NoticeEndpoint)
                .where(NoticeEndpoint.secret_kid != keyring.active)
                .with_for_update()
            )
        ).scalar_one_or_none()
        if row is None:
            return
        context = NoticeEndpoint.SECRET_CONTEXT
        plaintext = keyring.open(Sealed(row.secret_kid, row.secret_ciphertext), context=context)
        sealed = keyring.seal(plaintext, context=context)
        row.secret_kid, row.secret_ciphertext = sealed.kid, sealed.ciphertext
        await audit.record(
            session,
            actor,
            "keyring.reencrypt",
            "keyring",
            keyring.active,
            details={"notice_endpoint": 1, "to_kid": keyring.active},
        )
