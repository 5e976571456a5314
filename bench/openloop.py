"""Open-loop load: IssueCoupon at a fixed rate, latency measured from the intended send time.

Request i is due at start + i / rate, whatever happened to the requests before it (no
coordinated omission): it goes out on an idle keep-alive connection, or waits for one (a
new connection is opened while fewer than --connections exist), and that wait counts in its
latency. Bodies are binary protobuf with a new user per request, written by hand like
bench/issue.lua. Prints one line "BENCH_RESULT {json}"; times in the JSON are milliseconds.

Whether the generator kept up is reported, not assumed: `dispatch_lag_ms` is how late the
generator itself got to each request (timer resolution, its own CPU, the machine's other
load), separate from the wait for a free connection, which is the server's doing. Run as
root, it takes real-time priority (SCHED_FIFO) so that its schedule holds on a busy machine.

    python -m bench.openloop --port 8000 --campaign <id> --rate 1000 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import threading
import time
from collections import Counter, deque
from typing import cast

import uvloop

ISSUE_PATH = "/coupon.v1.CouponService/IssueCoupon"
clock = time.perf_counter  # loop.time() is millisecond-grained under uvloop


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: int, value: str) -> bytes:
    data = value.encode()
    return bytes([tag]) + varint(len(data)) + data


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summary_ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": percentile(ordered, 50) * 1000,
        "p90": percentile(ordered, 90) * 1000,
        "p99": percentile(ordered, 99) * 1000,
        "p99.9": percentile(ordered, 99.9) * 1000,
        "max": (ordered[-1] if ordered else math.nan) * 1000,
    }


def finite_or_none(values: dict[str, float]) -> dict[str, float | None]:
    return {k: v if math.isfinite(v) else None for k, v in values.items()}


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection carrying one request at a time."""

    def __init__(self, load: OpenLoop) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.response_end: int | None = None
        self.status = 0
        self.in_flight: tuple[float, float] | None = None  # (due, sent)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def send(self, request: bytes, due: float) -> None:
        assert self.transport is not None
        self.in_flight = (due, clock())
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.response_end is None:
                head_end = self.buffer.find(b"\r\n\r\n")
                if head_end < 0:
                    return
                head = bytes(self.buffer[:head_end]).lower()
                self.status = int(head[9:12])
                marker = head.find(b"\r\ncontent-length:")
                if marker < 0:  # the service always sends one for a unary response
                    self.load.fail(self, "response without content-length")
                    return
                value_end = head.find(b"\r\n", marker + 2)
                length = int(head[marker + 17 : value_end if value_end >= 0 else len(head)])
                self.response_end = head_end + 4 + length
            if len(self.buffer) < self.response_end:
                return
            del self.buffer[: self.response_end]
            self.response_end = None
            self.load.answered(self, self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.load.lost(self, exc)


class OpenLoop:
    def __init__(self, args: argparse.Namespace) -> None:
        self.host: str = args.host
        self.port: int = args.port
        self.max_connections: int = args.connections
        self.total = round(args.rate * args.duration)
        self.rate: float = args.rate
        self.head = (
            f"POST {ISSUE_PATH} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Content-Type: application/proto\r\nConnect-Protocol-Version: 1\r\n"
            "Content-Length: "
        ).encode()
        self.campaign_field = field(0x0A, args.campaign)
        self.user_prefix: str = args.user_prefix
        self.idle: list[Connection] = []
        self.waiting: deque[tuple[bytes, float]] = deque()
        self.connections: set[Connection] = set()
        self.opening = 0
        self.latency: list[float] = []  # from due time to the whole response read
        self.service: list[float] = []  # from the write to the whole response read
        self.dispatch_lag: list[float] = []  # how late the generator got to a due request
        self.statuses: Counter[int] = Counter()
        self.failures: Counter[str] = Counter()
        self.max_waiting = 0
        self.finished = 0
        self.last_answer = 0.0

    def request(self, number: int) -> bytes:
        body = self.campaign_field + field(0x12, f"{self.user_prefix}-{number}")
        return self.head + str(len(body)).encode() + b"\r\n\r\n" + body

    async def open_connection(self) -> None:
        self.opening += 1
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: Connection(self), self.host, self.port)
        except OSError as exc:
            self.failures[f"connect: {exc.__class__.__name__}"] += 1
            if self.waiting:  # the request that wanted this connection cannot go out
                self.waiting.popleft()
                self.finished += 1
            return
        finally:
            self.opening -= 1
        self.connections.add(conn)
        self.release(conn)

    def release(self, conn: Connection) -> None:
        conn.in_flight = None
        if self.waiting:
            conn.send(*self.waiting.popleft())
        else:
            self.idle.append(conn)

    def submit(self, number: int, due: float) -> None:
        self.dispatch_lag.append(clock() - due)
        request = self.request(number)
        if self.idle:
            self.idle.pop().send(request, due)
            return
        self.waiting.append((request, due))
        self.max_waiting = max(self.max_waiting, len(self.waiting))
        if len(self.connections) + self.opening < self.max_connections:
            asyncio.get_running_loop().create_task(self.open_connection())

    def answered(self, conn: Connection, status: int) -> None:
        now = clock()
        assert conn.in_flight is not None
        due, sent = conn.in_flight
        self.latency.append(now - due)
        self.service.append(now - sent)
        self.statuses[status] += 1
        self.finished += 1
        self.last_answer = now
        self.release(conn)

    def fail(self, conn: Connection, reason: str) -> None:
        self.failures[reason] += 1
        if conn.in_flight is not None:
            conn.in_flight = None
            self.finished += 1
        if conn.transport is not None:
            conn.transport.abort()

    def lost(self, conn: Connection, exc: Exception | None) -> None:
        self.connections.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.in_flight is not None:
            conn.in_flight = None
            self.failures[f"connection lost: {exc.__class__.__name__ if exc else 'closed'}"] += 1
            self.finished += 1
        if self.waiting and len(self.connections) + self.opening < self.max_connections:
            asyncio.get_running_loop().create_task(self.open_connection())

    async def run(self, warm_connections: int, drain_seconds: float) -> dict[str, object]:
        await asyncio.gather(*(self.open_connection() for _ in range(warm_connections)))
        loop = asyncio.get_running_loop()
        all_submitted = asyncio.Event()
        start = clock() + 0.05

        # The schedule runs in its own thread: time.sleep wakes within ~0.1 ms, the event
        # loop's timers only to the millisecond, and that would be measured as latency.
        def ticker() -> None:
            for number in range(self.total):
                due = start + number / self.rate
                if (delay := due - clock()) > 0:
                    time.sleep(delay)
                loop.call_soon_threadsafe(self.submit, number, due)
            loop.call_soon_threadsafe(all_submitted.set)

        threading.Thread(target=ticker, name="ticker", daemon=True).start()
        await all_submitted.wait()
        sent_all = clock()
        deadline = sent_all + drain_seconds
        while self.finished < self.total and clock() < deadline:
            await asyncio.sleep(0.005)
        unanswered = self.total - self.finished
        if unanswered:
            self.failures[f"no answer within {drain_seconds:g} s"] += unanswered
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()

        ok = sum(n for status, n in self.statuses.items() if 200 <= status < 300)
        answered = sum(self.statuses.values())
        elapsed = max(self.last_answer, sent_all) - start
        lag = summary_ms(self.dispatch_lag)
        return {
            "offered_rate": self.rate,
            "requests": self.total,
            "answered": answered,
            "ok": ok,
            "elapsed_s": elapsed,
            "requests_per_s": answered / elapsed if elapsed > 0 else 0.0,
            "errors": self.total - ok,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "failures": dict(self.failures),
            "latency_ms": finite_or_none(summary_ms(self.latency)),
            "service_time_ms": finite_or_none(summary_ms(self.service)),
            "dispatch_lag_ms": finite_or_none(lag),
            "send_window_s": sent_all - start,
            "connections_opened_max": len(self.connections),
            "max_waiting_for_connection": self.max_waiting,
            # The generator kept up if it got to 99 % of due requests within 1 ms and sent
            # the last one no more than 100 ms after its schedule.
            "kept_up": lag["p99"] <= 1.0 and sent_all - start <= self.total / self.rate + 0.1,
        }


def realtime() -> bool:
    """SCHED_FIFO for this process (root only), before any thread starts: the schedule then
    runs on time even when the server, PostgreSQL and Redis keep both cores busy, as a
    remote client's would. It sleeps between requests, so it cannot hog a core."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (AttributeError, OSError):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--campaign", required=True, help="campaign id")
    parser.add_argument("--user-prefix", default="openloop", help="user ids are <prefix>-<n>")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds")
    parser.add_argument("--connections", type=int, default=128, help="at most this many")
    parser.add_argument("--warm-connections", type=int, default=16)
    parser.add_argument("--drain", type=float, default=10.0, help="seconds to wait at the end")
    args = parser.parse_args()
    on_time = realtime()
    load = OpenLoop(args)
    result = uvloop.run(load.run(min(args.warm_connections, args.connections), args.drain))
    result["realtime_priority"] = on_time
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
