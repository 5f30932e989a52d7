"""Rules files → ``MigrationRules``, with every problem as ``file:line: field: reason``."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

from pydantic import ValidationError

from keyshift.catalog.loader import (
    MAX_FILE_BYTES,
    Problem,
    locate,
    schema_problem,
    toml_syntax_problem,
)
from keyshift.migration.errors import RulesInvalid
from keyshift.migration.rules import MigrationRules, RuleProblem


def load_rules(path: str | Path) -> tuple[MigrationRules, str]:
    """Read and parse one rules file; returns the rules and the text (for line numbers)."""
    file = Path(path)
    name = str(file)
    try:
        if not file.is_file():
            raise RulesInvalid([Problem(name, "", "no such file")], source=name)
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            reason = f"file is {size} bytes; a rules file may be at most {MAX_FILE_BYTES}"
            raise RulesInvalid([Problem(name, "", reason)], source=name)
        raw = file.read_bytes()
    except OSError as exc:
        reason = f"cannot read: {exc.strerror or exc}"
        raise RulesInvalid([Problem(name, "", reason)], source=name) from exc
    return load_rules_text(name, raw)


def load_rules_text(name: str, raw: str | bytes) -> tuple[MigrationRules, str]:
    """Parse rules given as text (the API's form); ``name`` is what problems call the file."""
    data_bytes = raw.encode() if isinstance(raw, str) else raw
    if len(data_bytes) > MAX_FILE_BYTES:
        reason = f"rules are {len(data_bytes)} bytes; at most {MAX_FILE_BYTES}"
        raise RulesInvalid([Problem(name, "", reason)], source=name)
    try:
        text = data_bytes.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data_bytes[: exc.start].count(b"\n") + 1
        problem = Problem(name, "", f"not UTF-8 text (byte {exc.start})", line)
        raise RulesInvalid([problem], source=name) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesInvalid([toml_syntax_problem(name, text, exc)], source=name) from exc
    except RecursionError as exc:
        problem = Problem(name, "", "TOML syntax: nested too deeply")
        raise RulesInvalid([problem], source=name) from exc
    if not isinstance(data.get("rules"), dict):
        problem = Problem(name, "rules", "a rules file starts with a [rules] table")
        raise RulesInvalid([problem], source=name)
    try:
        rules = MigrationRules.model_validate(data)
    except ValidationError as exc:
        problems = [_rules_problem(schema_problem(name, text, data, err)) for err in exc.errors()]
        raise RulesInvalid(problems, source=name) from exc
    return rules, text


def _rules_problem(problem: Problem) -> Problem:
    """The shared catalog wording, pointed at the rules' own schema document."""
    reason = problem.reason.replace("docs/manifests.md", "docs/migration-rules.md")
    return replace(problem, reason=reason)


def catalog_problems(name: str, text: str, problems: list[RuleProblem]) -> list[Problem]:
    """Cross-check problems placed on their lines in the file."""
    out = []
    for problem in problems:
        path = tuple(int(p) if p.isdigit() else p for p in problem.field.split("."))
        out.append(Problem(name, problem.field, problem.reason, locate(text, path)))
    return out
