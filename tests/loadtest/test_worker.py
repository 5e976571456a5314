"""A worker's send loop, driven against in-process fake servers instead of the network."""

from __future__ import annotations

import asyncio
import time
from multiprocessing.sharedctypes import RawArray, RawValue
from typing import Any

from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from coupon.gen.coupon.v1 import coupon_pb
from coupon_loadtest.histogram import LatencyHistogram
from coupon_loadtest.records import OK, SOLD_OUT
from coupon_loadtest.schedule import NS_PER_S, OpenLoopSchedule, judge_generator
from coupon_loadtest.worker import COUNTERS, NO_STOP, Go, Worker, WorkerResult, WorkerSpec
from coupon_loadtest.worker import C as COUNTER

CAMPAIGN = "0194b2a0-0000-7000-8000-000000000002"


class FakeIssueServer:
    """Answers IssueCoupon like an open campaign: `stock` coupons, then sold out."""

    def __init__(self, *, stock: int = 10**9, cpu_s: float = 0.0, wait_s: float = 0.0) -> None:
        self.stock = stock
        self.cpu_s = cpu_s
        self.wait_s = wait_s
        self.issued = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, body: bytes) -> tuple[int, bytes]:
        if self.cpu_s:
            time.sleep(self.cpu_s)  # time the generator's own process spends per request
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.wait_s:
                await asyncio.sleep(self.wait_s)
            request = coupon_pb.IssueCouponRequest.from_binary(body)
            if self.issued >= self.stock:
                return 429, b'{"code": "resource_exhausted", "message": "sold out"}'
            self.issued += 1
            now = time.time_ns()
            coupon = coupon_pb.Coupon(
                code=f"C{self.issued}",
                campaign_id=request.campaign_id,
                user_id=request.user_id,
                issued_at=Timestamp(seconds=now // NS_PER_S, nanos=now % NS_PER_S),
            )
            return 200, coupon_pb.IssueCouponResponse(coupon=coupon).to_binary()
        finally:
            self.in_flight -= 1


def spec(**changes: Any) -> WorkerSpec:
    values: dict[str, Any] = {
        "index": 0,
        "processes": 1,
        "url": "http://fake.invalid",
        "json": False,
        "timeout_s": 5.0,
        "max_inflight": 1000,
        "rate": 200.0,
        "concurrency": 0,
        "users": 10_000,
        "repeat_fraction": 0.0,
        "seed": 0,
        "user_prefix": "lt-w-",
    }
    values.update(changes)
    return WorkerSpec(**values)


class Shared:
    def __init__(self) -> None:
        self.counters: Any = RawArray("q", len(COUNTERS))
        self.stop_at: Any = RawValue("q", NO_STOP)


async def run_worker(
    server: FakeIssueServer, duration_s: float, shared: Shared | None = None, **changes: Any
) -> WorkerResult:
    shared = shared or Shared()
    go = Go(CAMPAIGN, time.time_ns() + 20_000_000, round(duration_s * NS_PER_S))
    worker = Worker(spec(**changes), go, shared.counters, shared.stop_at, post=server)
    return await worker.run()


def verdict(result: WorkerResult, rate: float, max_lag_ms: float) -> Any:
    lag = LatencyHistogram.decode(result.histograms["send_lag"])
    return judge_generator(
        rate=rate,
        window_ns=result.stop_rel_ns,
        due=result.due,
        sent=result.sent,
        lag_p99_ms=lag.percentile_ms(99.0),
        max_lag_ms=max_lag_ms,
        inflight_cap_waits=result.inflight_cap_waits,
    )


async def test_open_loop_offers_the_asked_rate_to_a_fast_server() -> None:
    result = await run_worker(FakeIssueServer(), 0.5, rate=200.0)

    assert result.due == 100
    # Everything due was sent, never held back by the in-flight cap. (How punctual the
    # sends were depends on how busy the test machine is; the verdict's lag limit here only
    # excludes a generator that stalled.)
    assert result.sent == result.due and result.inflight_cap_waits == 0
    assert verdict(result, 200.0, max_lag_ms=1000.0).kept_up
    assert result.observations.counts() == {"ok": result.sent}


async def test_generator_short_of_cpu_is_reported_as_falling_behind() -> None:
    # 5 ms of the generator's own time per request caps it near 200/s; 500/s was asked.
    result = await run_worker(FakeIssueServer(cpu_s=0.005), 0.2, rate=500.0)

    judged = verdict(result, 500.0, max_lag_ms=50.0)
    assert not judged.kept_up
    assert "p99 send lag" in judged.message


async def test_late_sends_count_their_delay_in_the_latency() -> None:
    # Coordinated omission: a request sent late must not look fast.
    result = await run_worker(FakeIssueServer(cpu_s=0.005), 0.2, rate=500.0)
    obs = result.observations

    # Each request keeps the time the schedule gave it, not the time it went out...
    schedule = OpenLoopSchedule(500.0)
    assert sorted(obs.intended_ns) == [schedule.intended_ns(i) for i in range(result.sent)]
    latencies = [d - i for d, i in zip(obs.done_ns, obs.intended_ns, strict=True)]
    service = [d - s for d, s in zip(obs.done_ns, obs.sent_ns, strict=True)]
    assert all(lat >= svc for lat, svc in zip(latencies, service, strict=True))
    # ...and the success latencies reported include the whole delay of the latest send.
    worst_send_delay = max(s - i for s, i in zip(obs.sent_ns, obs.intended_ns, strict=True))
    assert worst_send_delay > 0, "a generator short of CPU sends late"
    success = LatencyHistogram.decode(result.histograms["success"])
    assert success.percentile_ms(100.0) >= 0.99 * worst_send_delay / 1e6


async def test_slow_answers_fill_the_inflight_cap_and_the_shortfall_is_reported() -> None:
    server = FakeIssueServer(wait_s=0.3)

    result = await run_worker(server, 0.5, rate=200.0, max_inflight=5)

    assert server.most_in_flight == 5
    assert result.inflight_cap_waits > 0
    judged = verdict(result, 200.0, max_lag_ms=50.0)
    assert not judged.kept_up
    assert "--max-inflight" in judged.message


async def test_stop_time_from_the_parent_ends_sending() -> None:
    shared = Shared()
    shared.stop_at.value = NS_PER_S // 5

    # A 30 s run that the parent stops after 0.2 s: it must end well before its own end.
    result = await asyncio.wait_for(run_worker(FakeIssueServer(), 30.0, shared, rate=200.0), 5)

    assert result.stop_rel_ns == NS_PER_S // 5
    assert result.due == 40


async def test_closed_loop_keeps_the_asked_number_of_requests_in_flight() -> None:
    server = FakeIssueServer(wait_s=0.01)

    result = await run_worker(server, 0.3, rate=None, concurrency=3)

    assert server.most_in_flight == 3
    assert result.sent > 3


async def test_answers_are_recorded_and_published_for_the_progress_display() -> None:
    shared = Shared()

    result = await run_worker(FakeIssueServer(stock=30), 0.5, shared, rate=200.0)

    obs = result.observations
    assert obs.counts() == {"ok": 30, "resource_exhausted": result.sent - 30}
    assert sorted(obs.ok_code) == sorted(f"C{n}" for n in range(1, 31))
    assert all(obs.outcome[row] == OK for row in obs.ok_row)
    assert obs.outcome[-1] == SOLD_OUT
    assert shared.counters[COUNTER["done"]] == 1
    assert shared.counters[COUNTER["sent"]] == result.sent
    assert shared.counters[COUNTER["ok"]] == 30
    assert shared.counters[COUNTER["sold_out"]] == result.sent - 30
    assert shared.counters[COUNTER["users_served"]] == 30
    assert result.error_examples == {"resource_exhausted": "sold out"}
