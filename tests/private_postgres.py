"""A PostgreSQL instance of a test's (or a benchmark's) own: ``initdb`` into a temporary
directory, started on a free loopback port, stopped and started at will, removed at the end.
Never the shared server: a test that stops or restarts PostgreSQL does it here.

Used through the ``private_postgres`` fixture (tests/conftest.py), which skips the test when
PostgreSQL's programs are not installed, and directly by ``benchmarks/chaos.py``. Imports
nothing from pytest, so a script can use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


class PostgresMissing(RuntimeError):
    """PostgreSQL's programs are not installed (or cannot run here): no private instance."""


def pg_bin(name: str) -> str:
    """The path of one of PostgreSQL's programs (``initdb``, ``pg_ctl`` …)."""
    found = shutil.which(name) or (str(_BIN / name) if _BIN and (_BIN / name).exists() else None)
    if found is None:
        raise PostgresMissing(f"PostgreSQL's {name} is not installed")
    return found


def as_postgres(command: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as the postgres user."""
    if os.geteuid() != 0:
        return command
    if shutil.which("runuser") is None:
        raise PostgresMissing("running as root without runuser: cannot start a private PostgreSQL")
    return ["runuser", "-u", "postgres", "--", *command]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivatePostgres:
    """A PostgreSQL instance of this test's own; ``stop``, ``start`` and ``restart`` it at will.
    It has a database ``keyshift`` (``url``); ``create_database`` makes more."""

    data: Path
    port: int

    def url_of(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.url_of("keyshift")

    def _ctl(self, *args: str) -> None:
        command = [pg_bin("pg_ctl"), "-D", str(self.data), *args]
        subprocess.run(as_postgres(command), check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-o", options, "-l", str(self.data / "server.log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop: ``fast`` (sessions are ended, then a clean shutdown) or ``immediate`` (as a
        crash: no shutdown checkpoint, recovery at the next start)."""
        self._ctl("-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def create_database(self, name: str) -> str:
        """Create database ``name`` (C collation: the state checksum's order); its URL."""
        subprocess.run(
            as_postgres(
                [
                    pg_bin("createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "--template",
                    "template0",
                    "--locale",
                    "C",
                    "--encoding",
                    "UTF8",
                    name,
                ]
            ),
            check=True,
            capture_output=True,
            timeout=60,
        )
        return self.url_of(name)


@contextlib.contextmanager
def private_postgres(*, settings: dict[str, str] | None = None) -> Iterator[PrivatePostgres]:
    """initdb into a new temporary directory, start it on a free port with a database
    ``keyshift``, and yield it; at the end stop it (immediately) and remove the directory.
    ``settings`` are added to its postgresql.conf. Raises ``PostgresMissing`` when PostgreSQL
    is not installed."""
    # Not under pytest's tmp_path: as root that is 0700, and the postgres user must get in.
    root = Path(tempfile.mkdtemp(prefix="keyshift-private-pg-"))
    data = root / "data"
    try:
        initdb = pg_bin("initdb")
        command = as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth=trust"])
        data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
            shutil.chown(data, "postgres")
        subprocess.run(
            [*command, "-E", "UTF8", "--locale=C"], check=True, capture_output=True, timeout=120
        )
        if settings:
            with (data / "postgresql.conf").open("a") as conf:
                conf.writelines(f"{name} = '{value}'\n" for name, value in settings.items())
        instance = PrivatePostgres(data, _free_port())
        instance.start()
        try:
            instance.create_database("keyshift")
            yield instance
        finally:
            subprocess.run(
                as_postgres([pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                capture_output=True,
                timeout=60,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
