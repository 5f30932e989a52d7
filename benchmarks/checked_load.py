"""Open-loop load whose every answer is checked, for ``zero_downtime.py``: validations of
(license key, fingerprint) pairs and usage events with idempotency keys, sent at fixed rates
through ``loadgen.py``'s connection pool. Each answer's latency, from its scheduled time, is
filed under the phase it was scheduled in (before, during, after a run); failures are counted
by phase and kind; each validation's entitlements are logged per pair, each acknowledged
event per idempotency key, for ``tests/migration/no_downtime.py``'s checks."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import random
import sys
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Any

import loadgen
import orjson
from harness import HOST, ROOT

sys.path.insert(0, str(ROOT))  # the checks live with the tests: tests/migration/no_downtime.py

from tests.migration.no_downtime import AnswerLog, entitlements_digest

VALIDATE = "/v1/licenses/validate"
USAGE = "/v1/usage"
#: Throttled in pro@2023 (5,000/day) and pro@2025 (20,000/day): an implicit meter of both
#: plans (docs/usage.md), so events are accepted before, during and after each cutover.
METER = "api_access"
EVENT_PREFIX = "zd-"
#: An answer scheduled this long after the workers exited must be the new one.
SETTLE_SECONDS = 1.0
#: Attempts of a usage event (same idempotency key) after a 5xx or a lost connection.
USAGE_ATTEMPTS = 3
#: Seconds to wait, once the schedule stops, for the requests still queued or in flight (an
#: event in flight may be counted: its answer is needed to balance the counters).
DRAIN_SECONDS = 120.0


@dataclass(frozen=True)
class Pair:
    account_id: str
    key: str
    fingerprint: str


# -- the load ------------------------------------------------------------------------------------


class Phases:
    """Named spans of the run, each from its start to the next one's: a request belongs to
    the phase it was scheduled in."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.names: list[str] = []

    def begin(self, name: str, at: float | None = None) -> float:
        at = time.perf_counter() if at is None else at
        self.starts.append(at)
        self.names.append(name)
        return at

    def of(self, scheduled: float) -> str:
        return self.names[max(0, bisect.bisect_right(self.starts, scheduled) - 1)]

    def start(self, name: str) -> float:
        return self.starts[self.names.index(name)]


class Stream(loadgen.Pool):
    """A loadgen pool of one kind of request: each answer checked (``check``: the problem, or
    None), its latency from its scheduled time filed under its phase, failures counted per
    phase and kind."""

    def __init__(self, port: int, phases: Phases, rng: random.Random) -> None:
        super().__init__(HOST, port, [], loadgen.Stats(), measure_from=0.0)
        self.port, self.phases, self.rng = port, phases, rng
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.failures: Counter[tuple[str, str]] = Counter()
        self.quiet = asyncio.Event()  # set whenever nothing is waiting or in flight

    def check(self, tag: Any, status: int, body: bytes, phase: str, scheduled: float) -> str | None:
        raise NotImplementedError

    def retry(self, tag: Any) -> None:
        """A request whose outcome is unknown (lost connection): here, nothing."""

    def record_response(
        self, scheduled: float, status: int, body: bytes, tag: object = None
    ) -> None:
        phase = self.phases.of(scheduled)
        self.latencies[phase].append(time.perf_counter() - scheduled)
        try:
            problem = self.check(tag, status, body, phase, scheduled)
        except (ValueError, KeyError, TypeError) as exc:  # not the JSON it should be
            problem = f"HTTP {status}, unreadable answer: {exc}"
        if problem is not None:
            self.failures[(phase, problem)] += 1
        super().record_response(scheduled, status, body, tag)

    def record_error(self, conn: loadgen.Connection, exc: BaseException) -> None:
        scheduled, tag = conn.scheduled, conn.tag
        super().record_error(conn, exc)
        if scheduled is not None:
            self.failures[(self.phases.of(scheduled), f"connection: {type(exc).__name__}")] += 1
            self.retry(tag)

    def post(self, path: str, fields: dict[str, Any]) -> bytes:
        return loadgen.build_requests(HOST, self.port, "POST", path, [fields])[0]

    async def settle(self, seconds: float) -> None:
        """Wait (at most ``seconds``) until nothing is waiting or in flight."""
        if self.outstanding:
            self.quiet.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.quiet.wait(), timeout=seconds)

    def finish_one(self) -> None:
        super().finish_one()
        if self.outstanding == 0:
            self.quiet.set()


class Validations(Stream):
    """Validations of a random live pair; first, in the ``sweep`` phase, every pair once."""

    def __init__(self, port: int, phases: Phases, rng: random.Random, pairs: list[Pair]) -> None:
        super().__init__(port, phases, rng)
        self.pairs = pairs
        self.requests = [
            self.post(VALIDATE, {"key": p.key, "fingerprint": p.fingerprint}) for p in pairs
        ]
        self.sweep: deque[int] = deque()
        self.swept: dict[int, tuple[str, str]] = {}  # pair → (code, old digest)
        self.live: list[int] = []  # the pairs valid in the sweep
        self.log = AnswerLog[int]()
        self.settled: list[tuple[int, str]] = []  # (pair, digest) of answers after the run

    def next_request(self) -> tuple[bytes, object]:
        index = self.sweep.popleft() if self.sweep else self.rng.choice(self.live)
        return self.requests[index], index

    def check(self, tag: Any, status: int, body: bytes, phase: str, scheduled: float) -> str | None:
        if status != 200:
            return f"HTTP {status}"
        answer = orjson.loads(body)
        if phase == "sweep":
            self.swept[tag] = (answer["code"], entitlements_digest(answer["entitlements"]))
            return None
        if answer["code"] != "VALID":
            return f"code {answer['code']} (VALID before the run)"
        digest = self.log.record(tag, answer["entitlements"])
        if phase == "after" and scheduled >= self.phases.start("after") + SETTLE_SECONDS:
            self.settled.append((tag, digest))
        return None

    async def run_sweep(self) -> None:
        """Validate every pair once; the ``VALID`` ones become the live pairs."""
        self.phases.begin("sweep")
        self.sweep.extend(range(len(self.pairs)))
        now = time.perf_counter()
        for _ in range(len(self.pairs)):
            self.submit(now, now)
        await self.settle(600.0)
        self.live = [i for i, (code, _) in sorted(self.swept.items()) if code == "VALID"]


@dataclass
class Event:
    account_id: str
    key: str
    idempotency_key: str
    quantity: int
    attempt: int = 1


class UsageEvents(Stream):
    """Usage events of a random pool account, each with its own idempotency key, retried
    with the same key when its outcome is unknown."""

    def __init__(
        self, port: int, phases: Phases, rng: random.Random, accounts: list[tuple[str, str]]
    ) -> None:
        super().__init__(port, phases, rng)
        self.accounts = accounts  # (account id, a license key of it)
        self.sent = 0
        self.retries: deque[Event] = deque()
        self.acknowledged: dict[str, tuple[str, int]] = {}  # key → (account, units counted)
        self.given_up: list[Event] = []

    def next_request(self) -> tuple[bytes, object]:
        if self.retries:
            event = self.retries.popleft()
        else:
            account_id, key = self.rng.choice(self.accounts)
            self.sent += 1
            event = Event(account_id, key, f"{EVENT_PREFIX}{self.sent}", self.rng.randint(1, 3))
        fields = {
            "key": event.key,
            "meter": METER,
            "quantity": event.quantity,
            "idempotency_key": event.idempotency_key,
        }
        return self.post(USAGE, fields), event

    def retry(self, tag: Any) -> None:
        if tag.attempt < USAGE_ATTEMPTS:
            self.retries.append(dataclasses.replace(tag, attempt=tag.attempt + 1))
        else:
            self.given_up.append(tag)

    async def send_retries(self) -> None:
        """Once the schedule has stopped: send the retries still owed, until none is."""
        await self.settle(DRAIN_SECONDS)
        while self.retries:
            now = time.perf_counter()
            for _ in range(len(self.retries)):
                self.submit(now, now)
            await self.settle(DRAIN_SECONDS)

    def check(self, tag: Any, status: int, body: bytes, phase: str, scheduled: float) -> str | None:
        if status == 200:
            answer = orjson.loads(body)
            self.acknowledged[tag.idempotency_key] = (tag.account_id, int(answer["counted"]))
            return None
        code = error_code(body)
        if status >= 500 or code == "concurrent_request":
            self.retry(tag)  # the outcome is unknown, or the server asks for a retry
        return f"HTTP {status} {code or ''}".strip()


def error_code(body: bytes) -> str | None:
    """``error.code`` of an error answer, None if it has none (a proxy's or a crash's page)."""
    try:
        found = orjson.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return found if isinstance(found, str) else None


def latency(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)

    def ms(q: float) -> float | None:
        found = loadgen.percentile(ordered, q)
        return None if found is None else round(found * 1000, 2)

    return {
        "count": len(ordered),
        "p50_ms": ms(50),
        "p90_ms": ms(90),
        "p99_ms": ms(99),
        "max_ms": round(ordered[-1] * 1000, 2) if ordered else None,
    }
