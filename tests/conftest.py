"""Fixtures every test shares: both databases (a real SQLite file and a real PostgreSQL),
the secrets, the app and a live server process.

Storage tests take the ``db`` fixture and so run once per backend (``[sqlite]``/``[postgres]``).
PostgreSQL comes from ``KEYSHIFT_TEST_PG_URL`` (default: 127.0.0.1:5432, user postgres); a
fresh database is created for the session and dropped after. Under ``CI=true`` an unreachable
PostgreSQL fails the run, and a run in which no PostgreSQL test passed fails too.
"""

from __future__ import annotations

import os
import secrets as pysecrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy import text

from keyshift.api.app import create_app
from keyshift.api.state import AppState
from keyshift.config import Settings
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.migrate import upgrade_to_head
from keyshift.db.tables import Base
from keyshift.security import tokens
from keyshift.security.secrets_store import Secrets, ensure_secrets

PG_ADMIN_URL = os.environ.get("KEYSHIFT_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BACKENDS = ["sqlite", "postgres"]

_postgres_passed = 0


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _postgres_passed
    if report.when == "call" and report.passed and "postgres" in report.nodeid:
        _postgres_passed += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    collected_pg = any("postgres" in item.nodeid for item in getattr(session, "items", []))
    if IN_CI and collected_pg and _postgres_passed == 0:
        sys.stderr.write("\nCI: no PostgreSQL test passed; failing the run.\n")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secrets")


@pytest.fixture(scope="session")
def secrets(secrets_dir: Path) -> Secrets:
    loaded, _ = ensure_secrets(secrets_dir)
    return loaded


async def _create_pg_database() -> tuple[str, str]:
    name = f"keyshift_test_{os.getpid()}_{pysecrets.token_hex(3)}"
    try:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL unreachable at {PG_ADMIN_URL}: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return name, f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)


async def _drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session", params=BACKENDS)
async def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Database]:
    """One migrated database per backend for the whole session."""
    pg_name = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite') / 'keyshift.db'}"
    else:
        pg_name, url = await _create_pg_database()
    db = Database(url)
    await upgrade_to_head(db.engine)
    yield db
    await db.dispose()
    if pg_name:
        await _drop_pg_database(pg_name)


async def reset(db: Database) -> None:
    """Empty every table and re-seed the audit head, so each test starts from nothing."""
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    async with db.transaction() as session:
        if db.dialect == "postgresql":
            await session.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for name in tables:
                await session.execute(text(f"DELETE FROM {name}"))
        await session.execute(
            text("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, :h)"), {"h": "0" * 64}
        )


@pytest.fixture
async def db(database: Database) -> Database:
    await reset(database)
    return database


@pytest.fixture
def settings(db: Database, secrets_dir: Path) -> Settings:
    return Settings(database_url=db.url, secrets_dir=secrets_dir)


@pytest.fixture
def app_state(settings: Settings, db: Database, secrets: Secrets) -> AppState:
    return AppState(settings=settings, db=db, secrets=secrets)


@pytest.fixture
async def client(app_state: AppState) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(state=app_state)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://keyshift.test") as c:
        yield c


async def mint_token(db: Database, *scopes: str, name: str = "test") -> str:
    async with db.transaction() as session:
        issued = await tokens.create_token(session, SYSTEM, name=name, scopes=list(scopes))
    return issued.plaintext


@pytest.fixture
async def admin_headers(db: Database) -> dict[str, str]:
    return {"Authorization": f"Bearer {await mint_token(db, 'admin')}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    base_url: str
    process: subprocess.Popen[bytes]
    env: dict[str, str]


def cli_env(settings: Settings) -> dict[str, str]:
    """The environment a `keyshift` subprocess needs to reach this test's database."""
    url = settings.database_url
    return {
        **os.environ,
        "KEYSHIFT_DATABASE_URL": url,
        "KEYSHIFT_SECRETS_DIR": str(settings.secrets_dir),
    }


@pytest.fixture
def live_server(settings: Settings, secrets: Secrets, tmp_path: Path) -> Iterator[LiveServer]:
    """`keyshift serve` as a real process on a loopback port, on this test's database."""
    port = free_port()
    env = cli_env(settings)
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "keyshift.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,  # an unread pipe would fill after a few hundred log lines and block it
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            err = log_path.read_text()
            pytest.fail(f"server did not start: {err[-2000:]}")
        time.sleep(0.1)
    try:
        yield LiveServer(base, process, env)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def run_keyshift(
    env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `keyshift ARGS` as a real process (``python -m keyshift.cli``), capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "keyshift.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
