"""Helpers tests share, imported as ``from tests.support import ...``: the test PostgreSQL
(``PG_ADMIN_URL``, ``IN_CI``, ``create_pg_database``/``drop_pg_database``), ``reset`` to empty
a database between tests, ``mint_token``, the live server (``serving``, ``LiveServer``,
``free_port``) and two ways to run the CLI (``cli_env``, ``run_keyshift``, ``invoke_keyshift``).

``tests/conftest.py`` holds only fixtures and pytest hooks; they import what they need from here.

PostgreSQL comes from ``KEYSHIFT_TEST_PG_URL`` (default: 127.0.0.1:5432, user postgres). Under
``CI=true`` an unreachable PostgreSQL fails the run instead of skipping its tests.

The CLI runs as a real process through ``run_keyshift`` and in this process through
``invoke_keyshift`` (the same Typer app and command path, without ~0.6 s of interpreter start
and imports per call). Each command group keeps tests that run it as a real process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets as pysecrets
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy import text

from keyshift.config import Settings
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.db.tables import Base
from keyshift.security import tokens

PG_ADMIN_URL = os.environ.get("KEYSHIFT_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


async def create_pg_database() -> tuple[str, str]:
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


async def drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def reset(db: Database) -> None:
    """Empty every table, restart its identity sequences and re-seed the audit head, so each
    test starts from nothing.

    On PostgreSQL only the tables holding rows are truncated: TRUNCATE costs a few ms per table
    even when the table is empty, and most tests touch a few tables. Every table is locked
    first, as the TRUNCATE of all of them did, so a straggling writer is waited for rather
    than missed. Sequences owned by the tables are restarted whether or not their table was
    truncated (a rolled-back insert moves a sequence too), as ``RESTART IDENTITY`` did."""
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    async with db.transaction() as session:
        if db.dialect == "postgresql":
            await session.execute(text(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE"))
            probe = " UNION ALL ".join(
                f"SELECT '{name}' WHERE EXISTS (SELECT 1 FROM {name})" for name in tables
            )
            holding_rows = [row[0] for row in await session.execute(text(probe))]
            if holding_rows:
                await session.execute(
                    text(f"TRUNCATE {', '.join(holding_rows)} RESTART IDENTITY CASCADE")
                )
            await session.execute(
                text(
                    "SELECT setval(s.seqrelid, s.seqstart, false) FROM pg_sequence s"
                    " JOIN pg_depend d ON d.classid = 'pg_class'::regclass"
                    " AND d.objid = s.seqrelid AND d.deptype IN ('a', 'i')"
                    " JOIN pg_class t ON t.oid = d.refobjid"
                    " WHERE t.relname = ANY(:tables)"
                    " AND t.relnamespace = to_regnamespace(current_schema())"
                ),
                {"tables": tables},
            )
        else:
            for name in tables:
                await session.execute(text(f"DELETE FROM {name}"))
        await session.execute(
            text("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, :h)"), {"h": "0" * 64}
        )


async def mint_token(db: Database, *scopes: str, name: str = "test") -> str:
    async with db.transaction() as session:
        issued = await tokens.create_token(session, SYSTEM, name=name, scopes=list(scopes))
    return issued.plaintext


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


@contextlib.contextmanager
def serving(env: dict[str, str], log_path: Path) -> Iterator[LiveServer]:
    """`keyshift serve` as a real process on a free loopback port with ``env``, its log (stderr)
    in ``log_path``; stopped when the block ends."""
    port = free_port()
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


#: What a real ``python -m keyshift.cli`` calls itself in usage messages.
_PROG_NAME = "python -m keyshift.cli"


def invoke_keyshift(
    env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `keyshift ARGS` in this process and return what `run_keyshift` would.

    The same Typer app as the real entry point, with exactly ``env`` as the environment and
    ``cwd`` as the working directory while it runs, in a thread of its own (a command's
    ``asyncio.run`` needs a thread with no running event loop; an async test's loop waits, as
    it waits for a subprocess). Like the interpreter, an exception no command handled prints a
    traceback on stderr and exits 1, and a warning logged with no handler configured goes to
    stderr. Tests that are about the process itself (start-up, signals, files it leaves) use
    `run_keyshift`. ``KEYSHIFT_TEST_CLI=process`` runs these calls as real processes too."""
    if os.environ.get("KEYSHIFT_TEST_CLI") == "process":
        return run_keyshift(env, *args, cwd=cwd, timeout=timeout)
    from typer.testing import CliRunner

    from keyshift.cli.main import app

    # CliRunner sets (None: unsets) these in os.environ for the call and restores them after.
    overrides: dict[str, str | None] = {key: None for key in os.environ if key not in env}
    overrides.update(env)
    outcome: dict[str, subprocess.CompletedProcess[str]] = {}
    failure: list[BaseException] = []

    def target() -> None:
        try:
            runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]
        except TypeError:  # newer runners always keep stderr apart
            runner = CliRunner()
        root = logging.getLogger()
        saved_handlers, saved_level = root.handlers[:], root.level
        # A process that configured no logging has no handlers: warnings reach stderr through
        # logging.lastResort. Here pytest's capture handlers would swallow them.
        root.handlers = []
        root.setLevel(logging.WARNING)
        try:
            with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
                result = runner.invoke(app, list(args), env=overrides, prog_name=_PROG_NAME)
            stderr = result.stderr
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                stderr += "".join(traceback.format_exception(result.exception))
            outcome["result"] = subprocess.CompletedProcess(
                [_PROG_NAME, *args], result.exit_code, result.stdout, stderr
            )
        except BaseException as exc:  # surfaced in the test's thread below
            failure.append(exc)
        finally:
            root.handlers = saved_handlers
            root.setLevel(saved_level)

    thread = threading.Thread(target=target, name=f"keyshift {' '.join(args)[:40]}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise subprocess.TimeoutExpired([_PROG_NAME, *args], timeout)
    if failure:
        raise failure[0]
    return outcome["result"]
