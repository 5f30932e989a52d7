"""Fixtures every test shares, and the pytest hooks: both databases (a real SQLite file and a
real PostgreSQL), the secrets, the app, a live server process. Helpers (functions, classes,
constants) live in ``tests/support.py``; this file holds only fixtures and hooks.

Storage tests take the ``db`` fixture and so run once per backend (``[sqlite]``/``[postgres]``).
PostgreSQL comes from ``KEYSHIFT_TEST_PG_URL`` (default: 127.0.0.1:5432, user postgres); a
fresh database is created for the session (for each xdist worker) and dropped after. Under
``CI=true`` an unreachable PostgreSQL fails the run, and a run in which no PostgreSQL test
passed fails too.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from keyshift.api.app import create_app
from keyshift.api.state import AppState
from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.db.migrate import upgrade_to_head
from keyshift.security.secrets_store import Secrets, ensure_secrets
from tests.private_postgres import PostgresMissing, PrivatePostgres
from tests.private_postgres import private_postgres as _private
from tests.support import (
    IN_CI,
    LiveServer,
    cli_env,
    create_pg_database,
    drop_pg_database,
    mint_token,
    reset,
    serving,
)

BACKENDS = ["sqlite", "postgres"]

_postgres_ran = 0
_postgres_passed = 0


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Under xdist the controller gets every worker's reports through this hook too.
    global _postgres_ran, _postgres_passed
    if "postgres" not in report.nodeid:
        return
    _postgres_ran += 1
    if report.when == "call" and report.passed:
        _postgres_passed += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker sees only its share; the controller decides for the run
    # The xdist controller collects nothing itself: the reports say which tests ran.
    collected_pg = _postgres_ran > 0 or any(
        "postgres" in item.nodeid for item in getattr(session, "items", [])
    )
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


@pytest.fixture(scope="session", params=BACKENDS)
async def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Database]:
    """One migrated database per backend for the whole session."""
    pg_name = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite') / 'keyshift.db'}"
    else:
        pg_name, url = await create_pg_database()
    db = Database(url)
    await upgrade_to_head(db.engine)
    yield db
    await db.dispose()
    if pg_name:
        await drop_pg_database(pg_name)


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


@pytest.fixture
async def admin_headers(db: Database) -> dict[str, str]:
    return {"Authorization": f"Bearer {await mint_token(db, 'admin')}"}


@pytest.fixture
def live_server(
    settings: Settings, secrets: Secrets, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[LiveServer]:
    """`keyshift serve` as a real process on a loopback port, on this test's database
    (``@pytest.mark.server_env(NAME="value")`` adds to its environment)."""
    env = cli_env(settings)
    marker = request.node.get_closest_marker("server_env")
    if marker is not None:
        env.update({k: str(v) for k, v in marker.kwargs.items()})
    with serving(env, tmp_path / "serve.log") as server:
        yield server


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL instance of this test's own (``tests/private_postgres.py``): initdb in a
    temporary directory, its own port, a database ``keyshift``; stop, start or restart it at
    will. Skips the test when PostgreSQL's programs are not installed."""
    try:
        with _private() as instance:
            yield instance
    except PostgresMissing as missing:  # raised only while starting it
        pytest.skip(str(missing))
