"""`keyshift simulate`: synthetic accounts from a seed, and the state checksum over them.

Seeded data must be reproducible (the same seed and anchor give the same checksum, on either
database), realistic enough for the example rules to decide (eligible and not, over quota,
suspended), and real: its keys validate, and one-account migrations run on it."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.migrate import upgrade_to_head
from keyshift.db.tables import Activation, AuditEvent, DataObject, License, Subscription
from keyshift.errors import Conflict, InvalidInput
from keyshift.licensing.service import reveal_key
from keyshift.migration import repository
from keyshift.migration.executor import Executor, preview
from keyshift.migration.loader import load_rules
from keyshift.migration.rollback import rollback
from keyshift.migration.state import state_hash
from keyshift.security.keyring import Keyring
from keyshift.security.secrets_store import Secrets
from keyshift.simulation.checksum import state_checksum
from keyshift.simulation.seed import SeedSummary, seed
from keyshift.simulation.synthetic import synthetic_id
from keyshift.states import MigrationState
from keyshift.validation import service as validation
from keyshift.validation.decide import Code
from tests.support import create_pg_database, drop_pg_database, run_keyshift

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "examples" / "catalog"
PRO_RULES = ROOT / "examples" / "migrations" / "pro-2023-to-2025.toml"
#: Now, to the second: leases and expiries are set relative to the anchor.
AT = datetime.now(UTC).replace(microsecond=0)


async def _seed(db: Database, secrets: Secrets, n: int, seed_value: int) -> SeedSummary:
    return await seed(
        db,
        accounts=n,
        seed=seed_value,
        keyring=secrets.keyring,
        actor=SYSTEM,
        catalog_dir=CATALOG,
        at=AT,
        chunk=150,  # several chunks even for small seeds
    )


#: A fixed keyring and anchor: the key lookups (HMACs), and so the checksum, are fixed too.
PINNED_KEYRING = Keyring(active="k1", keys={"k1": b"k" * 32}, lookup_key=b"l" * 32)
PINNED_AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
#: The checksum of seed 77's first 300 accounts under them (with the example catalog). A change
#: to it means the same seed gives another dataset than it did: recorded checksums and
#: rehearsals stop matching. Change it only with the generator or the catalog, on purpose.
PINNED_CHECKSUM = "0abbb12e600a46ec8c02db6fa48ae21ed37eb29beb8f38d2e0e4ced2ab18e969"


async def _seed_pinned(db: Database, *, bulk: bool | None = None) -> SeedSummary:
    return await seed(
        db,
        accounts=300,
        seed=77,
        keyring=PINNED_KEYRING,
        actor=SYSTEM,
        catalog_dir=CATALOG,
        at=PINNED_AT,
        chunk=70,
        bulk=bulk,
    )


def _ids(seed_value: int, n: int) -> list[str]:
    return [synthetic_id(seed_value, "account", i) for i in range(n)]


async def test_same_seed_gives_the_same_checksum_and_another_seed_another(
    db: Database, secrets: Secrets
) -> None:
    first = await _seed(db, secrets, 400, seed_value=11)
    await _seed(db, secrets, 400, seed_value=12)
    assert first.rows["accounts"] == 400 and first.rows["licenses"] >= 400

    checksum_11 = await state_checksum(db, _ids(11, 400), at=AT)
    checksum_12 = await state_checksum(db, _ids(12, 400), at=AT)
    assert checksum_11 != checksum_12
    assert await state_checksum(db, at=AT) not in (checksum_11, checksum_12)

    with pytest.raises(Conflict):
        await _seed(db, secrets, 10, seed_value=11)

    from tests.support import reset

    await reset(db)
    await _seed(db, secrets, 400, seed_value=11)
    assert await state_checksum(db, at=AT) == checksum_11


async def test_a_seed_gives_the_dataset_it_always_gave(db: Database) -> None:
    await _seed_pinned(db)
    assert await state_checksum(db, at=PINNED_AT) == PINNED_CHECKSUM


#: Every index and constraint of the database, as PostgreSQL would make them again.
_SCHEMA = """
SELECT pg_get_indexdef(indexrelid) FROM pg_index
UNION ALL
SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
ORDER BY 1
"""


async def test_a_bulk_seed_rebuilds_every_index_and_foreign_key_it_lifted() -> None:
    import asyncpg

    pg_name, pg_url = await create_pg_database()
    admin = pg_url.replace("postgresql+asyncpg://", "postgresql://")
    try:
        db = Database(pg_url)
        try:
            await upgrade_to_head(db.engine)
            connection = await asyncpg.connect(admin)
            try:
                before = [row[0] for row in await connection.fetch(_SCHEMA)]
                await _seed_pinned(db, bulk=True)
                assert [row[0] for row in await connection.fetch(_SCHEMA)] == before
                # Enforced again: a dangling account and a duplicate key lookup are refused.
                with pytest.raises(asyncpg.ForeignKeyViolationError):
                    await connection.execute(
                        "INSERT INTO usage_counters (account_id, meter, period_start,"
                        " period_end, used, updated_at) VALUES ('nobody', 'm', now(), now(),"
                        " 0, now())"
                    )
                with pytest.raises(asyncpg.UniqueViolationError):
                    await connection.execute(
                        "INSERT INTO licenses SELECT 'another-id', account_id, key_lookup,"
                        " key_ciphertext, key_kid, key_hint, status, expires_at,"
                        " max_activations_override, overrides, version, created_at,"
                        " updated_at FROM licenses LIMIT 1"
                    )
                assert await state_checksum(db, at=PINNED_AT) == PINNED_CHECKSUM

                # A bulk seed that breaks a constraint fails when the index is built again,
                # and leaves the schema and the data as they were.
                await connection.execute(
                    "UPDATE accounts SET external_ref = 'sim-78-5' WHERE external_ref = 'sim-77-5'"
                )
                with pytest.raises(Exception, match="uq_accounts_external_ref"):
                    await seed(
                        db,
                        accounts=50,
                        seed=78,
                        keyring=PINNED_KEYRING,
                        actor=SYSTEM,
                        catalog_dir=CATALOG,
                        at=PINNED_AT,
                        bulk=True,
                    )
                assert [row[0] for row in await connection.fetch(_SCHEMA)] == before
                assert await connection.fetchval("SELECT count(*) FROM accounts") == 300
            finally:
                await connection.close()
        finally:
            await db.dispose()
    finally:
        await drop_pg_database(pg_name)


async def test_checksum_is_the_hash_of_the_ledger_snapshot_hashes(
    db: Database, secrets: Secrets
) -> None:
    await _seed(db, secrets, 120, seed_value=5)
    ids = sorted(_ids(5, 120))
    hashes = []
    async with db.transaction() as session:
        batch = await repository.read_states(session, ids, AT)
        for account_id, state in zip(ids, batch, strict=True):
            single = await repository.read_state(session, account_id, AT)
            assert single is not None and state == single
            hashes.append(state_hash(single))
    expected = hashlib.sha256("".join(hashes).encode()).hexdigest()
    assert await state_checksum(db, at=AT, chunk=7) == expected
    assert (
        await state_checksum(db, ids[:3], at=AT)
        == hashlib.sha256("".join(hashes[:3]).encode()).hexdigest()
    )


async def test_sqlite_and_postgresql_hold_the_same_state_for_the_same_seed(
    secrets: Secrets, tmp_path: Path
) -> None:
    pg_name, pg_url = await create_pg_database()
    checksums = []
    try:
        for url in (f"sqlite+aiosqlite:///{tmp_path / 'sim.db'}", pg_url):
            db = Database(url)
            try:
                await upgrade_to_head(db.engine)
                await _seed(db, secrets, 300, seed_value=21)
                checksums.append(await state_checksum(db, at=AT))
            finally:
                await db.dispose()
    finally:
        await drop_pg_database(pg_name)
    assert checksums[0] == checksums[1]


async def test_seeded_licenses_validate_through_the_validation_service(
    db: Database, secrets: Secrets
) -> None:
    await _seed(db, secrets, 300, seed_value=31)
    async with db.transaction() as session:
        rows = list(
            (
                await session.execute(
                    select(License, Activation.fingerprint)
                    .join(Subscription, Subscription.account_id == License.account_id)
                    .outerjoin(Activation, Activation.license_id == License.id)
                    .where(Subscription.plan_key.in_(["pro-seat", "team-seat", "enterprise-seat"]))
                    .order_by(License.id)
                )
            ).all()
        )
    expect = {"active": Code.VALID, "suspended": Code.SUSPENDED}
    sampled: dict[str, int] = {}
    for row, fingerprint in rows:
        key = reveal_key(secrets.keyring, row)
        if row.expires_at is not None and row.expires_at < AT:
            wanted = Code.EXPIRED
        elif row.status in expect and (fingerprint is not None or row.status != "active"):
            wanted = expect[row.status]
        else:
            continue
        if sampled.get(wanted, 0) >= 4:
            continue
        live = await _live(db, row.id, fingerprint)
        if wanted is Code.VALID and not live:
            continue  # a lapsed lease: the machine must check in first
        result = await validation.validate(
            db.transaction, secrets.keyring, secrets.signing, key=key, fingerprint=fingerprint
        )
        assert result.code is wanted, (row.status, row.expires_at, result.payload)
        sampled[wanted] = sampled.get(wanted, 0) + 1
    assert sampled.get(Code.VALID, 0) >= 4 and sampled.get(Code.SUSPENDED, 0) >= 1
    assert sampled.get(Code.EXPIRED, 0) >= 1


async def _live(db: Database, license_id: str, fingerprint: str | None) -> bool:
    if fingerprint is None:
        return False
    async with db.transaction() as session:
        lease = (
            await session.execute(
                select(Activation.lease_expires_at).where(
                    Activation.license_id == license_id, Activation.fingerprint == fingerprint
                )
            )
        ).scalar_one()
    return lease is None or lease > datetime.now(UTC)


async def test_the_spread_gives_the_example_rules_something_to_decide(
    db: Database, secrets: Secrets
) -> None:
    summary = await _seed(db, secrets, 600, seed_value=41)
    for tally in (
        "suspended_accounts",
        "suspended_licenses",
        "expired_licenses",
        "ineligible_accounts",
        "over_target_quota_accounts",
        "lapsed_leases",
    ):
        assert summary.tallies.get(tally, 0) > 0, tally
    sources = ("pro-seat@2023", "pro-seat@2025", "enterprise-seat@2025")
    assert sum(summary.plans[ref] for ref in sources) > summary.accounts / 2
    async with db.transaction() as session:
        assert (
            await session.scalar(
                select(func.count()).select_from(Activation).where(Activation.mode == "floating")
            )
        ) > 0
        events = await session.scalar(
            select(func.count()).where(AuditEvent.action == "simulation.seed")
        )
        assert events == 1

    # The real planner over the pro-2023 rules: eligible and not, storage over 250 GB (grace).
    rules, _ = load_rules(PRO_RULES)
    async with db.transaction() as session:
        pro_2023 = list(
            (
                await session.execute(
                    select(Subscription.account_id)
                    .where(Subscription.plan_key == "pro-seat", Subscription.plan_version == "2023")
                    .order_by(Subscription.account_id)
                    .limit(150)
                )
            ).scalars()
        )
        outcomes = {"eligible": 0, "ineligible": 0, "over_storage": 0}
        for account_id in pro_2023:
            plan, _ = await preview(session, rules, account_id, now=AT)
            outcomes["eligible" if plan.eligible else "ineligible"] += 1
            outcomes["over_storage"] += any(c.quota == "storage_gb" for c in plan.conflicts)
        # Seats over pro@2025's 10: the rules block them (seats = "keep").
        over_seats = list(
            (
                await session.execute(
                    select(DataObject.account_id)
                    .join(Subscription, Subscription.account_id == DataObject.account_id)
                    .where(DataObject.quota == "seats", Subscription.plan_version == "2023")
                    .where(Subscription.plan_key == "pro-seat")
                    .distinct()
                )
            ).scalars()
        )
        for account_id in over_seats:
            plan, _ = await preview(session, rules, account_id, now=AT)
            assert plan.blocked and any(c.quota == "seats" for c in plan.conflicts)
    assert all(count > 0 for count in outcomes.values()), outcomes
    assert outcomes["eligible"] > outcomes["ineligible"]
    assert over_seats


async def test_a_seeded_account_migrates_and_rolls_back_to_its_checksum(
    db: Database, secrets: Secrets
) -> None:
    await _seed(db, secrets, 200, seed_value=51)
    rules, _ = load_rules(PRO_RULES)
    async with db.transaction() as session:
        candidates = list(
            (
                await session.execute(
                    select(Subscription.account_id)
                    .where(Subscription.plan_key == "pro-seat", Subscription.plan_version == "2023")
                    .order_by(Subscription.account_id)
                )
            ).scalars()
        )
        account_id = None
        for candidate in candidates:
            plan, _ = await preview(session, rules, candidate, now=datetime.now(UTC))
            if plan.can_apply:
                account_id = candidate
                break
    assert account_id is not None
    before = await state_checksum(db, [account_id])
    everything = await state_checksum(db)

    executor = Executor(db, secrets.signing)
    migration = await executor.apply(SYSTEM, rules, account_id)
    assert migration.state == MigrationState.COMPLETED, migration.error
    assert hashlib.sha256(str(migration.snapshot_hash).encode()).hexdigest() == before
    assert await state_checksum(db, [account_id]) != before

    await rollback(executor, SYSTEM, migration.id)
    assert await state_checksum(db, [account_id]) == before
    assert await state_checksum(db) == everything


async def test_seed_refuses_a_count_out_of_range(db: Database, secrets: Secrets) -> None:
    for accounts in (0, 10_000_001):
        with pytest.raises(InvalidInput):
            await _seed(db, secrets, accounts, seed_value=1)


def test_the_cli_seeds_a_fresh_database_and_prints_its_checksum(
    secrets: Secrets, tmp_path: Path
) -> None:
    import asyncio
    import os

    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "KEYSHIFT_HOME": str(tmp_path / "home")}
    env["KEYSHIFT_SECRETS_DIR"] = str(tmp_path / "secrets")
    done = run_keyshift(
        env,
        "simulate", "seed", "--accounts", "60", "--seed", "3", "--database-url", url,
        "--at", f"{AT:%Y-%m-%dT%H:%M:%S}",
        cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "seeded 60 accounts (seed 3" in done.stdout
    printed = done.stdout.split("checksum sha256 ")[1].strip()

    async def checksum() -> str:
        db = Database(url)
        try:
            return await state_checksum(db, at=AT)
        finally:
            await db.dispose()

    assert printed == asyncio.run(checksum())

    for bad in (["--accounts", "0"], ["--accounts", "5", "--database-url", "mysql://h/d"]):
        failed = run_keyshift(env, "simulate", "seed", *bad, cwd=ROOT)
        assert failed.returncode == 2
        assert failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1


async def test_across_runs_the_checksum_ignores_when_and_by_which_migration_but_not_what(
    db: Database, secrets: Secrets
) -> None:
    """Migrated twice (rolled back between), an hour apart: the archive copies get other ids
    and the graces other ends, so the plain checksum differs; ``across_runs`` writes those
    relative to their migration and agrees. A real difference still shows in it."""
    await _seed(db, secrets, 400, seed_value=53)
    rules, _ = load_rules(PRO_RULES)
    graced = archiving = None
    async with db.transaction() as session:
        candidates = (
            await session.execute(
                select(Subscription.account_id)
                .where(Subscription.plan_key == "pro-seat", Subscription.plan_version == "2023")
                .order_by(Subscription.account_id)
            )
        ).scalars()
        for candidate in candidates:
            plan, _ = await preview(session, rules, candidate, now=datetime.now(UTC))
            if not plan.can_apply:
                continue
            if graced is None and plan.expected["subscription"]["overrides"].get("grace"):
                graced = candidate
            if archiving is None and plan.archive:
                archiving = candidate
    assert graced is not None and archiving is not None
    ids = [graced, archiving]

    async def both() -> tuple[str, str]:
        plain = await state_checksum(db, ids, at=AT)
        return plain, await state_checksum(db, ids, at=AT, across_runs=True)

    before = await both()
    assert before[0] == before[1]  # nothing migrated: nothing to write relative to a migration

    first = Executor(db, secrets.signing)
    migrations = [await first.apply(SYSTEM, rules, account_id) for account_id in ids]
    assert [m.state for m in migrations] == [MigrationState.COMPLETED] * 2
    once = await both()
    for migration in migrations:
        await rollback(first, SYSTEM, migration.id)
    assert await both() == before

    later = Executor(db, secrets.signing, clock=lambda: datetime.now(UTC) + timedelta(hours=1))
    migrations = [await later.apply(SYSTEM, rules, account_id) for account_id in ids]
    assert [m.state for m in migrations] == [MigrationState.COMPLETED] * 2
    twice = await both()
    assert twice[0] != once[0]
    assert twice[1] == once[1] != before[1]

    # What the migration made, not when: one unit more on the archive copy is a difference.
    async with db.transaction() as session:
        copy = (
            (
                await session.execute(
                    select(DataObject).where(
                        DataObject.account_id == archiving, DataObject.migration_id.is_not(None)
                    )
                )
            )
            .scalars()
            .first()
        )
        assert copy is not None
        copy.units += 1
    assert (await both())[1] != once[1]


def test_synthetic_ids_are_uuid5_over_seed_kind_and_indexes() -> None:
    import uuid

    from keyshift.simulation.synthetic import NAMESPACE

    for index in range(2_000):
        expected = uuid.uuid5(NAMESPACE, f"9:object:{index}:{index % 7}")
        assert synthetic_id(9, "object", index, index % 7) == str(expected)
    assert synthetic_id(9, "account", 4) == str(uuid.uuid5(NAMESPACE, "9:account:4"))
