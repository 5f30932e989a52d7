"""The documents a migration writes per account (snapshot, plan, receipt, the ledger's and the
audit log's details) are compressed with lz4 on a PostgreSQL that has it (revision 0007): a
large value written after the upgrade is stored lz4-compressed, and reads back whole."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from keyshift.db.engine import Database


async def test_migration_documents_are_compressed_with_lz4(db: Database) -> None:
    if db.dialect != "postgresql":
        pytest.skip("column compression is PostgreSQL's")
    async with db.transaction() as session:
        methods = dict(
            (
                await session.execute(
                    text(
                        "SELECT c.relname || '.' || a.attname, a.attcompression::text"
                        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
                        " WHERE (c.relname, a.attname) IN (('migrations', 'snapshot'),"
                        " ('migrations', 'plan'), ('migrations', 'receipt'),"
                        " ('migration_ledger', 'details'), ('audit_events', 'details'))"
                    )
                )
            ).all()
        )
        assert methods == {
            "migrations.snapshot": "l",
            "migrations.plan": "l",
            "migrations.receipt": "l",
            "migration_ledger.details": "l",
            "audit_events.details": "l",
        }
        # A value large enough to be compressed, as a real plan is, in a scratch table of
        # the same column settings (no migration row needs to exist for this).
        await session.execute(
            text("CREATE TEMP TABLE probe (LIKE migrations INCLUDING COMPRESSION)")
        )
        document = '{"expected": "' + "abc" * 4000 + '"}'
        await session.execute(
            text(
                "INSERT INTO probe (id, account_id, state, rules_ref, rules_hash, target_ref,"
                " target_hash, created_by, created_at, updated_at, plan)"
                " VALUES ('m', 'a', 'locked', 'r', 'h', 't', 'th', 'x', now(), now(),"
                " CAST(:doc AS json))"
            ),
            {"doc": document},
        )
        stored = (
            await session.execute(text("SELECT pg_column_compression(plan), plan::text FROM probe"))
        ).one()
    assert stored[0] == "lz4"
    assert stored[1] == document
