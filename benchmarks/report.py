"""A benchmark's JSON record (``results/*.json``) as the Markdown of docs/benchmarks.md.

The scripts print it at the end of a run; to refresh the page from a recorded run:

    .venv/bin/python benchmarks/report.py benchmarks/results/validate-seat-<time>.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: A column: (header, key in the row, how: digits of a median (min–max), "%", or None as is).
Column = tuple[str, str, int | str | None]
CPU = "CPU cores: server / PostgreSQL / {} / other"

VALIDATE_CLOSED: list[Column] = [
    ("endpoint", "endpoint", None),
    ("connections", "connections", None),
    ("ok req/s", "rps", 0),
    ("p50 ms", "p50_ms", 2),
    ("p99 ms", "p99_ms", 2),
    ("non-2xx", "errors", None),
    (CPU.format("wrk"), "cpu_cores", "cpu"),
    ("cache hits", "cache_hit_ratio", "%"),
]
VALIDATE_OPEN: list[Column] = [
    ("endpoint", "endpoint", None),
    ("target req/s", "rate", None),
    ("achieved req/s", "achieved_rate", 0),
    ("p50 ms", "p50_ms", 2),
    ("p99 ms", "p99_ms", 2),
    ("non-200 + errors + dropped", "failed", None),
    ("generator lateness p99 ms", "generator_lateness_p99_ms", 2),
    (CPU.format("loadgen"), "cpu_cores", "cpu"),
    ("cache hits", "cache_hit_ratio", "%"),
]
INGEST: list[Column] = [
    ("scenario", "label", None),
    ("events / request", "events_per_request", None),
    ("connections", "connections", None),
    ("events/s", "events_per_s", 0),
    ("requests/s", "rps", 0),
    ("p50 ms", "p50_ms", 2),
    ("p99 ms", "p99_ms", 2),
    ("non-2xx", "errors", None),
    (CPU.format("wrk"), "cpu_cores", "cpu"),
    ("CPU ms per 1,000 events: server", "server_ms_per_1000", "median"),
    ("… PostgreSQL", "postgres_ms_per_1000", 0),
    ("checkpoints during", "checkpoints", None),
]
PGBENCH: list[Column] = [
    ("pgbench", "label", None),
    ("transactions/s", "tps", 0),
    ("rows/s", "rows_per_s", 0),
    ("latency avg ms", "latency_ms", 2),
    ("CPU cores: all busy / pgbench", "cpu_cores", "busy"),
]


def spread(
    summary: dict[str, Any] | None, digits: int = 0, scale: float = 1, unit: str = ""
) -> str:
    """``median (min–max)`` of a summary written by ``harness.spread``."""
    if summary is None:
        return "— (no response)"
    med, lo, hi = (f"{scale * summary[k]:,.{digits}f}{unit}" for k in ("median", "min", "max"))
    missing = summary.get("missing")
    return f"{med} ({lo}–{hi})" + (f" [{missing} run(s): no response]" if missing else "")


def cell(value: Any, how: int | str | None) -> str:
    if how == "cpu":
        return " / ".join(f"{value[k]:.2f}" for k in ("server", "postgres", "generator", "other"))
    if how == "busy":
        return f"{value['all']:.2f} / {value['generator']:.2f}"
    if how == "%":
        return spread(value, 1, 100, "%") if value else "—"
    if how == "median":
        return f"{value['median']:,.0f}"
    if isinstance(how, int):
        return spread(value, how) if isinstance(value, dict) else f"{value:,.{how}f}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(columns: Sequence[Column], rows: list[dict[str, Any]]) -> list[str]:
    """A GitHub table; the columns after the first are right-aligned, except the CPU ones."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |"]
    align = [
        "---" if i == 0 or how in ("cpu", "busy") else "---:"
        for i, (_, _, how) in enumerate(columns)
    ]
    lines.append("| " + " | ".join(align) + " |")
    for row in rows:
        lines.append("| " + " | ".join(cell(row[key], how) for _, key, how in columns) + " |")
    return lines


EXTRA = {"achieved_rate": "req/s achieved", "failed": "failed"}


def target_lines(targets: list[dict[str, Any]]) -> list[str]:
    lines = []
    for t in targets:
        value = t["value"]
        shown = (
            "no response"
            if value is None
            else {"ratio": f"{value:.1%}", "ms": f"{value:.2f} ms"}.get(
                t["unit"], f"{value:,.0f} {t['unit']}"
            )
        )
        extra = "".join(f", {t[k]:,.0f} {name}" for k, name in EXTRA.items() if k in t)
        extra += f", {t['scenario']}" if "scenario" in t else ""
        met = "**met**" if t["met"] else "**not met**"
        lines.append(f"- {t['target']}: {met} ({t['measure']} {shown}{extra}).")
    return lines


def heading(record: dict[str, Any]) -> list[str]:
    m = record["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    return [
        f"Measured {record['date'].replace('T', ' ')[:16]} UTC at commit {record['commit']}: "
        f"{m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, PostgreSQL {m['postgresql']}, {packages}; {m['wrk']}.",
        f"Command: `{record['command']}`. Source: {record['source']}.",
    ]


def render(record: dict[str, Any]) -> str:
    r = record["results"]
    lines = [*heading(record), ""]
    if record["benchmark"].startswith("validate"):
        lines += ["Throughput, closed loop (wrk):", "", *table(VALIDATE_CLOSED, r["closed_loop"])]
        lines += [""] + [
            f"- Ratio at {x['connections']} connections: **{x['ratio']:.1%}** "
            f"(per-repeat pairs {x['pairs_min']:.0%}–{x['pairs_max']:.0%})."
            for x in r["ratios"]
        ]
        lines += ["", "Latency at fixed rates, open loop (loadgen.py):", ""]
        lines += table(VALIDATE_OPEN, r["open_loop"])
        if pg := r.get("pgbench_select"):
            lines += ["", f"`{pg['command']}` on the same database: {spread(pg['tps'])} "
                      f"transactions/s, average latency {spread(pg['latency_ms'], 3)} ms."]  # fmt: skip
    else:
        lines += table(INGEST, r["scenarios"])
        s = r["stored"]
        lines += ["", f"- Stored after the run: {s['events']:,} events, quantities summing to "
                  f"{s['quantity']:,}, counters summing to {s['counters']:,} "
            + ("(equal: every accepted event counted once)." if s["quantity"] == s["counters"]
               else "(**not equal**).")]  # fmt: skip
        if r["pgbench"]:
            lines += ["", f"PostgreSQL alone, same database (`{r['pgbench_command']}`):", ""]
            lines += table(PGBENCH, r["pgbench"])
            lines += [""] + [
                f"- {x['scenario']}: events/s ÷ {x['ceiling']} = **{x['ratio']:.1%}** "
                f"(per round {x['rounds_min']:.1%}–{x['rounds_max']:.1%})."
                for x in r["ratios"]
            ]
    return "\n".join([*lines, "", *target_lines(r["targets"])]) + "\n"


def main(argv: list[str]) -> int:
    for name in argv:
        print(render(json.loads(Path(name).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
