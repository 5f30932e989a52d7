"""The schema Alembic builds (``upgrade head``) is exactly the one the models describe, on
both databases: a model changed without a migration, or a migration that drifts, fails here."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from keyshift.db.engine import Database
from keyshift.db.migrate import current_revision, head_revision
from keyshift.db.tables import Base


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": False}
    )
    return list(compare_metadata(context, Base.metadata))


async def test_migrations_build_exactly_the_models(db: Database) -> None:
    assert await current_revision(db.engine) == head_revision()
    async with db.engine.connect() as connection:
        differences = await connection.run_sync(_differences)
    assert differences == []


async def test_usage_tables_carry_account_id() -> None:
    """Citus-ready: every usage table can be distributed by account_id."""
    usage = [t for name, t in Base.metadata.tables.items() if name.startswith("usage_")]
    assert len(usage) == 4
    assert all(not t.c.account_id.nullable for t in usage)


async def test_usage_revision_downgrades_and_upgrades_cleanly(tmp_path: Any) -> None:
    from alembic import command

    from keyshift.db.migrate import alembic_config, upgrade_to_head

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'roundtrip.db'}")
    try:
        await upgrade_to_head(db.engine)

        def _down(connection: Connection) -> None:
            cfg = alembic_config()
            cfg.attributes["connection"] = connection
            command.downgrade(cfg, "0001")

        async with db.engine.begin() as connection:
            await connection.run_sync(_down)
        assert await current_revision(db.engine) == "0001"
        await upgrade_to_head(db.engine)
        async with db.engine.connect() as connection:
            assert await connection.run_sync(_differences) == []
    finally:
        await db.dispose()
