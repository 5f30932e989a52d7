"""The Prometheus alert rules (deploy/prometheus/keyshift-rules.yml): promtool accepts them and
rejects a broken copy, every alert has a unit test (promtool test rules) that sees it fire and
not fire, a changed threshold fails its test, the rules name only metrics keyshift exposes, and
docs/operations.md explains every alert and lists every metric.

promtool comes from Debian's ``prometheus`` package, which ``.ci/run`` installs: under CI a
missing promtool fails these tests; elsewhere they are skipped."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import IN_CI

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "keyshift-rules.yml"
UNIT_TESTS = sorted((RULES.parent / "tests").glob("*.yml"))
OPERATIONS = ROOT / "docs" / "operations.md"
README_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/pytest"
)


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is missing: install Debian's prometheus package (.ci/run does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)


def _rules() -> list[dict[str, object]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _alerts() -> list[str]:
    return [str(rule["alert"]) for rule in _rules() if "alert" in rule]


def test_promtool_accepts_the_rules_file(promtool: str) -> None:
    checked = _run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in checked.stdout


@pytest.mark.parametrize("unit_test", UNIT_TESTS, ids=lambda p: p.stem)
def test_the_alerts_unit_test_passes(unit_test: Path, promtool: str) -> None:
    tested = _run(promtool, "test", "rules", unit_test.name, cwd=unit_test.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_one_unit_test_that_sees_it_fire_and_not_fire() -> None:
    tested: dict[str, list[str]] = {}
    for unit_test in UNIT_TESTS:
        document = yaml.safe_load(unit_test.read_text())
        assert document["rule_files"] == ["../keyshift-rules.yml"], unit_test.name
        cases = [case for test in document["tests"] for case in test["alert_rule_test"]]
        names = {case["alertname"] for case in cases}
        assert len(names) == 1, f"{unit_test.name} tests {sorted(names)}: one alert per file"
        [name] = names
        tested.setdefault(name, []).append(unit_test.name)
        assert any(case["exp_alerts"] for case in cases), f"{unit_test.name}: never fires"
        assert any(not case["exp_alerts"] for case in cases), f"{unit_test.name}: always fires"
    assert sorted(tested) == sorted(_alerts())
    assert all(len(files) == 1 for files in tested.values()), tested


BROKEN = [
    # (what is wrong, the text replaced, its replacement, what promtool says)
    ("unbalanced PromQL", "> 5\n", "> 5)\n", "unexpected right parenthesis"),
    (
        "an unknown field",
        "        for: 1m\n",
        "        for: 1m\n        severity: page\n",
        "severity",
    ),
    ("a bad duration", "for: 10m", "for: ten minutes", "not a valid duration"),
    ("YAML that does not parse", "groups:\n", "groups:\n  - name: [\n", "yaml"),
]


@pytest.mark.parametrize(("what", "old", "new", "said"), BROKEN, ids=[b[0] for b in BROKEN])
def test_promtool_rejects_a_broken_copy_of_the_rules(
    what: str, old: str, new: str, said: str, promtool: str, tmp_path: Path
) -> None:
    text = RULES.read_text()
    assert old in text, what
    broken = tmp_path / "keyshift-rules.yml"
    broken.write_text(text.replace(old, new, 1))
    checked = _run(promtool, "check", "rules", str(broken))
    assert checked.returncode != 0, f"{what}: accepted\n{checked.stdout}"
    output = checked.stdout + checked.stderr
    assert str(broken) in output and said.lower() in output.lower(), output
    # The unit tests of a broken file fail too, not pass on an empty rule set.
    tests = tmp_path / "tests"
    shutil.copytree(RULES.parent / "tests", tests)
    tested = _run(promtool, "test", "rules", "database_unreachable.yml", cwd=tests)
    assert tested.returncode != 0, tested.stdout


def test_a_changed_threshold_fails_its_alerts_unit_test(promtool: str, tmp_path: Path) -> None:
    """The unit tests pin the thresholds: a rule that fires at 50 % instead of 5 % fails."""
    text = RULES.read_text()
    assert text.count(") > 0.05\n") == 1
    (tmp_path / "keyshift-rules.yml").write_text(text.replace(") > 0.05\n", ") > 0.5\n"))
    shutil.copytree(RULES.parent / "tests", tmp_path / "tests")
    tested = _run(promtool, "test", "rules", "run_failure_rate.yml", cwd=tmp_path / "tests")
    assert tested.returncode != 0, tested.stdout
    assert "KeyshiftRunFailureRateHigh" in tested.stdout + tested.stderr


def _exposed_names(exposition: str) -> set[str]:
    """Every sample name the families in ``exposition`` can have, samples or not."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
    }
    names = set()
    for family in text_string_to_metric_families(exposition):
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


async def test_rules_name_only_metrics_keyshift_exposes_and_the_docs_explain_them(
    client: httpx.AsyncClient,
) -> None:
    exposition = (await client.get("/metrics")).text
    exposed = _exposed_names(exposition)
    used = {
        name
        for rule in _rules()
        for name in re.findall(r"\b(keyshift_[a-z0-9_]+)", str(rule["expr"]))
    }
    assert used and used <= exposed, sorted(used - exposed)

    docs = OPERATIONS.read_text()
    for alert in _alerts():
        assert f"\n#### {alert}\n" in docs, f"docs/operations.md does not explain {alert}"
    families = {
        f.name + ("_total" if f.type == "counter" else "")
        for f in text_string_to_metric_families(exposition)
        # prometheus-client's ``X_created`` timestamps come as gauges of their own.
        if f.name.startswith("keyshift_") and not f.name.endswith("_created")
    }
    undocumented = sorted(name for name in families if f"| `{name}` |" not in docs)
    assert not undocumented, f"docs/operations.md's metrics table lacks {undocumented}"


def _ci_install_step() -> str:
    """The lines of .ci/run that install missing tools (from ``missing=()`` to its ``fi``)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    start = lines.index("missing=()")
    end = lines.index("fi", start)
    return "\n".join(lines[start : end + 1])


@pytest.mark.parametrize(
    ("ci", "uid", "has_promtool", "expected"),
    [
        ("true", "0", False, ["update", "install -y --no-install-recommends prometheus"]),
        ("true", "0", True, []),
        ("false", "0", False, []),
        ("true", "1000", False, []),
    ],
)
def test_ci_installs_promtool_only_as_root_under_ci_when_missing(
    ci: str, uid: str, has_promtool: bool, expected: list[str], tmp_path: Path
) -> None:
    """The install step run with fake ``apt-get``, ``id`` and (maybe) ``promtool`` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-calls"
    fakes = {"apt-get": f'echo "$*" >> {calls}', "id": f"echo {uid}"}
    if has_promtool:
        fakes["promtool"] = "exit 0"
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script = f"set -euo pipefail\nCI={ci}\n{_ci_install_step()}\n"
    bash = shutil.which("bash")
    assert bash is not None
    ran = subprocess.run(
        [bash, "-c", script],
        env={"PATH": str(bin_dir)},  # the real promtool, if any, is not on it
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ran.returncode == 0, ran.stderr
    assert (calls.read_text().splitlines() if calls.exists() else []) == expected


def test_ci_still_runs_exactly_the_readme_command() -> None:
    assert README_COMMAND in (ROOT / "README.md").read_text()
    assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == README_COMMAND
    assert _run("bash", "-n", str(ROOT / ".ci" / "run")).returncode == 0
