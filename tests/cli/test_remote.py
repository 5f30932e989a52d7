"""The remote CLI: each command group run twice — on the local database, and through a real
`keyshift serve` process on a loopback port (``--server`` / ``KEYSHIFT_SERVER`` with
``KEYSHIFT_TOKEN``) — on both databases. Reads of the same data must print the same bytes;
a scenario that changes things is played once each way on twin data, and the two transcripts
(stdout and exit code of every step) must be equal once the ids, instants, hashes and the
actor (``cli:user@host`` here, the token there) are named by their first appearance.
Then what only the remote path has: a server that is down or answers 503, a bad token, a
token without the scope, plain http to another host, a token never printed."""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from keyshift.cli import runs as runs_cli
from keyshift.config import Settings
from keyshift.db.engine import Database
from keyshift.migration.executor import Executor
from keyshift.security.secrets_store import Secrets
from tests.migration import helpers
from tests.runs.helpers import cohort, drive, run_row
from tests.support import (
    LiveServer,
    cli_env,
    free_port,
    invoke_keyshift,
    mint_token,
    run_keyshift,
    serving,
)

pytestmark = pytest.mark.server

Step = tuple[int, str]  # exit code, stdout

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HASH = re.compile(r"\b[0-9a-f]{64}\b")
_INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)")
_ACTOR = re.compile(r"(?:cli:[^\"\s]+@[^\"\s]+|token:[0-9a-f-]+)")
#: What depends on the clock of the moment (a rate over the last minute, an ETA).
_NOW = re.compile(r'("server_time": )"[^"]*"')
_KEY = re.compile(r"\b[0-9A-Z]{5}(?:-[0-9A-Z]{5}){4}\b")
_HINT = re.compile(r'"key_hint": "[^"]*"')
_SIGNATURE = re.compile(r'"signature": "[^"]*"')
_RATE = re.compile(r"(\"?(?:rate|eta|eta_seconds)\"?:? |\d+/\d+ )[0-9.e+-]+(?:/s|s)?")


def normalised(steps: list[Step]) -> list[Step]:
    """The transcript with each id, hash, instant and actor named by its first appearance
    (ids differ between the twin data; the order they appear in must not)."""
    names: dict[str, str] = {}

    def name(kind: str) -> Callable[[re.Match[str]], str]:
        def named(match: re.Match[str]) -> str:
            key = f"{kind}:{match.group(0)}"
            return names.setdefault(key, f"<{kind}{sum(k.startswith(kind) for k in names)}>")

        return named

    out = []
    for code, text in steps:
        text = _ACTOR.sub("<actor>", text)
        text = _INSTANT.sub("<instant>", text)
        text = _KEY.sub(name("key"), text)
        text = _HINT.sub('"key_hint": <hint>', text)
        text = _SIGNATURE.sub('"signature": <signature>', text)
        text = _UUID.sub(name("id"), text)
        text = _HASH.sub(name("hash"), text)
        text = _RATE.sub(r"\1<n>", text)
        out.append((code, text))
    return out


def assert_same(here: list[Step], there: list[Step]) -> None:
    """Equal transcripts once normalised; a difference is shown as a diff of its step."""
    mine, theirs = normalised(here), normalised(there)
    assert len(mine) == len(theirs)
    for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        diff = "\n".join(difflib.unified_diff(a[1].splitlines(), b[1].splitlines(), lineterm=""))
        assert b == a, f"step {index}: exit {a[0]} here, {b[0]} there\n{diff}"


@pytest.fixture
async def remote(live_server: LiveServer, db: Database) -> dict[str, str]:
    """The environment of a CLI that acts through ``live_server`` with an admin token (and no
    database: the server's is the one it reaches)."""
    token = await mint_token(db, "admin", name="operator")
    env = {
        k: v
        for k, v in live_server.env.items()
        if k not in ("KEYSHIFT_DATABASE_URL", "KEYSHIFT_SECRETS_DIR")
    }
    return {**env, "KEYSHIFT_SERVER": live_server.base_url, "KEYSHIFT_TOKEN": token}


def keyshift(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = invoke_keyshift(env, *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def step(env: dict[str, str], *args: str) -> Step:
    result = keyshift(env, *args)
    return result.returncode, result.stdout


def same_read(local: dict[str, str], remote: dict[str, str], *args: str) -> str:
    """A read run both ways on the same data: the same exit code, stdout and stderr."""
    here, there = keyshift(local, *args), keyshift(remote, *args)
    mine, theirs = (
        _NOW.sub(r"\1<now>", _RATE.sub(r"\1<n>", out)) for out in (here.stdout, there.stdout)
    )
    differences = "\n".join(difflib.unified_diff(mine.splitlines(), theirs.splitlines()))
    assert (there.returncode, theirs) == (here.returncode, mine), (args, differences)
    assert _ACTOR.sub("<actor>", there.stderr) == _ACTOR.sub("<actor>", here.stderr), args
    return here.stdout


def _ids(tmp_path: Path, name: str, ids: list[str]) -> str:
    path = tmp_path / name
    path.write_text("\n".join(ids) + "\n")
    return str(path)


# -- runs ---------------------------------------------------------------------------------------


async def test_runs_print_the_same_locally_and_through_a_server(
    db: Database,
    secrets: Secrets,
    settings: Settings,
    remote: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    local = cli_env(settings)
    ids = await cohort(db, secrets, 4)
    rules = tmp_path / "rules.toml"
    rules.write_text(helpers.RULES)
    executor = Executor(db, secrets.signing)
    # Each step runs locally on the first twin and through the server on the second, in
    # lockstep (a report's estimate reads the runs completed before it).
    # (Sorted: what a report lists by id then appears in the order the cohort names them.)
    twins = [
        (local, _ids(tmp_path, "a.txt", sorted(ids[:2]))),
        (remote, _ids(tmp_path, "b.txt", sorted(ids[2:]))),
    ]
    transcripts: list[list[Step]] = [[], []]
    runs: list[str] = []
    for env, ids_file in twins:
        made = keyshift(env, "runs", "create", "--rules", str(rules), "--ids", ids_file, "--json")
        assert made.returncode == 0, made.stderr
        runs.append(json.loads(made.stdout)["id"])
        transcripts[len(runs) - 1].append((made.returncode, made.stdout))

    def each(*args: str) -> None:
        for index, (env, _) in enumerate(twins):
            transcripts[index].append(step(env, *(runs[index] if a == "RUN" else a for a in args)))

    async def work() -> None:  # the server's workers, as it were
        for run_id in runs:
            await drive(executor, run_id)

    each("runs", "report", "RUN")
    each("runs", "report", "RUN", "--json")
    each("runs", "start", "RUN")  # not approved yet: 5
    each("runs", "approve", "RUN")
    each("runs", "start", "RUN")
    each("runs", "pause", "RUN")
    each("runs", "resume", "RUN")
    await work()
    each("runs", "status", "RUN")
    each("runs", "status", "RUN", "--json")
    each("runs", "accounts", "RUN", "--limit", "1")
    each("runs", "accounts", "RUN", "--state", "migrated")
    each("runs", "verify", "RUN", "--sample", "5")
    each("runs", "rollback", "RUN")
    await work()
    each("runs", "status", "RUN")
    each("runs", "status", "RUN", "--watch")  # stopped: one look, then its line
    each("runs", "finalize", "RUN")  # rolled back: nothing to finalize
    each("runs", "abort", "RUN")  # over: 5
    each("runs", "cutover", "RUN", "--at", "2030-01-01T00:00:00Z")  # not blue-green: 5
    each("runs", "pause", "no-such-run")
    here, there = transcripts
    assert here[3][0] == 5 and here[5] == (0, f"run {runs[0]} is running\n")  # it did run
    assert [code for code, _ in here[-4:]] == [5, 5, 5, 3]  # finalize, abort, cutover, no run
    assert_same(here, there)
    here_run, there_run = runs

    # Reads of the same data print the same bytes.
    for run_id in (here_run, there_run):
        same_read(local, remote, "runs", "status", run_id, "--json")
        same_read(local, remote, "runs", "accounts", run_id)
    # Page by page (of one account, here) the server gives every account, in cohort order.
    monkeypatch.setattr(runs_cli, "ACCOUNTS_PAGE", 1)
    for run_id in (here_run, there_run):
        assert len(same_read(local, remote, "runs", "accounts", run_id).splitlines()) == 2
    same_read(local, remote, "runs", "list")
    same_read(local, remote, "runs", "list", "--limit", "1")

    # Errors: the same one line and exit code (no run; an unknown state; an ids file naming
    # an account that does not exist, each on its line).
    same_read(local, remote, "runs", "approve", "nope")
    same_read(local, remote, "runs", "accounts", here_run, "--state", "bogus")
    ghost = _ids(tmp_path, "ghost.txt", [ids[0], "ghost"])
    failed = same_read(local, remote, "runs", "create", "--rules", str(rules), "--ids", ghost)
    assert failed == ""
    broken = tmp_path / "broken.toml"
    broken.write_text(helpers.RULES.replace('to = "new-seat@1"', 'to = "nowhere@9"'))
    same_read(local, remote, "runs", "create", "--rules", str(broken))
    same_read(local, remote, "rules", "validate", str(broken))
    same_read(local, remote, "rules", "validate", str(rules))


async def test_runs_wait_through_a_server_waits_for_its_workers(
    db: Database, secrets: Secrets, settings: Settings, remote: dict[str, str], tmp_path: Path
) -> None:
    await cohort(db, secrets, 2)
    rules = tmp_path / "rules.toml"
    rules.write_text(helpers.RULES)
    local = cli_env(settings)
    made = keyshift(local, "runs", "create", "--rules", str(rules), "--json")
    run_id = json.loads(made.stdout)["id"]
    assert keyshift(local, "runs", "report", run_id).returncode == 0
    assert keyshift(local, "runs", "approve", run_id).returncode == 0

    waiting = asyncio.create_task(
        asyncio.to_thread(invoke_keyshift, remote, "runs", "start", run_id, "--wait")
    )
    for _ in range(600):  # bounded: a minute for the CLI to start the run
        if (await run_row(db, run_id)).state == "running" or waiting.done():
            break
        await asyncio.sleep(0.1)
    assert not waiting.done(), waiting.result().stderr  # it waits while the run runs
    await drive(Executor(db, secrets.signing), run_id)  # the server's worker, as it were
    result = await asyncio.wait_for(waiting, 60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"run {run_id} is running\n"
        f"run {run_id} is completed (2 accounts done by the server's workers)\n"
    )
    assert "waiting for the server's workers" in result.stderr


class Twins:
    """One scenario played twice in lockstep: on the local database (first) and through the
    server (second), each on its own subjects (``subjects[i]`` replaces ``"@"`` in a step)."""

    def __init__(self, local: dict[str, str], remote: dict[str, str]) -> None:
        self.envs = (local, remote)
        self.transcripts: tuple[list[Step], list[Step]] = ([], [])
        self.subjects: dict[str, tuple[str, str]] = {}

    def each(self, *args: str) -> tuple[Step, Step]:
        for index, env in enumerate(self.envs):
            argv = [self.subjects[a][index] if a in self.subjects else a for a in args]
            self.transcripts[index].append(step(env, *argv))
        return self.transcripts[0][-1], self.transcripts[1][-1]

    def keep(self, name: str, pick: Callable[[str], str]) -> None:
        """Name a subject by what ``pick`` finds in each side's last stdout."""
        here, there = self.transcripts[0][-1][1], self.transcripts[1][-1][1]
        self.subjects[name] = (pick(here), pick(there))

    def check(self) -> None:
        """Each step's exit code, and its stdout as a multiset of lines once every id, key,
        hash and instant is anonymous: the twins' ids sort differently, and so do the lists
        a service orders by id (byte-exact equality is what the reads of the same data
        check, with ``same_read``)."""
        mine, theirs = (
            [(code, sorted(_anonymous(text).splitlines())) for code, text in t]
            for t in self.transcripts
        )
        for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            diff = "\n".join(difflib.unified_diff(a[1], b[1], lineterm=""))
            assert b == a, f"step {index}: exit {a[0]} here, {b[0]} there\n{diff}"


def _anonymous(text: str) -> str:
    text = _ACTOR.sub("<actor>", text)
    text = _INSTANT.sub("<instant>", text)
    text = _KEY.sub("<key>", text)
    text = _HINT.sub('"key_hint": <hint>', text)
    text = _SIGNATURE.sub('"signature": <signature>', text)
    text = _UUID.sub("<id>", text)
    return _HASH.sub("<hash>", text)


def _field(name: str) -> Callable[[str], str]:
    def pick(stdout: str) -> str:
        value = json.loads(stdout)
        return str((value[0] if isinstance(value, list) else value)[name])

    return pick


# -- migrate ------------------------------------------------------------------------------------


async def test_migrate_prints_the_same_locally_and_through_a_server(
    db: Database,
    secrets: Secrets,
    settings: Settings,
    remote: dict[str, str],
    tmp_path: Path,
) -> None:
    ids = sorted(await cohort(db, secrets, 2))
    rules = tmp_path / "rules.toml"
    rules.write_text(helpers.RULES)
    twins = Twins(cli_env(settings), remote)
    twins.subjects["ACCOUNT"] = (ids[0], ids[1])

    for account in ids:  # a plan reads: the same bytes for the same account
        plan = ["migrate", "plan", "--rules", str(rules), "--account", account]
        assert "steps:" in same_read(cli_env(settings), remote, *plan)
        same_read(cli_env(settings), remote, *plan, "--json")
    applied, _ = twins.each("migrate", "apply", "--rules", str(rules), "--account", "ACCOUNT")
    assert applied[0] == 0 and json.loads(applied[1])["state"] == "completed"
    twins.keep("MIGRATION", _field("id"))
    twins.each("migrate", "apply", "--rules", str(rules), "--account", "ACCOUNT")  # not eligible
    twins.each("migrate", "status", "MIGRATION")
    twins.each("migrate", "status", "--account", "ACCOUNT")
    twins.each("migrate", "approve", "MIGRATION")  # nothing held: 5
    twins.each("migrate", "cancel", "MIGRATION")  # completed: 5
    twins.each("migrate", "resume", "MIGRATION")
    twins.each("migrate", "rollback", "--account", "ACCOUNT")
    twins.each("migrate", "rollback", "MIGRATION")  # idempotent
    twins.each("migrate", "finalize", "MIGRATION")  # rolled back: 5
    twins.each("migrate", "run-due")
    twins.each("migrate", "status", "no-such-migration")
    twins.each("migrate", "status", "--account", "no-such-account")
    twins.each("migrate", "plan", "--rules", str(rules), "--account", "no-such-account")
    twins.check()
    codes = [code for code, _ in twins.transcripts[0]]
    assert codes == [0, 5, 0, 0, 5, 5, 0, 0, 0, 5, 0, 3, 3, 3], codes

    here, there = twins.subjects["MIGRATION"]
    same_read(cli_env(settings), remote, "migrate", "status", here)
    same_read(cli_env(settings), remote, "migrate", "status", there)

    # Rules the catalog refutes, or that do not parse: every problem on its line, exit 2,
    # nothing applied — the server's catalog checked through the same request.
    broken = tmp_path / "broken.toml"
    broken.write_text(helpers.RULES.replace('to = "new-seat@1"', 'to = "nowhere@9"'))
    garbled = tmp_path / "garbled.toml"
    garbled.write_text("[rules\n")
    for path in (broken, garbled):
        for verb in ("plan", "apply"):
            args = ["migrate", verb, "--rules", str(path), "--account", ids[0]]
            result = invoke_keyshift(remote, *args)
            assert result.returncode == 2 and f"{path}:" in result.stderr, result.stderr
            same_read(cli_env(settings), remote, *args)


# -- accounts, licenses, usage, audit -----------------------------------------------------------


#: The exit code of each step below, locally (the server's must be the same).
ACCOUNTS_LICENSES_USAGE_CODES = [
    *(0, 0, 0, 2, 2, 3, 0, 3),  # accounts
    *(0, 0, 0, 0, 5, 0, 0, 2, 0, 0, 0, 0, 5, 0, 0, 3, 2, 3),  # licenses
    *(0, 0, 0, 2, 2, 0, 2, 0, 0),  # usage, and a revocation
]


async def test_accounts_licenses_and_usage_print_the_same_locally_and_through_a_server(
    db: Database, secrets: Secrets, settings: Settings, remote: dict[str, str]
) -> None:
    await helpers.publish(db)
    local = cli_env(settings)
    twins = Twins(local, remote)
    twins.each("accounts", "create", "--name", "Twin Co", "--plan", helpers.OLD)
    twins.keep("ACCOUNT", _field("id"))
    twins.each("accounts", "show", "ACCOUNT")
    twins.each("accounts", "update", "ACCOUNT", "--name", "Twin Inc", "--attributes", '{"tier": 2}')
    twins.each("accounts", "update", "ACCOUNT", "--status", "dormant")  # 2, naming status
    twins.each("accounts", "update", "ACCOUNT", "--attributes", "[1,")  # not JSON: 2
    twins.each("accounts", "subscribe", "ACCOUNT", "nothing@1")  # 3
    twins.each("accounts", "subscribe", "ACCOUNT", helpers.NEW)
    twins.each("accounts", "show", "no-such-account")

    twins.each("licenses", "issue", "ACCOUNT", "--max-activations", "2")
    twins.keep("LICENSE", _field("id"))
    twins.keep("KEY", _field("key"))
    twins.each("licenses", "show", "LICENSE")
    twins.each("licenses", "list", "ACCOUNT")
    twins.each("licenses", "suspend", "LICENSE", "--reason", "unpaid")
    twins.each("licenses", "suspend", "LICENSE")  # already: 5
    twins.each("licenses", "reinstate", "LICENSE")
    twins.each("licenses", "renew", "LICENSE", "--until", "2031-01-01T00:00:00Z")
    twins.each("licenses", "renew", "LICENSE", "--until", "tomorrow")  # 2
    twins.each("licenses", "reveal", "LICENSE")
    twins.each("licenses", "activate", "KEY", "machine-1", "--label", "desk")
    twins.each("licenses", "activate", "KEY", "machine-1")  # held already: created false
    twins.each("licenses", "activate", "KEY", "machine-2")
    twins.keep("ACTIVATION", _field("id"))
    twins.each("licenses", "activate", "KEY", "machine-3")  # over the cap of 2: 5
    twins.each("licenses", "activations", "LICENSE")
    twins.each("licenses", "deactivate", "--key", "KEY", "--fingerprint", "machine-2")
    twins.each("licenses", "deactivate", "--id", "ACTIVATION")  # gone already: 3
    twins.each("licenses", "deactivate")  # neither: 2
    twins.each("licenses", "show", "no-such-license")

    record = ["usage", "record", "--meter", "exports", "--quantity", "3"]
    twins.each(*record, "--account", "ACCOUNT", "--idempotency-key", "k1")
    twins.each(*record, "--account", "ACCOUNT", "--idempotency-key", "k1")  # replayed
    twins.each(*record, "--key", "KEY", "--idempotency-key", "k2")
    twins.each(*record, "--account", "ACCOUNT", "--idempotency-key", "k3", "--timestamp", "now")
    twins.each(
        "usage", "record", "--meter", "nope", "--account", "ACCOUNT", "--idempotency-key", "k4"
    )
    twins.each("usage", "show", "ACCOUNT", "--history-limit", "5")
    twins.each("usage", "show", "ACCOUNT", "--period", "someday")
    twins.each("usage", "prune")
    twins.each("licenses", "revoke", "LICENSE")
    twins.check()
    codes = [code for code, _ in twins.transcripts[0]]
    assert codes == ACCOUNTS_LICENSES_USAGE_CODES, codes

    # Reads of the same data: the same bytes.
    for account in twins.subjects["ACCOUNT"]:
        same_read(local, remote, "accounts", "show", account)
        same_read(local, remote, "licenses", "list", account)
        same_read(local, remote, "usage", "show", account)
        same_read(local, remote, "audit", "list", "--account", account)
    same_read(local, remote, "accounts", "list")
    same_read(local, remote, "accounts", "list", "--limit", "1")
    same_read(local, remote, "accounts", "list", "--limit", "501")
    same_read(local, remote, "audit", "list", "--limit", "7", "--after", "3")
    same_read(local, remote, "audit", "verify")


def test_the_cli_page_bound_is_the_services() -> None:
    from keyshift.accounts import service
    from keyshift.cli import accounts

    assert accounts.MAX_PAGE == service.MAX_PAGE


# -- what only the remote path has ----------------------------------------------------------------


#: A token as keyshift makes them, which no server issued.
UNKNOWN_TOKEN = "kst_" + "x" * 43


def _without_database() -> dict[str, str]:
    """The environment of an operator's machine: no database, no secrets of its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KEYSHIFT_")}


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_a_server_that_cannot_be_reached_is_one_line_and_exit_6() -> None:
    port = free_port()  # nothing listens on it
    token = "kst_" + "s3cret" * 6
    env = {**_without_database(), "KEYSHIFT_SERVER": f"http://127.0.0.1:{port}/"}
    env["KEYSHIFT_TOKEN"] = token
    for args in (("runs", "list"), ("accounts", "show", "a1"), ("audit", "verify")):
        result = invoke_keyshift(env, *args)
        assert_one_line(result, 6, f"cannot reach the server at http://127.0.0.1:{port}:")
        assert token not in result.stdout + result.stderr
    # A real process, with tracebacks asked for: still the one line, still no token.
    real = run_keyshift({**env, "KEYSHIFT_DEBUG": "1"}, "migrate", "status", "m1")
    assert_one_line(real, 6, "ConnectError")
    assert token not in real.stdout + real.stderr


def test_a_server_whose_database_is_down_answers_503_and_the_cli_exits_6(
    settings: Settings, secrets: Secrets, tmp_path: Path
) -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/keyshift"
    env = {**cli_env(settings), "KEYSHIFT_DATABASE_URL": unreachable}
    with serving(env, tmp_path / "serve.log") as server:
        cli = {**_without_database(), "KEYSHIFT_SERVER": server.base_url}
        cli["KEYSHIFT_TOKEN"] = UNKNOWN_TOKEN
        line = assert_one_line(invoke_keyshift(cli, "runs", "list"), 6, server.base_url)
        assert "database" in line and "retry in " in line, line


async def test_a_bad_token_or_a_missing_scope_is_refused_with_exit_4(
    db: Database, live_server: LiveServer
) -> None:
    base = {**_without_database(), "KEYSHIFT_SERVER": live_server.base_url}
    line = assert_one_line(invoke_keyshift(base, "runs", "list"), 4, "missing bearer token")
    assert "KEYSHIFT_TOKEN" in line
    for token, why in ((UNKNOWN_TOKEN, "unknown"), ("not-a-token", "malformed")):
        result = invoke_keyshift({**base, "KEYSHIFT_TOKEN": token}, "audit", "verify")
        assert_one_line(result, 4, f"{why} bearer token", "KEYSHIFT_TOKEN")
        assert token not in result.stderr

    auditor = {**base, "KEYSHIFT_TOKEN": await mint_token(db, "audit:read")}
    assert_one_line(
        invoke_keyshift(auditor, "runs", "list"), 4, "'migrations:read' or 'migrations:run'"
    )
    assert_one_line(invoke_keyshift(auditor, "licenses", "reveal", "l1"), 4, "'licenses:write'")
    assert_one_line(invoke_keyshift(auditor, "usage", "prune"), 4, "'usage:write'")
    allowed = invoke_keyshift(auditor, "audit", "verify")
    assert allowed.returncode == 0 and allowed.stdout.startswith("checked "), allowed.stderr


def test_plain_http_to_another_host_is_refused_before_anything_is_sent() -> None:
    env = {**_without_database(), "KEYSHIFT_SERVER": "http://keyshift.example:8080"}
    env["KEYSHIFT_TOKEN"] = "ks_secret"
    result = invoke_keyshift(env, "runs", "list")
    assert_one_line(result, 6, "refusing to send the token to keyshift.example over plain http")
    assert "ks_secret" not in result.stderr
    for bad in ("ftp://keyshift.example", "keyshift.example", "http://"):
        assert_one_line(invoke_keyshift({**env, "KEYSHIFT_SERVER": bad}, "runs", "list"), 6, bad)


@pytest.mark.parametrize(
    ("server", "insecure", "allowed"),
    [
        ("https://keyshift.example", False, True),
        ("http://localhost:8080", False, True),
        ("http://127.0.0.7:8080/", False, True),
        ("http://[::1]:8080", False, True),
        ("http://10.0.0.5:8080", False, False),
        ("http://localhost.example", False, False),
        ("http://10.0.0.5:8080", True, True),
    ],
)
def test_the_target_allows_plain_http_only_to_loopback_unless_insecure(
    server: str, insecure: bool, allowed: bool
) -> None:
    from keyshift.cli.remote import target
    from keyshift.errors import ConfigurationError

    if allowed:
        checked = target(server, "ks_secret", insecure=insecure)
        assert checked.url == server.rstrip("/") and "ks_secret" not in repr(checked)
    else:
        with pytest.raises(ConfigurationError, match="plain http"):
            target(server, "ks_secret", insecure=insecure)


def test_the_server_flag_wins_and_insecure_lets_plain_http_through(
    live_server: LiveServer,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**_without_database(), "KEYSHIFT_SERVER": dead, "KEYSHIFT_TOKEN": UNKNOWN_TOKEN}
    # --server (before the command) wins over KEYSHIFT_SERVER: the live server answers (401).
    flagged = invoke_keyshift(env, "--server", live_server.base_url, "runs", "list")
    assert_one_line(flagged, 4, "unknown bearer token")
    insecure = invoke_keyshift(env, "--server", live_server.base_url, "--insecure", "runs", "list")
    assert_one_line(insecure, 4, "unknown bearer token")


def test_a_command_without_a_remote_form_refuses_rather_than_act_locally(
    settings: Settings, live_server: LiveServer
) -> None:
    env = {**cli_env(settings), "KEYSHIFT_SERVER": live_server.base_url}
    for args in (("tokens", "list"), ("catalog", "list")):
        result = invoke_keyshift(env, *args)
        assert_one_line(result, 2, f"`keyshift {args[0]}` works on a local database only")
        assert result.stdout == ""
    # Without the server the same command acts on the local database.
    assert invoke_keyshift(cli_env(settings), "tokens", "list").returncode == 0


@pytest.mark.parametrize(
    ("status", "body", "headers", "error", "code", "line"),
    [
        # keyshift's own answers: the class the local path raises, the server's words.
        (
            404,
            {"error": {"code": "run_not_found", "message": "no run r1", "field": "run_id"}},
            {},
            "NotFound",
            3,
            "error: no run r1 [run_id]",
        ),
        (
            409,
            {"error": {"code": "wrong_run_state", "message": "run r1 is completed"}},
            {},
            "Conflict",
            5,
            "error: run r1 is completed",
        ),
        (
            422,
            {
                "error": {
                    "code": "invalid_request",
                    "message": "query.limit: too big",
                    "field": "query.limit",
                }
            },
            {},
            "InvalidInput",
            2,
            "error: limit: too big [limit]",
        ),
        (
            403,
            {"error": {"code": "forbidden", "message": "this token lacks the 'audit:read' scope"}},
            {},
            "PermissionDenied",
            4,
            "error: this token lacks the 'audit:read' scope",
        ),
        (
            503,
            {"error": {"code": "database_unavailable", "message": "database unavailable"}},
            {"Retry-After": "3"},
            "Unavailable",
            6,
            "error: database unavailable (https://ks.example; retry in 3 s)",
        ),
        (
            422,
            {
                "error": {
                    "code": "invalid_cohort",
                    "message": "1 unknown account id",
                    "field": "cohort.ids",
                    "details": {"unknown": ["ghost"], "field": "shadowed", "retry_after": 9},
                }
            },
            {},
            "InvalidInput",
            2,
            "error: 1 unknown account id [cohort.ids]",
        ),
        # Not keyshift answering (a proxy's page): who answered, and what.
        (
            502,
            "<html>bad gateway</html>",
            {},
            "Unavailable",
            6,
            "error: https://ks.example answered 502 Bad Gateway (https://ks.example)",
        ),
        (
            500,
            {"error": {"code": "internal_error", "message": "internal server error"}},
            {"x-request-id": "r-1"},
            "KeyshiftError",
            1,
            "error: internal server error (https://ks.example, request id r-1)",
        ),
    ],
)
def test_an_error_answer_becomes_the_local_paths_error(
    status: int,
    body: object,
    headers: dict[str, str],
    error: str,
    code: int,
    line: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import httpx
    import typer

    from keyshift import errors
    from keyshift.cli.output import fail
    from keyshift.cli.remote import error_from

    if isinstance(body, str):
        response = httpx.Response(status, text=body, headers=headers)
    else:
        response = httpx.Response(status, json=body, headers=headers)
    mapped = error_from(response, "https://ks.example")
    assert type(mapped) is getattr(errors, error)
    with pytest.raises(typer.Exit) as exited:
        fail(mapped)
    assert exited.value.exit_code == code
    assert capsys.readouterr().err == line + "\n"


def test_a_rules_refusal_keeps_its_problems_on_their_lines() -> None:
    import httpx

    from keyshift.catalog.loader import Problem
    from keyshift.cli.remote import error_from
    from keyshift.migration.errors import RulesInvalid

    problem = {"file": "rules", "field": "rules.to", "reason": "no such plan", "line": 4}
    body = {
        "error": {
            "code": "invalid_rules",
            "message": "1 rules problem(s)",
            "field": "rules",
            "problems": [problem],
        }
    }
    mapped = error_from(httpx.Response(422, json=body), "https://ks.example")
    assert isinstance(mapped, RulesInvalid)
    assert mapped.problems == [Problem("rules", "rules.to", "no such plan", 4)]
