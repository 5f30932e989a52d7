"""Rules files → ``MigrationRules``, with every problem as ``file:line: field: reason``."""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from pathlib import Path

from pydantic import ValidationError

from keyshift.catalog.loader import MAX_FILE_BYTES, Problem, locate, schema_problem
from keyshift.migration.errors import RulesInvalid
from keyshift.migration.rules import MigrationRules, RuleProblem

_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)$")


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
        raise RulesInvalid([Problem(name, "", f"cannot read: {exc.strerror or exc}")]) from exc
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
        raise RulesInvalid([Problem(name, "", f"not UTF-8 text (byte {exc.start})", line)]) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python < 3.14 has no ``lineno``: the position is only in the message's tail.
        message = str(exc)
        position = _TOML_POSITION.search(message)
        at_line: int | None = getattr(exc, "lineno", None)
        if at_line is None and position:
            at_line = int(position.group(1))
        reason = message[: position.start()].rstrip() if position else message
        raise RulesInvalid([Problem(name, "", f"TOML syntax: {reason}", at_line)]) from exc
    except RecursionError as exc:
        raise RulesInvalid([Problem(name, "", "TOML syntax: nested too deeply")]) from exc
    if not isinstance(data.get("rules"), dict):
        raise RulesInvalid([Problem(name, "rules", "a rules file starts with a [rules] table")])
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
