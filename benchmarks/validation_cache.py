"""The validation cache during a benchmark (``validate.py``): its hit ratio from
``/metrics``, the warm-up that fills every worker's cache with every key, and keeping it warm
across measurements longer than an entry's TTL."""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
from harness import Bench, progress

_CACHE_SAMPLE = re.compile(
    r'^keyshift_validation_cache_total\{result="(hit|miss)"\} ([0-9.e+]+)$', re.MULTILINE
)


def cache_counts(bench: Bench) -> dict[str, float]:
    """The validation cache's hit and miss counters, summed over the workers (/metrics)."""
    assert bench.server is not None
    status, body = harness.http("GET", bench.server.port, "/metrics", timeout=10)
    counts = {"hit": 0.0, "miss": 0.0}
    if status == 200:
        for result, value in _CACHE_SAMPLE.findall(body.decode(errors="replace")):
            counts[result] += float(value)
    return counts


def hit_ratio(before: dict[str, float], after: dict[str, float]) -> float | None:
    hits, misses = after["hit"] - before["hit"], after["miss"] - before["miss"]
    return hits / (hits + misses) if hits + misses > 0 else None


@dataclass
class Warmth:
    """When the caches were last filled, and how long an entry lives (the listening TTL)."""

    ttl: float
    filled_at: float = 0.0
    rounds: list[dict[str, Any]] = field(default_factory=list)


def warm_up(
    bench: Bench, path: str, keys_file: Path, args: argparse.Namespace, warmth: Warmth
) -> None:
    """Validate every key, pass after pass over the list (each pass in a new random order),
    in rounds of 5 s of wrk on 64 connections, until the hit ratio over the latest full walk
    of the list reaches ``--warm-target``; then check with 3 s of the measurement's own load
    (random keys, new connections): each worker must hold (nearly) every key. (A worker that
    got none of a round's connections warms nothing in that round; every wrk run connects
    anew.) Bounded by ``--warm-max``."""
    keys = sum(1 for line in keys_file.read_text().splitlines() if line.strip())
    started = time.monotonic()
    walked_rounds: list[dict[str, Any]] = []

    def one_round(script: str, script_args: list[object], seconds: int, kind: str) -> dict:
        before = cache_counts(bench)
        harness.run_wrk(bench, script, script_args, connections=64, threads=1, duration=seconds)
        after = cache_counts(bench)
        ratio = hit_ratio(before, after)
        lookups = int(sum(after.values()) - sum(before.values()))
        warmth.rounds.append({"lookups": lookups, "hit_ratio": ratio, "kind": kind})
        shown = f"{ratio:.1%}" if ratio is not None else "n/a"
        progress(f"warm-up {kind}: {lookups:,} validations, cache hit ratio {shown}")
        return warmth.rounds[-1]

    while time.monotonic() - started < args.warm_max:
        walked_rounds.append(one_round("walk.lua", [path, keys_file], 5, "walk"))
        # Judge over the latest rounds that together walked the whole list at least once: a
        # round shorter than the list sees only part of it (the part walked most often).
        walked = recent_hits = 0.0
        for r in reversed(walked_rounds):
            walked += r["lookups"]
            recent_hits += r["lookups"] * (r["hit_ratio"] or 0.0)
            if walked >= keys:
                break
        if walked < keys or recent_hits / walked < args.warm_target:
            continue
        checked = one_round("random.lua", ["POST", path, keys_file], 3, "check (random keys)")
        if checked["hit_ratio"] is None or checked["hit_ratio"] >= args.warm_target:
            break
    # The first entries were stored when the warm-up began: they are the first to expire.
    warmth.filled_at = started


def keep_warm(
    bench: Bench, path: str, keys_file: Path | None, args: argparse.Namespace, warmth: Warmth
) -> None:
    """Entries live ``ttl`` from when they were stored and all were stored in the warm-up, so
    they would all expire together in the middle of a measurement (a stampede no deployment
    sees: there, keys come and go at different times). Before that moment, empty the caches
    (the NOTIFY the services send on a change) and fill them again."""
    if keys_file is None:
        return
    if time.monotonic() - warmth.filled_at + args.duration + 30 < warmth.ttl:
        return
    from keyshift.db.changes import CHANNEL

    progress("cache entries would expire during the next measurement: clearing, warming again")
    harness.pg(bench.plain_url, "SELECT pg_notify($1, 'clear')", CHANNEL)
    time.sleep(0.5)
    warm_up(bench, path, keys_file, args, warmth)
