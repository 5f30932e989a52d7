"""Notice templates: the variables each kind offers, the built-in texts, the check an upload
passes (an unknown variable is refused, named), and rendering. Pure: no database code.

Placeholders are ``string.Template``'s ``$name`` / ``${name}`` (``$$`` for a dollar sign):
no attribute access or formatting mini-language, so a template cannot reach into the
values it is given.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from keyshift.notices.errors import TemplateInvalid
from keyshift.notices.kinds import NoticeKind

K = NoticeKind

#: What every notice can say.
COMMON: frozenset[str] = frozenset(
    {"account_id", "account_name", "notice_id", "from_plan", "to_plan", "date"}
)
#: Each kind's variables: the common ones and its own.
VARIABLES: dict[NoticeKind, frozenset[str]] = {
    K.SCHEDULED: COMMON | {"changes", "run_id", "run_name"},
    K.STARTED: COMMON | {"migration_id", "run_id"},
    K.COMPLETED: COMMON | {"migration_id", "run_id", "snapshot_hash", "receipt_keyid"},
    K.ROLLED_BACK: COMMON | {"migration_id", "run_id", "reason"},
    K.GRACE_ENDING: COMMON | {"migration_id"},
}

MAX_SUBJECT = 500
MAX_BODY = 20_000


@dataclass(frozen=True)
class Text:
    subject: str
    body: str


DEFAULTS: dict[NoticeKind, Text] = {
    K.SCHEDULED: Text(
        "Your plan changes on $date",
        "On $date your account $account_name moves from $from_plan to $to_plan.\n"
        "What changes for you: $changes",
    ),
    K.STARTED: Text(
        "Your plan change has started",
        "We started moving $account_name from $from_plan to $to_plan ($date).",
    ),
    K.COMPLETED: Text(
        "Your plan change is complete",
        "$account_name moved from $from_plan to $to_plan on $date. The signed receipt is"
        " attached to this notice.",
    ),
    K.ROLLED_BACK: Text(
        "Your plan change was undone",
        "$account_name is back on $from_plan as of $date; nothing of the change to $to_plan"
        " remains. $reason",
    ),
    K.GRACE_ENDING: Text(
        "Your grace period ends on $date",
        "The grace period that kept the entitlements of your previous plan for $account_name"
        " on $to_plan ends on $date.",
    ),
}


def _problems(kind: NoticeKind, part: str, text: str) -> list[tuple[str, str, str | None]]:
    """(field, reason, variable) for each thing wrong with one part of a template."""
    out: list[tuple[str, str, str | None]] = []
    limit = MAX_SUBJECT if part == "subject" else MAX_BODY
    if not text.strip():
        out.append((part, f"the {part} is empty", None))
    if len(text) > limit:
        out.append((part, f"the {part} is {len(text)} characters; at most {limit}", None))
    controls = sorted({f"U+{ord(c):04X}" for c in text if ord(c) < 32 and c not in "\n\r\t"})
    if controls:
        out.append((part, f"the {part} contains control characters ({', '.join(controls)})", None))
    template = string.Template(text)
    for match in template.pattern.finditer(text):
        if match.group("invalid") is not None:
            start = match.start("invalid")
            line = text.count("\n", 0, start) + 1
            out.append(
                (
                    part,
                    f"malformed placeholder at line {line}: a $ must start $name, ${{name}} or $$",
                    None,
                )
            )
    allowed = VARIABLES[kind]
    for name in template.get_identifiers():
        if name not in allowed:
            out.append(
                (
                    part,
                    f"unknown variable ${name} in the {part}; a {kind} notice has: "
                    + ", ".join(sorted(allowed)),
                    name,
                )
            )
    return out


def check(kind: NoticeKind, subject: str, body: str) -> Text:
    """The template, or ``TemplateInvalid`` naming the first problem (its variable, if it is an
    unknown one) and listing them all."""
    problems = _problems(kind, "subject", subject) + _problems(kind, "body", body)
    if problems:
        part, reason, variable = problems[0]
        raise TemplateInvalid(
            reason,
            field=part,
            problems=[{"field": f, "reason": r} for f, r, _ in problems],
            **({"variable": variable} if variable else {}),
        )
    return Text(subject, body)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return "; ".join(_text(v) for v in value) or "nothing you use"
    return str(value)


def render(kind: NoticeKind, text: Text, values: Mapping[str, Any]) -> Text:
    """Fill a checked template; a variable without a value renders as the empty string."""
    filled = {name: _text(values.get(name)) for name in VARIABLES[kind]}
    return Text(
        string.Template(text.subject).safe_substitute(filled),
        string.Template(text.body).safe_substitute(filled),
    )
