"""One process's share of the herd: its users press at the start, retry as the server
hints, give up after their patience (herd.py decides; this module sends).

A scheduler walks the users' first presses in time order and a heap of retries, and
submits each press when it is due, with a callback rather than a task of its own; a press
waits for a free connection of the process's pool (that wait counts in its latency,
measured from when the user pressed) and is never sent once the user's patience has run
out. Every request is recorded like the other load
models' (verification reads the same rows); every user's ending goes in the UserBook.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from typing import Any

from coupon_loadtest.herd import (
    Decision,
    Final,
    RetryPolicy,
    UserBook,
    decide,
    first_presses,
    press_origin_ns,
)
from coupon_loadtest.http import GaveUp, HttpPool, Reply
from coupon_loadtest.records import LOST, Observations, user_id
from coupon_loadtest.wire import ISSUE_PATH, IssueCodec, IssueReply
from coupon_loadtest.worker import (
    NO_STOP,
    AnswerBook,
    Go,
    WorkerResult,
    WorkerSpec,
    histograms_of,
)

NS_PER_S = 1_000_000_000
_PUBLISH_S = 0.05
_MIN_SLEEP_NS = 1_000_000


class _Stopped(Exception):
    """The run stopped before this press was sent."""


class HerdWorker:
    def __init__(self, spec: WorkerSpec, go: Go, counters: Any, stop_at: Any) -> None:
        assert spec.herd is not None
        self._spec = spec
        self._herd = spec.herd
        self._go = go
        self._counters = counters
        self._stop_at = stop_at
        self._policy = RetryPolicy(
            spec.herd.retry_floor_ns, spec.herd.retry_cap_ns, spec.herd.patience_ns
        )
        seed = spec.seed * 1_000_003 + spec.index
        self._rng = random.Random(seed + 1)
        # Process k owns users k, k + P, ...; local index i is user k + i * P.
        owned = len(range(spec.index, spec.users, spec.processes))
        offsets = first_presses(owned, spec.herd.spread_ns, seed)
        origin = press_origin_ns(go.starts_rel_ns)
        self.book = UserBook([origin + o for o in offsets])
        self._order = sorted(range(owned), key=lambda i: self.book.first_ns[i])
        self._retries: list[tuple[int, int]] = []  # (due ns, local user)
        self.observations = Observations(spec.user_prefix, go.t0_wall_ns)
        self._book = AnswerBook(self.observations, spec.user_prefix, go.campaign_id)
        self._codec = IssueCodec(json=spec.json)
        self._mono_offset = time.time_ns() - time.monotonic_ns() - go.t0_wall_ns
        self._inflight = 0
        self._sent = 0
        self._finished = False
        self._served = 0
        self._ended = NO_STOP

    def now(self) -> int:
        return time.monotonic_ns() + self._mono_offset

    def _stop(self) -> int:
        return min(self._go.end_rel_ns, int(self._stop_at.value))

    async def run(self) -> WorkerResult:
        spec = self._spec
        pool = HttpPool(
            spec.url,
            connections=self._herd.connections,
            timeout_s=spec.timeout_s,
            headers=self._codec.headers,
            ca_file=spec.ca_file,
        )
        publisher = asyncio.create_task(self._publish_loop())
        try:
            await self._schedule(pool)
        finally:
            self._finished = True
            publisher.cancel()
            self._publish(done=True)
            await pool.aclose()
        return WorkerResult(
            index=spec.index,
            observations=self.observations,
            histograms=histograms_of(self.observations),
            due=self._sent,
            sent=self._sent,
            # A herd ends when its users have: the window is up to then, not the planned end.
            stop_rel_ns=min(self._stop(), self._ended),
            inflight_cap_waits=pool.waits,
            lost_reasons=dict(self._book.lost_reasons),
            error_examples=self._book.examples,
            herd=self.book,
            ended=self._book.ended,
        )

    async def _schedule(self, pool: HttpPool) -> None:
        """Start every press when it is due, until every user has ended or the stop."""
        head = pool.request_head(ISSUE_PATH)
        order, firsts = self._order, self.book.first_ns
        next_first = 0
        # A retry is never due sooner than the floor after it is scheduled: sleeping at most
        # half of it never wakes late for one.
        nap_ns = max(_MIN_SLEEP_NS, self._policy.floor_ns // 2)
        while True:
            now = self.now()
            if now >= self._stop():
                break
            due = firsts[order[next_first]] if next_first < len(order) else None
            if self._retries and (due is None or self._retries[0][0] < due):
                due = self._retries[0][0]
            if due is None:
                if not self._inflight:
                    break
                await asyncio.sleep(nap_ns / NS_PER_S)
                continue
            if now < due:
                await asyncio.sleep(max(min(due - now, nap_ns), _MIN_SLEEP_NS) / NS_PER_S)
                continue
            while next_first < len(order) and firsts[order[next_first]] <= now:
                local = order[next_first]
                next_first += 1
                self._press(pool, head, local, firsts[local])
            while self._retries and self._retries[0][0] <= now:
                at, local = heapq.heappop(self._retries)
                self._press(pool, head, local, at)
        # Stopped (or every user has ended): presses still in line are not sent; those in
        # flight get their answer or their time-out.
        pool.drop_waiting(_Stopped())
        while self._inflight:
            await asyncio.sleep(_MIN_SLEEP_NS * 10 / NS_PER_S)
        self._ended = self.now()

    def _press(self, pool: HttpPool, head: bytes, local: int, intended: int) -> None:
        spec = self._spec
        user = spec.index + local * spec.processes
        body = self._codec.encode(self._go.campaign_id, user_id(spec.user_prefix, user))
        # Past their patience, a user no longer presses: a press still waiting for a
        # connection then is not sent at all.
        deadline = self.book.first_ns[local] + self._herd.patience_ns - self._mono_offset
        self._inflight += 1

        def answered(result: Reply | BaseException, sent_mono_ns: int) -> None:
            self._answered(local, user, intended, result, sent_mono_ns)

        pool.submit(head, body, answered, deadline_ns=deadline)

    def _answered(
        self,
        local: int,
        user: int,
        intended: int,
        result: Reply | BaseException,
        sent_mono_ns: int,
    ) -> None:
        self._inflight -= 1
        book = self.book
        if isinstance(result, _Stopped):
            return
        if isinstance(result, GaveUp):
            book.gave_up[local] = 1
            return
        done = self.now()
        sent = sent_mono_ns + self._mono_offset if sent_mono_ns else done
        hint: int | None = None
        if isinstance(result, Reply):
            answer = self._codec.decode(result.status, result.body)
            hint = result.retry_after_ms
        else:
            answer = IssueReply(LOST, message=f"{type(result).__name__}: {result}")
        book.presses[local] += 1
        self._sent += 1
        self._book.record(user, intended, sent, done, answer)
        decision = decide(
            answer.outcome,
            hint,
            attempt=book.presses[local],
            now_ns=done,
            first_ns=book.first_ns[local],
            policy=self._policy,
            rng=self._rng,
            message=answer.message,
        )
        self._end_or_retry(local, decision, done)

    def _end_or_retry(self, local: int, decision: Decision, done: int) -> None:
        book = self.book
        if decision.final is not Final.NONE:
            book.final[local] = decision.final
            book.final_ns[local] = done
            if decision.final is Final.COUPON:
                self._served += 1
        elif decision.gave_up:
            book.gave_up[local] = 1
        else:
            heapq.heappush(self._retries, (decision.retry_at_ns, local))

    def _publish(self, *, done: bool = False) -> None:
        self._book.publish(
            self._counters,
            self._spec.index,
            sent=self._sent + self._inflight,
            inflight=self._inflight,
            served=self._served,
            done=done,
        )

    async def _publish_loop(self) -> None:
        while not self._finished:
            self._publish()
            await asyncio.sleep(_PUBLISH_S)
