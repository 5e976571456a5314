"""The doorman: how many IssueCoupon requests a process works on at once, learned from the
latency of those it answered."""

from __future__ import annotations

from coupon.entrypoints.overload import Doorman, LoopLag

TARGET = 0.1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def doorman(clock: Clock, **kw: int) -> Doorman:
    options = {"initial": 100, "floor": 10, "ceiling": 1000, **kw}
    return Doorman(target_seconds=TARGET, clock=clock, **options)


def window(
    door: Doorman,
    clock: Clock,
    *,
    latency: float,
    answered: int,
    extra: int = 0,
    fastest: float | None = None,
) -> None:
    """One window: `answered` requests let in and answered after `latency` (spread evenly
    down to `fastest`, when given: queueing), and `extra` more asking while they were in."""
    started = clock.now
    let_in = sum(door.enter() for _ in range(answered + extra))
    low = latency if fastest is None else fastest
    for i in range(let_in):
        # All within the window; the last answer closes it, and the doorman adjusts.
        last = i == let_in - 1
        clock.now = started + Doorman.WINDOW_SECONDS * (1.0 if last else 0.99)
        door.leave(clock.now - (low + (latency - low) * (i + 1) / let_in))


def test_requests_beyond_the_limit_are_turned_away_and_counted() -> None:
    clock = Clock()
    door = doorman(clock, initial=3)
    assert [door.enter() for _ in range(5)] == [True, True, True, False, False]
    assert door.in_flight == 3 and door.shed_total == 2
    door.leave(clock.now)
    assert door.enter()


def test_the_limit_shrinks_when_requests_queue_past_the_target() -> None:
    clock = Clock()
    door = doorman(clock)
    window(door, clock, latency=0.2, answered=50, fastest=0.01)
    assert door.limit == 100 * 0.7  # halving latency would need 0.5; one step is at most 0.7
    for _ in range(20):
        window(door, clock, latency=0.2, answered=5, fastest=0.01)
    assert door.limit == 10  # never below the floor


def test_the_limit_holds_when_no_request_could_be_faster() -> None:
    """Every answer slow alike (a loop kept busy by the crowd): letting fewer in would not
    make them faster, only the batches smaller."""
    clock = Clock()
    door = doorman(clock)
    window(door, clock, latency=0.3, answered=50)
    assert door.limit == 100


def test_the_limit_grows_only_while_it_holds_requests_back() -> None:
    clock = Clock()
    door = doorman(clock)
    window(door, clock, latency=0.01, answered=20)  # fast, and far below the limit
    assert door.limit == 100
    window(door, clock, latency=0.01, answered=100, extra=30)  # fast, and turning away
    assert door.limit == 100 * 1.1 + 1
    for _ in range(100):
        window(door, clock, latency=0.01, answered=int(door.limit), extra=50)
    assert door.limit == 1000  # never above the ceiling


def test_the_retry_hint_grows_with_the_share_turned_away_and_stays_bounded() -> None:
    clock = Clock()
    door = doorman(clock)
    window(door, clock, latency=0.01, answered=100)
    calm = door.retry_after_ms
    assert calm == int(1000 * TARGET)
    window(door, clock, latency=0.01, answered=100, extra=300)
    assert door.retry_after_ms > calm
    window(door, clock, latency=0.01, answered=10, extra=100_000)
    assert door.retry_after_ms == Doorman.HINT_MAX_MS


async def test_a_loop_kept_busy_is_seen_saturated_and_a_free_one_is_not() -> None:
    import asyncio
    import time as clock

    lag = LoopLag()
    lag.start(asyncio.get_running_loop())
    try:
        await asyncio.sleep(0.2)
        assert not lag.saturated
        for _ in range(10):  # turns of the loop that each take 50 ms
            clock.sleep(0.05)
            await asyncio.sleep(0)
        assert lag.saturated
    finally:
        lag.stop()


def test_after_an_idle_second_the_next_crowd_starts_at_the_initial_limit() -> None:
    clock = Clock()
    door = doorman(clock)
    for _ in range(20):
        window(door, clock, latency=0.2, answered=5, fastest=0.01)
    assert door.limit == 10
    clock.now += Doorman.IDLE_SECONDS / 2  # a lull, not idle: the lesson stands
    assert door.enter()
    assert door.limit == 10
    door.leave(clock.now)
    clock.now += Doorman.WINDOW_SECONDS + Doorman.IDLE_SECONDS + 0.01
    assert door.enter()
    assert door.limit == 100 and door.hold == 0.0
    assert door.retry_after_ms == Doorman.HINT_MIN_MS


def test_requests_still_in_flight_keep_the_limit_however_long_they_take() -> None:
    """A hang (PostgreSQL, Redis) is not idleness: what is in flight is stuck, and letting
    a new process's number in would only add to it."""
    clock = Clock()
    door = doorman(clock)
    for _ in range(20):
        window(door, clock, latency=0.2, answered=5, fastest=0.01)
    assert door.enter()
    clock.now += 10 * Doorman.IDLE_SECONDS
    assert door.enter()
    assert door.limit == 10


def test_a_crowd_that_does_not_wait_is_held_once_it_has_lasted() -> None:
    """Clients that come straight back after a refusal (a closed loop ignoring the hint)
    fill the loop with refusals: after CROWDED_WINDOWS such windows in a row, the connections
    turned away are not read again for the hint, even though the loop is not late."""
    clock = Clock()
    door = doorman(clock)
    crowd = Doorman.CROWDED_RATIO * 300  # turned away per window, against 100-130 answered
    for _ in range(Doorman.CROWDED_WINDOWS - 1):
        window(door, clock, latency=0.01, answered=100, extra=crowd)
        assert door.hold == 0.0
    window(door, clock, latency=0.01, answered=100, extra=crowd)
    assert door.hold == min(door.retry_after_ms / 1000, Doorman.HOLD_MAX) > 0
    # A window turning away no more than the ratio breaks the run: no hold.
    window(door, clock, latency=0.01, answered=int(door.limit), extra=10)
    assert door.hold == 0.0


def test_a_passing_spell_of_refusals_is_not_held() -> None:
    """One bad window (a stall while requests kept arriving) does not hold anyone: the
    next requests of an open-loop crowd would wait for nothing."""
    clock = Clock()
    door = doorman(clock)
    crowd = Doorman.CROWDED_RATIO * 300
    for _ in range(5):
        window(door, clock, latency=0.01, answered=100, extra=crowd)
        assert door.hold == 0.0
        window(door, clock, latency=0.01, answered=100, extra=10)
        assert door.hold == 0.0
