"""TOML files → manifests. Every problem in every file is collected (file, field path, reason,
line when known) before anything is refused, so one run of `catalog validate` shows them all."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from keyshift.catalog.manifests import KEY_PATTERN, VERSION_PATTERN, Edition, Plan, manifest_kind
from keyshift.catalog.service import Manifest
from keyshift.errors import ManifestError

#: A manifest is a page of TOML; anything bigger is refused unread.
MAX_FILE_BYTES = 256 * 1024

_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)$")
_FRIENDLY_PATTERNS = {
    KEY_PATTERN: "must be 1-64 characters of a-z, 0-9, '-' or '_', starting with a letter",
    VERSION_PATTERN: "must be 1-32 characters of A-Z, a-z, 0-9, '.', '-' or '_'",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one manifest file; ``field`` is a dotted path (empty: the file)."""

    file: str
    field: str
    reason: str
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "field": self.field, "reason": self.reason, "line": self.line}

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


def load(path: str | Path) -> list[Manifest]:
    """Load a manifest file, or every ``*.toml`` under a directory (recursively, sorted by path).

    Raises ``ManifestError`` listing every problem found, including cross-file ones.
    """
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*.toml") if p.is_file())
        if not files:
            raise ManifestError([Problem(str(root), "", "no *.toml manifest files found here")])
    else:
        raise ManifestError([Problem(str(root), "", "no such file or directory")])

    def read(file: Path) -> bytes | Problem:
        try:
            size = file.stat().st_size
            if size > MAX_FILE_BYTES:
                return _too_big(str(file), size)
            return file.read_bytes()
        except OSError as exc:
            return Problem(str(file), "", f"cannot read: {exc.strerror or exc}")

    return _load_all((str(file), read(file)) for file in files)


def load_texts(files: Mapping[str, str | bytes]) -> list[Manifest]:
    """Load manifests given as ``{name: content}`` (the API's form), in name order."""
    return _load_all(
        (name, content.encode() if isinstance(content, str) else content)
        for name, content in sorted(files.items())
    )


def load_text(name: str, text: str | bytes) -> Manifest:
    """Load one manifest given as text; ``name`` is what problems call the file."""
    return load_texts({name: text})[0]


def _load_all(sources: Iterable[tuple[str, bytes | Problem]]) -> list[Manifest]:
    problems: list[Problem] = []
    manifests: list[Manifest] = []
    texts: dict[str, str] = {}
    for name, raw in sources:
        if isinstance(raw, Problem):
            problems.append(raw)
            continue
        parsed = _parse(name, raw)
        if isinstance(parsed, list):
            problems.extend(parsed)
            continue
        manifest, texts[name] = parsed
        manifests.append(manifest)
    problems.extend(_cross_file_problems(manifests, texts))
    if problems:
        raise ManifestError(problems)
    return manifests


def toml_syntax_problem(name: str, text: str, exc: tomllib.TOMLDecodeError) -> Problem:
    """A TOML syntax error on the line where the mistake is.

    tomllib reports an unclosed array where it gave up looking for the ``]``: at the next
    thing written, often on a later line. The mistake is at the end of what was written
    before it, so an error at the start of a line's content is placed on the last line before
    it that holds more than blanks or a comment."""
    message = str(exc)
    position = _TOML_POSITION.search(message)
    reason = message[: position.start()].rstrip() if position else message
    # Python 3.14 has ``lineno``/``colno``; before, the position is only in the message's tail.
    line: int | None = getattr(exc, "lineno", None)
    column: int | None = getattr(exc, "colno", None)
    if line is None and position:
        line, column = int(position.group(1)), int(position.group(2))
    if line is not None and column is not None and reason.startswith("Unclosed"):
        lines = text.split("\n")
        if not lines[line - 1][: column - 1].strip():
            for earlier in range(line - 1, 0, -1):
                content = lines[earlier - 1].strip()
                if content and not content.startswith("#"):
                    line = earlier
                    break
    return Problem(name, "", f"TOML syntax: {reason}", line)


def _too_big(name: str, size: int) -> Problem:
    return Problem(name, "", f"file is {size} bytes; a manifest may be at most {MAX_FILE_BYTES}")


def _parse(name: str, raw: bytes) -> tuple[Manifest, str] | list[Problem]:
    """One file: size, encoding, TOML syntax, kind, then the schema."""
    if len(raw) > MAX_FILE_BYTES:
        return [_too_big(name, len(raw))]
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        bad_line = raw[: exc.start].count(b"\n") + 1
        return [Problem(name, "", f"not UTF-8 text (byte {exc.start})", bad_line)]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [toml_syntax_problem(name, text, exc)]
    except RecursionError:
        return [Problem(name, "", "TOML syntax: nested too deeply")]

    kind = manifest_kind(data)
    if kind is None:
        reason = "neither an edition nor a plan: needs an [edition] or [plan] table"
        return [Problem(name, "", reason)]
    if "edition" in data and "plan" in data:
        reason = "a file declares one manifest: [edition] or [plan], not both"
        return [Problem(name, "plan", reason, _locate(text, ("plan",)))]
    model_type: type[Edition] | type[Plan] = Edition if kind == "edition" else Plan
    try:
        model = model_type.model_validate(data)
    except ValidationError as exc:
        return [_schema_problem(name, text, data, err) for err in exc.errors()]
    return Manifest(kind, model, source=name), text


def _schema_problem(name: str, text: str, data: dict[str, Any], err: Any) -> Problem:
    path = _data_path(data, tuple(err["loc"]), err["type"])
    reason = str(err["msg"])
    kind = err["type"]
    if kind == "extra_forbidden":
        reason = "unknown field (not part of the schema; see docs/manifests.md)"
    elif kind == "missing":
        reason = "required field is missing"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        discriminator = str(err.get("ctx", {}).get("discriminator", "")).strip("'")
        if discriminator:
            path = (*path, discriminator)
        expected = err.get("ctx", {}).get("expected_tags", "")
        reason = f"must be one of {expected}" if expected else reason
    elif kind == "string_pattern_mismatch":
        reason = _FRIENDLY_PATTERNS.get(str(err.get("ctx", {}).get("pattern")), reason)
    elif kind == "value_error":
        reason = reason.removeprefix("Value error, ")
    if kind == "string_pattern_mismatch" and err["loc"][-1] == "[key]":
        reason = f"name {reason}"
    return Problem(name, ".".join(str(p) for p in path), reason, _locate(text, path))


def _data_path(data: Any, loc: tuple[Any, ...], error_type: str) -> tuple[str | int, ...]:
    """Pydantic's ``loc`` with union branch tags (``seat``, ``table``, ``[key]``…) removed: only
    the parts that name something in the file, plus a missing field's own name."""
    path: list[str | int] = []
    node = data
    for index, part in enumerate(loc):
        is_last = index == len(loc) - 1
        in_table = isinstance(node, dict) and part in node
        in_array = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_table or in_array:
            path.append(part)
            node = node[part]
        elif is_last and error_type == "missing" and isinstance(node, dict):
            path.append(part)
    return tuple(path)


_TABLE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_\-\".' ]+?)\s*=")


def _split_key(key: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in key.split("."))


def _locate(text: str, path: tuple[str | int, ...]) -> int | None:
    """Best-effort line of ``path`` in the TOML text: the line that declares the longest prefix
    of it (a ``[table]`` header, an ``[[array]]`` entry or a ``key =``)."""
    if not path:
        return None
    wanted = tuple(str(p) for p in path)
    best: tuple[int, int] | None = None  # (matched length, line)
    table: tuple[str, ...] = ()
    array_counts: dict[tuple[str, ...], int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        header = _TABLE.match(line)
        if header:
            keys = _split_key(header.group(2))
            if header.group(1) == "[[":
                index = array_counts.get(keys, -1) + 1
                array_counts[keys] = index
                table = (*keys, str(index))
            else:
                table = keys
            declared = table
        else:
            assign = _ASSIGN.match(line)
            if not assign:
                continue
            declared = (*table, *_split_key(assign.group(1)))
        matched = 0
        for have, want in zip(declared, wanted, strict=False):
            if have != want:
                break
            matched += 1
        if matched == len(declared) and matched and (best is None or matched > best[0]):
            best = (matched, number)
    return best[1] if best else None


def _cross_file_problems(manifests: list[Manifest], texts: dict[str, str]) -> list[Problem]:
    """The same ``key@version`` declared twice (per kind)."""
    problems: list[Problem] = []
    first: dict[tuple[str, str], Manifest] = {}
    for manifest in manifests:
        seen = first.setdefault((manifest.kind, manifest.ref), manifest)
        if seen is manifest:
            continue
        field = f"{manifest.kind}.version"
        problems.append(
            Problem(
                manifest.source,
                field,
                f"{manifest.kind} {manifest.ref} is also declared in {seen.source}",
                _locate(texts[manifest.source], (manifest.kind, "version")),
            )
        )
    return problems


def missing_editions(manifests: Iterable[Manifest]) -> list[tuple[Manifest, str]]:
    """Plans whose edition is not among ``manifests``: publish needs it already published."""
    manifests = list(manifests)
    editions = {m.ref for m in manifests if m.kind == "edition"}
    return [
        (m, m.model.plan.edition)
        for m in manifests
        if isinstance(m.model, Plan) and m.model.plan.edition not in editions
    ]


#: Shared with other TOML manifests (migration rules) so they report problems the same way.
locate = _locate
schema_problem = _schema_problem
