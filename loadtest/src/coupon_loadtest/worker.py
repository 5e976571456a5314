"""One load-generating process: its own uvloop event loop, its own HTTP connection pool.

The parent starts these with the spawn method, waits for each to say it is ready, then sends
the campaign id and a common start time. While running, a process publishes its counters to
shared memory for the live progress and reads the stop time from it; at the end it sends
back every row it recorded and its histograms.
"""

from __future__ import annotations

import asyncio
import signal
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import uvloop

from coupon_loadtest.herd import UserBook
from coupon_loadtest.histogram import LatencyHistogram
from coupon_loadtest.http import HttpPool
from coupon_loadtest.records import (
    ENDED_NAME,
    ENDED_PREFIX,
    LOST,
    NOT_OPEN,
    NOT_STARTED_NAME,
    OK,
    OUTCOMES,
    SOLD_OUT,
    Observations,
    user_id,
)
from coupon_loadtest.schedule import OpenLoopSchedule, UserPicker
from coupon_loadtest.wire import ISSUE_PATH, IssueCodec, IssueReply

# Slots each process owns in the shared counter array, in this order.
COUNTERS = (
    "sent",
    "ok",
    "ok_repeat",
    "sold_out",
    "not_open",
    "ended",
    "errors",
    "lost",
    "inflight",
    "users_served",
    "done",
)
C = {name: i for i, name in enumerate(COUNTERS)}
NO_STOP = 2**62

# Sends one request body, returns (HTTP status, response body).
Post = Callable[[bytes], Awaitable[tuple[int, bytes]]]
_PUBLISH_S = 0.05
_MAX_REASONS = 20
_MIN_SLEEP_NS = 1_000_000


@dataclass(frozen=True)
class HerdSpec:
    """The crowd model's settings (see herd.py)."""

    spread_ns: int
    patience_ns: int
    retry_floor_ns: int
    retry_cap_ns: int
    connections: int  # this process's


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    processes: int
    url: str
    json: bool
    timeout_s: float
    max_inflight: int
    rate: float | None  # whole-run rate; None in closed loop
    concurrency: int  # this process's share of the virtual users, in closed loop
    users: int
    repeat_fraction: float
    seed: int
    user_prefix: str
    herd: HerdSpec | None = None
    ca_file: str | None = None  # the CAs to trust over https:// instead of the system's


@dataclass(frozen=True)
class Go:
    campaign_id: str
    t0_wall_ns: int
    end_rel_ns: int
    starts_rel_ns: int = 0  # starts_at in the client's clock, after t0 (the herd presses then)


@dataclass
class WorkerResult:
    index: int
    observations: Observations
    histograms: dict[str, bytes]
    due: int
    sent: int
    stop_rel_ns: int
    inflight_cap_waits: int
    lost_reasons: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)
    herd: UserBook | None = None  # the herd's users, one record each
    ended: int = 0  # failed_precondition refusals that said the campaign has ended


class Worker:
    def __init__(
        self, spec: WorkerSpec, go: Go, counters: Any, stop_at: Any, post: Post | None = None
    ) -> None:
        self._spec = spec
        self._go = go
        self._counters = counters
        self._stop_at = stop_at
        self._codec = IssueCodec(json=spec.json)
        self._pool: HttpPool | None = None
        self._post = post or self._http_post()
        self._picker = UserPicker(
            spec.users,
            spec.repeat_fraction,
            process_index=spec.index,
            processes=spec.processes,
            seed=spec.seed,
        )
        self.observations = Observations(spec.user_prefix, go.t0_wall_ns)
        self._book = AnswerBook(self.observations, spec.user_prefix, go.campaign_id)
        # Our clock: monotonic (immune to wall-clock steps), anchored once to the wall clock
        # so every process measures from the same t0.
        self._mono_offset = time.time_ns() - time.monotonic_ns() - go.t0_wall_ns
        self._end_rel = go.end_rel_ns
        self._seen_stop = NO_STOP
        self._served = bytearray(self._picker.owned)
        self._served_count = 0
        self._sent = 0
        self._inflight = 0
        self._cap_waits = 0
        self._slot = asyncio.Event()
        self._finished = False

    def _http_post(self) -> Post:
        spec = self._spec
        # A connection per request in flight, as many as the load model lets be in flight.
        connections = spec.max_inflight if spec.rate is not None else max(1, spec.concurrency)
        self._pool = pool = HttpPool(
            spec.url,
            connections=connections,
            timeout_s=spec.timeout_s,
            headers=self._codec.headers,
            ca_file=spec.ca_file,
        )
        head = pool.request_head(ISSUE_PATH)

        async def post(body: bytes) -> tuple[int, bytes]:
            reply = await pool.post(head, body)
            return reply.status, reply.body

        return post

    def _stop(self) -> int:
        """When sending ends: the planned end, or earlier if the parent says so.

        Read from shared memory at every send, so a stop in the past (Ctrl-C) takes effect
        at once rather than at the next publish tick.
        """
        shared: int = self._stop_at.value
        return min(self._end_rel, shared)

    def now(self) -> int:
        return time.monotonic_ns() + self._mono_offset

    async def run(self) -> WorkerResult:
        publisher = asyncio.create_task(self._publish_loop())
        try:
            delay = -self.now()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            if self._spec.rate is not None:
                due = await self._open_loop(
                    OpenLoopSchedule(self._spec.rate, self._spec.index, self._spec.processes)
                )
            else:
                due = await self._closed_loop(self._spec.concurrency)
        finally:
            self._finished = True
            publisher.cancel()
            self._publish(done=True)
            if self._pool is not None:
                await self._pool.aclose()
        return WorkerResult(
            index=self._spec.index,
            observations=self.observations,
            histograms=histograms_of(self.observations),
            due=due,
            sent=self._sent,
            stop_rel_ns=self._stop(),
            inflight_cap_waits=self._cap_waits,
            lost_reasons=dict(self._book.lost_reasons),
            error_examples=self._book.examples,
            ended=self._book.ended,
        )

    async def _open_loop(self, schedule: OpenLoopSchedule) -> int:
        """Send each request when due; returns how many were due before the stop."""
        tasks: set[asyncio.Task[None]] = set()
        cap = self._spec.max_inflight
        loop = asyncio.get_running_loop()
        i = 0
        intended = schedule.intended_ns(0)
        while True:
            now = self.now()
            stop = self._stop()
            if intended >= stop or now >= stop:
                break
            if now < intended:
                # The loop's timers tick in milliseconds: a shorter sleep returns at once and
                # would spin. Waking up to 1 ms late costs lag we measure, not CPU we need.
                await asyncio.sleep(max(intended - now, _MIN_SLEEP_NS) / 1e9)
                continue
            if self._inflight >= cap:
                # Waiting here makes the next sends late; their latency still counts from
                # the intended time, and the verdict reports the shortfall.
                self._cap_waits += 1
                self._slot.clear()
                await self._slot.wait()
                continue
            # Counted now, not when the task first runs: a burst of overdue sends launched
            # without yielding must still respect the cap.
            self._inflight += 1
            task = loop.create_task(self._issue(self._picker.next(), intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            intended = schedule.intended_ns(i)
        if tasks:
            await asyncio.wait(tasks)
        # Due before the stop but never sent: the generator was behind when the stop came.
        return schedule.due_before(self._stop())

    async def _closed_loop(self, virtual_users: int) -> int:
        async def virtual_user() -> None:
            while True:
                now = self.now()
                if now >= self._stop():
                    return
                self._inflight += 1
                await self._issue(self._picker.next(), now)

        await asyncio.gather(*(virtual_user() for _ in range(virtual_users)))
        return self._sent

    async def _issue(self, user: int, intended: int) -> None:
        """One request; the caller has counted it in flight."""
        body = self._codec.encode(self._go.campaign_id, user_id(self._spec.user_prefix, user))
        self._sent += 1
        sent = self.now()
        try:
            status, content = await self._post(body)
            done = self.now()
            reply = self._codec.decode(status, content)
        except TimeoutError:
            done = self.now()
            reply = IssueReply(LOST, message=f"timeout after {self._spec.timeout_s:g} s")
        except Exception as exc:  # noqa: BLE001 - every transport failure is a lost response
            done = self.now()
            reply = IssueReply(LOST, message=f"{type(exc).__name__}: {exc}")
        finally:
            self._inflight -= 1
            self._slot.set()
        self._book.record(user, intended, sent, done, reply)
        if reply.outcome == OK:
            local = self._picker.local_index(user)
            if not self._served[local]:
                self._served[local] = 1
                self._served_count += 1

    def _publish(self, *, done: bool = False) -> None:
        self._book.publish(
            self._counters,
            self._spec.index,
            sent=self._sent,
            inflight=self._inflight,
            served=self._served_count,
            done=done,
        )

    async def _publish_loop(self) -> None:
        while not self._finished:
            self._publish()
            shared_stop = int(self._stop_at.value)
            if shared_stop != self._seen_stop:
                self._seen_stop = shared_stop
                self._slot.set()  # a sender waiting for a free slot must notice the stop
            await asyncio.sleep(_PUBLISH_S)


class AnswerBook:
    """A worker's answers as they arrive: tallies by outcome, the rows verification reads,
    why responses were lost, a message per kind of refusal (a campaign not started apart
    from one ended), and the counters the parent shows live and stops the load by. Shared
    by the load models' workers."""

    def __init__(self, observations: Observations, user_prefix: str, campaign_id: str) -> None:
        self.observations = observations
        self._user_prefix = user_prefix
        self._campaign_id = campaign_id
        self.tally = [0] * len(OUTCOMES)
        self.repeats = 0
        self.ended = 0  # of the NOT_OPEN answers, those saying the campaign has ended
        self.lost_reasons: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def record(self, user: int, intended: int, sent: int, done: int, reply: IssueReply) -> None:
        outcome = reply.outcome
        self.tally[outcome] += 1
        row = self.observations.record(user, intended, sent, done, outcome)
        if outcome == OK:
            self.observations.record_success(
                row, reply.code, reply.issued_at_ns, already_issued=reply.already_issued
            )
            if reply.already_issued:
                self.repeats += 1
            expected = user_id(self._user_prefix, user)
            if reply.user_id != expected or reply.campaign_id != self._campaign_id:
                self.observations.mismatched.append(
                    f"asked for user {expected}, got {reply.code} for user {reply.user_id!r} "
                    f"of campaign {reply.campaign_id!r}"
                )
        elif outcome == LOST:
            reason = reply.message[:160]
            if reason not in self.lost_reasons and len(self.lost_reasons) >= _MAX_REASONS:
                reason = "other"
            self.lost_reasons[reason] += 1
        elif outcome == NOT_OPEN:
            ended = reply.message.startswith(ENDED_PREFIX)
            self.ended += ended
            self.examples.setdefault(ENDED_NAME if ended else NOT_STARTED_NAME, reply.message)
        elif OUTCOMES[outcome] not in self.examples:
            self.examples[OUTCOMES[outcome]] = reply.message

    def publish(
        self, counters: Any, index: int, *, sent: int, inflight: int, served: int, done: bool
    ) -> None:
        """This worker's row of the shared counters."""
        base = index * len(COUNTERS)
        tally = self.tally
        answered = sum(tally)
        values = {
            "sent": sent,
            "ok": tally[OK] - self.repeats,
            "ok_repeat": self.repeats,
            "sold_out": tally[SOLD_OUT],
            "not_open": tally[NOT_OPEN],
            "ended": self.ended,
            "errors": answered - tally[OK] - tally[SOLD_OUT] - tally[NOT_OPEN] - tally[LOST],
            "lost": tally[LOST],
            "inflight": inflight,
            "users_served": served,
            "done": 1 if done else 0,
        }
        for name, value in values.items():
            counters[base + C[name]] = value


def histograms_of(obs: Observations) -> dict[str, bytes]:
    """Latency from the intended time by kind of answer, service time and send lag; built
    once at the end, off the hot path."""
    success = LatencyHistogram()
    rejected = LatencyHistogram()
    service = LatencyHistogram()
    lag = LatencyHistogram()
    for outcome, intended, sent, done in zip(
        obs.outcome, obs.intended_ns, obs.sent_ns, obs.done_ns, strict=True
    ):
        lag.record_ns(sent - intended)
        if outcome == LOST:
            continue
        service.record_ns(done - sent)
        (success if outcome == OK else rejected).record_ns(done - intended)
    return {
        "success": success.encode(),
        "rejected": rejected.encode(),
        "service": service.encode(),
        "send_lag": lag.encode(),
    }


async def _serve(spec: WorkerSpec, conn: Connection, counters: Any, stop_at: Any) -> None:
    conn.send(("ready", spec.index))
    message = await asyncio.to_thread(conn.recv)
    if message[0] != "go":
        return
    if spec.herd is not None:
        from coupon_loadtest.herd_worker import HerdWorker

        result = await HerdWorker(spec, message[1], counters, stop_at).run()
    else:
        result = await Worker(spec, message[1], counters, stop_at).run()
    conn.send(("result", result))


def process_main(spec: WorkerSpec, conn: Connection, counters: Any, stop_at: Any) -> None:
    """Entry point of a spawned worker process."""
    # Ctrl-C reaches the whole process group: the parent decides when to stop, and every
    # worker still reports what it saw.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        uvloop.run(_serve(spec, conn, counters, stop_at))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        conn.send(("error", spec.index, traceback.format_exc()))
    finally:
        conn.close()
