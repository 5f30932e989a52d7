"""An open-loop HTTP/1.1 load generator for loopback benchmarks.

Requests are *scheduled* at fixed intervals for the target rate, whatever the server is doing,
and each one's latency is measured from its scheduled send time, not from when a connection
became free to send it. A server that stalls therefore shows the queueing it caused (no
coordinated omission, the flaw of closed-loop tools such as wrk at a fixed rate).

A pool of keep-alive connections (no pipelining) takes the scheduled requests; a request whose
time has come while every connection is busy waits in a FIFO backlog, and that wait counts. The
generator reports, besides latencies, how late it *sent* requests ("send lag") and the CPU it
used: if the send lag is large while the server is idle, the generator is the bottleneck and the
run says so. "send lag" (scheduled time to write) includes waiting for a free connection;
"scheduler lag" (scheduled time to submission) is the generator's own lateness alone.

Loopback only: the host must be 127.0.0.1, ::1 or localhost. Every run is bounded by
``--duration`` plus a drain timeout, then the process exits.

    python benchmarks/loadgen.py --port 8080 --rate 2000 --duration 10 \
        --method POST --path /v1/licenses/validate --keys-file keys.txt

prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, cast

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
TICK = 0.001  # seconds: the scheduler's shortest sleep


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def read_keys(path: str) -> list[dict[str, str]]:
    """Request bodies from a keys file: ``KEY`` or ``KEY<TAB>FINGERPRINT`` per line."""
    bodies = []
    for line in Path(path).read_text().splitlines():
        key, _, fingerprint = line.strip().partition("\t")
        if key:
            bodies.append({"key": key, **({"fingerprint": fingerprint} if fingerprint else {})})
    return bodies


def build_requests(
    host: str, port: int, method: str, path: str, bodies: list[dict[str, str]] | None
) -> list[bytes]:
    """The raw request bytes to choose from: one per body for a POST, one for a GET."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if not bodies:
        return [(head + "\r\n").encode()]
    out = []
    for fields in bodies:
        body = json.dumps(fields, separators=(",", ":")).encode()
        out.append(
            (
                head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
    return out


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []  # seconds, from scheduled time to response end
        self.send_lag: list[float] = []  # seconds, from scheduled time to write
        self.submit_lag: list[float] = []  # seconds the scheduler itself was late
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.first_body: bytes | None = None
        self.last_done = 0.0


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time (callbacks, no task per
    request: the generator must stay cheap next to the server it measures)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.scheduled: float | None = None  # the in-flight request's scheduled time
        self.buffer = bytearray()
        self.body_start = -1
        self.length = 0
        self.status = 0
        self.tag: object = None  # what ``Pool.next_request`` said of the in-flight request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, scheduled: float) -> None:
        assert self.transport is not None
        self.scheduled = scheduled
        self.body_start = -1
        self.buffer.clear()
        self.pool.record_send(scheduled)
        request, self.tag = self.pool.next_request()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.body_start < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            try:
                self.status, self.length = parse_head(bytes(self.buffer[:end]))
            except ValueError as exc:
                self.fail(exc)
                return
            self.body_start = end + 4
        if len(self.buffer) - self.body_start < self.length:
            return
        scheduled, self.scheduled = self.scheduled, None
        body = bytes(self.buffer[self.body_start : self.body_start + self.length])
        if scheduled is not None:
            self.pool.record_response(scheduled, self.status, body, self.tag)
        self.pool.release(self)

    def fail(self, exc: Exception) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.pool.record_error(self, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self, exc)


def parse_head(head: bytes) -> tuple[int, int]:
    """(status, content length) of an HTTP/1.1 response head; chunked bodies are refused."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lowered = name.strip().lower()
        if lowered == b"content-length":
            length = int(value.strip())
        elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
            raise ValueError("chunked responses are not supported by this generator")
    return status, length


class Pool:
    """Scheduled requests go to an idle connection, or wait in a FIFO backlog for one.

    A subclass can choose each request (``next_request``, with a tag that comes back with its
    answer) and look at each answer (``record_response``, ``record_error``)."""

    def __init__(
        self, host: str, port: int, requests: list[bytes], stats: Stats, measure_from: float
    ) -> None:
        self.host, self.port = host, port
        self.requests = requests
        self.choice = random.Random().choice
        self.stats = stats
        self.measure_from = measure_from
        self.idle: deque[Connection] = deque()
        self.backlog: deque[float] = deque()
        self.outstanding = 0  # submitted and not yet answered or failed
        self.drained = asyncio.Event()
        self.closing = False
        self.reconnects: set[asyncio.Task[None]] = set()

    async def open(self, count: int) -> None:
        for _ in range(count):
            await self.connect()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(
                lambda: Connection(self), self.host, self.port
            )
        except OSError as exc:
            self.stats.errors[f"connect: {type(exc).__name__}"] += 1
            await asyncio.sleep(0.1)
            if not self.closing:
                self.reconnect()
            return
        self.release(protocol)

    def reconnect(self) -> None:
        task = asyncio.get_running_loop().create_task(self.connect())
        self.reconnects.add(task)
        task.add_done_callback(self.reconnects.discard)

    def next_request(self) -> tuple[bytes, object]:
        """The bytes of the next request to send, and a tag for its answer: here a random one
        of ``requests``, untagged."""
        return self.choice(self.requests), None

    def submit(self, scheduled: float, now: float) -> None:
        self.outstanding += 1
        if scheduled >= self.measure_from:
            self.stats.submit_lag.append(now - scheduled)
        if self.idle:
            self.idle.popleft().send(scheduled)
        else:
            self.backlog.append(scheduled)

    def release(self, conn: Connection) -> None:
        if self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)

    def record_send(self, scheduled: float) -> None:
        if scheduled >= self.measure_from:
            self.stats.send_lag.append(time.perf_counter() - scheduled)

    def record_response(
        self, scheduled: float, status: int, body: bytes, tag: object = None
    ) -> None:
        done = time.perf_counter()
        if scheduled >= self.measure_from:
            self.stats.latencies.append(done - scheduled)
            self.stats.statuses[status] += 1
            self.stats.last_done = done
            if self.stats.first_body is None:
                self.stats.first_body = body[:300]
        self.finish_one()

    def record_error(self, conn: Connection, exc: BaseException) -> None:
        scheduled, conn.scheduled = conn.scheduled, None
        if scheduled is None:
            return
        if scheduled >= self.measure_from:
            self.stats.errors[type(exc).__name__] += 1
        self.finish_one()

    def finish_one(self) -> None:
        self.outstanding -= 1
        if self.closing and self.outstanding == 0:
            self.drained.set()

    def lost(self, conn: Connection, exc: Exception | None) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if conn.scheduled is not None:
            self.record_error(conn, exc or ConnectionResetError("closed by the server"))
        if not self.closing:
            self.reconnect()

    async def drain(self, seconds: float) -> None:
        """Stop taking requests and wait (at most ``seconds``) for those in flight."""
        self.closing = True
        if self.outstanding:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), timeout=seconds)

    def close(self) -> None:
        self.closing = True
        for task in self.reconnects:
            task.cancel()
        while self.idle:
            conn = self.idle.popleft()
            if conn.transport is not None:
                conn.transport.close()


async def send_at_rate(
    pool: Pool, start: float, interval: float, total: int, stop: asyncio.Event | None = None
) -> int:
    """Submit request ``i`` at ``start + i * interval`` until ``total`` are submitted (or
    ``stop`` is set); returns how many were.

    Submits every request whose time has come, then sleeps until the next one, but at least
    TICK: the event loop's timers have millisecond resolution, and a shorter sleep spins,
    burning the CPU the server needs. Requests are thus sent in small bursts, up to about a
    tick late; that lateness is counted in their latency (conservative)."""
    i = 0
    while i < total and not (stop is not None and stop.is_set()):
        now = time.perf_counter()
        while i < total and start + i * interval <= now:
            pool.submit(start + i * interval, now)
            i += 1
        if i < total:
            await asyncio.sleep(max(TICK, start + i * interval - time.perf_counter()))
    return i


async def run(args: argparse.Namespace, requests: list[bytes]) -> dict[str, Any]:
    if args.host not in LOOPBACK:
        raise SystemExit(f"refusing to send load to {args.host}: loopback addresses only")
    stats = Stats()
    interval = 1.0 / args.rate
    total = int(args.rate * (args.warmup + args.duration))
    pool = Pool(args.host, args.port, requests, stats, measure_from=float("inf"))
    await pool.open(args.connections)
    start = time.perf_counter() + 0.05
    pool.measure_from = measure_from = start + args.warmup
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await send_at_rate(pool, start, interval, total)
    end_of_schedule = start + total * interval
    # Bounded drain: requests still waiting or in flight after the timeout count as dropped.
    await pool.drain(args.drain_timeout)
    finished = time.perf_counter()
    cpu = time.process_time() - cpu0
    dropped_backlog = len(pool.backlog)
    pool.backlog.clear()
    pool.close()
    scheduled_measured = total - int(args.rate * args.warmup)
    completed = len(stats.latencies)
    # Throughput over the measured window, stretched if responses came late.
    window = max(args.duration, stats.last_done - measure_from)
    latencies = sorted(stats.latencies)
    lags = sorted(stats.send_lag)
    late = sorted(stats.submit_lag)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    ok = stats.statuses.get(200, 0)
    errors = sum(v for k, v in stats.errors.items() if not k.startswith("connect"))
    return {
        "target_rate": args.rate,
        "duration_s": args.duration,
        "connections": args.connections,
        "scheduled": scheduled_measured,
        "completed": completed,
        "ok": ok,
        "non_200": completed - ok,
        "errors": errors,
        "dropped": max(0, scheduled_measured - completed - errors),
        "dropped_in_backlog": dropped_backlog,
        "error_kinds": dict(stats.errors),
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "achieved_rate": round(ok / window, 1),
        "p50_ms": ms(percentile(latencies, 50)),
        "p90_ms": ms(percentile(latencies, 90)),
        "p99_ms": ms(percentile(latencies, 99)),
        "p999_ms": ms(percentile(latencies, 99.9)),
        "max_ms": ms(latencies[-1] if latencies else None),
        "send_lag_p50_ms": ms(percentile(lags, 50)),
        "send_lag_p99_ms": ms(percentile(lags, 99)),
        "scheduler_lag_p50_ms": ms(percentile(late, 50)),
        "scheduler_lag_p99_ms": ms(percentile(late, 99)),
        "tail_after_schedule_s": round(finished - end_of_schedule, 3),
        "generator_cpu_s": round(cpu, 3),
        "generator_cpu_share": round(cpu / max(1e-9, finished - wall0), 3),
        "sample_body": (stats.first_body or b"").decode("utf-8", "replace"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--method", default="GET", choices=["GET", "POST"])
    parser.add_argument("--path", default="/healthz")
    parser.add_argument(
        "--keys-file", help="KEY or KEY<TAB>FINGERPRINT per line; POSTs a random one as JSON"
    )
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 100_000 or not 0 < args.duration <= 300:
        parser.error("rate must be in (0, 100000] and duration in (0, 300]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    keys = None
    if args.keys_file:
        keys = read_keys(args.keys_file)
    requests = build_requests(args.host, args.port, args.method, args.path, keys)
    try:
        import uvloop
    except ImportError:  # plain asyncio works, with more CPU per request
        result = asyncio.run(run(args, requests))
    else:
        result = uvloop.run(run(args, requests))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
