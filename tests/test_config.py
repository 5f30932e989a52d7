"""Settings: every ``KEYSHIFT_*`` variable is a field of ``Settings``, read when a command or the
app starts (never at import, never elsewhere), and documented in the configuration tables."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from keyshift.config import Settings, env_name
from keyshift.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "keyshift"
DOCUMENTED_IN = [ROOT / "docs" / "operations.md", ROOT / "README.md"]

#: Every setting that holds a number, as the variable that sets it.
NUMERIC = sorted(
    env_name(name)
    for name, field in Settings.model_fields.items()
    if field.annotation in (int, float)
)

#: The only modules that touch ``os.environ``, and why.
ENVIRON_READERS = {
    # prometheus-client's own PROMETHEUS_MULTIPROC_DIR, read and set before workers start.
    "observability/metrics.py",
    # KEYSHIFT_FAULT_POINT: the crash tests' hook, not configuration (see config.py).
    "migration/batching.py",
    # OpenTelemetry's own OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT and OTEL_SDK_DISABLED: whether
    # to trace at all (the SDK reads the rest of its OTEL_* variables itself).
    "observability/tracing.py",
    # Writes the resolved database URL and secrets directory for the spawned workers.
    "cli/serve.py",
    # The same for a rehearsal's `keyshift worker` processes (its scratch database).
    "cli/simulate.py",
    # Drops an inherited PROMETHEUS_MULTIPROC_DIR before prometheus-client is imported: a
    # worker's samples stay in its own registry, out of the server's sums.
    "cli/worker.py",
    # The same for `keyshift notices deliver`, a process of its own with its own /metrics.
    "cli/notices.py",
}


def _table(path: Path) -> dict[str, str]:
    """The ``KEYSHIFT_*`` rows of the page's configuration table: variable → default cell."""
    rows = re.findall(r"^\| `(KEYSHIFT_[A-Z0-9_]+)` \| ([^|]*) \|", path.read_text(), re.M)
    return {name: default.strip() for name, default in rows}


@pytest.mark.parametrize("page", DOCUMENTED_IN, ids=lambda p: p.name)
def test_the_configuration_table_lists_exactly_the_settings(page: Path) -> None:
    documented = _table(page)
    variables = {env_name(name) for name in Settings.model_fields}
    assert sorted(variables - set(documented)) == [], f"not in {page.name}'s table"
    assert sorted(set(documented) - variables) == [], f"in {page.name}'s table, not in Settings"


@pytest.mark.parametrize("page", DOCUMENTED_IN, ids=lambda p: p.name)
def test_the_configuration_table_gives_the_numeric_defaults(page: Path) -> None:
    documented = _table(page)
    for name, field in Settings.model_fields.items():
        if env_name(name) in NUMERIC:
            cell = documented[env_name(name)]
            shown = re.match(r"`([^`]+)`", cell)
            assert shown and float(shown.group(1)) == field.default, (env_name(name), cell)


def test_no_module_reads_the_environment_but_settings() -> None:
    touching = set()
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")) or (
                isinstance(node, ast.ImportFrom)
                and node.module == "os"
                and any(alias.name in ("environ", "getenv") for alias in node.names)
            ):
                touching.add(str(path.relative_to(SRC)))
    assert sorted(touching - ENVIRON_READERS) == []


def test_importing_any_module_reads_no_setting() -> None:
    """Bad values everywhere, and every module still imports: nothing is read at import."""
    bad = dict.fromkeys(NUMERIC, "abc") | {"KEYSHIFT_LOG_LEVEL": "loud", "KEYSHIFT_DEBUG": "?"}
    script = (
        "import importlib, pkgutil, keyshift\n"
        "for info in pkgutil.walk_packages(keyshift.__path__, 'keyshift.'):\n"
        # __main__ runs the CLI; alembic's env.py runs migrations when imported.
        "    if not info.name.endswith('__main__') and '.alembic' not in info.name:\n"
        "        importlib.import_module(info.name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **bad},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_a_bad_number_is_one_error_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env()
    assert raised.value.field == name
    assert raised.value.message.startswith(f"{name}={value!r}: ")
    assert "\n" not in raised.value.message


def test_settings_come_from_their_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KEYSHIFT_HOME", str(tmp_path))
    monkeypatch.setenv("KEYSHIFT_VALIDATION_CACHE_TTL", "2.5")
    monkeypatch.setenv("KEYSHIFT_DB_READ_POOL_SIZE", "3")
    monkeypatch.setenv("KEYSHIFT_LOG_LEVEL", "debug")
    monkeypatch.setenv("KEYSHIFT_DEBUG", "1")
    monkeypatch.setenv("KEYSHIFT_USAGE_LATE_HOURS", "")  # empty: the default
    settings = Settings.from_env()
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path / 'keyshift.db'}"
    assert settings.secrets_dir == tmp_path / "secrets"
    assert settings.validation_cache_ttl == 2.5
    assert settings.db_read_pool_size == 3
    assert settings.log_level == "DEBUG"
    assert settings.debug is True
    assert settings.usage_late_hours == 48


def test_the_app_applies_the_cache_and_pool_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from keyshift.api.app import create_app
    from keyshift.security.secrets_store import ensure_secrets
    from keyshift.validation.cache import default_cache

    ensure_secrets(tmp_path / "secrets")
    monkeypatch.setenv("KEYSHIFT_HOME", str(tmp_path))
    monkeypatch.setenv("KEYSHIFT_VALIDATION_CACHE_TTL", "4")
    monkeypatch.setenv("KEYSHIFT_VALIDATION_CACHE_TTL_LISTENING", "40")
    monkeypatch.setenv("KEYSHIFT_VALIDATION_CACHE_SIZE", "400")
    monkeypatch.setenv("KEYSHIFT_DB_READ_POOL_SIZE", "4")
    saved = vars(default_cache).copy()
    try:
        app = create_app()
        assert app.state.keyshift.db.read_pool_size == 4
        assert (default_cache.ttl_seconds, default_cache.listening_ttl_seconds) == (4, 40)
        assert default_cache.max_entries == 400
    finally:
        vars(default_cache).update(saved)
