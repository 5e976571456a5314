"""The clock reads are dated by: the one clock while it answers, the process's own while
it does not, without waiting on the one clock at every read of an outage."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from coupon.application.clocks import ReadingClock
from coupon.domain.errors import Unavailable

ONE = datetime(2026, 1, 1, tzinfo=UTC)
OWN = datetime(2030, 1, 1, tzinfo=UTC)


class FlakyClock:
    """The one clock, down while `down` is set; counts the times it is asked."""

    def __init__(self) -> None:
        self.down = False
        self.asked = 0

    async def now(self) -> datetime:
        self.asked += 1
        if self.down:
            raise Unavailable("Redis is unavailable")
        return ONE + timedelta(seconds=self.asked)


class Ticks:
    def __init__(self) -> None:
        self.at = 100.0

    def __call__(self) -> float:
        return self.at


async def test_the_one_clock_while_it_answers_the_own_while_it_is_down() -> None:
    one, ticks = FlakyClock(), Ticks()
    clock = ReadingClock(one, lambda: OWN, pause=1.0, monotonic=ticks)
    assert await clock.now() == ONE + timedelta(seconds=1)
    one.down = True
    assert await clock.now() == OWN
    assert one.asked == 2
    # Within the pause, the one clock is not asked again.
    ticks.at += 0.9
    assert await clock.now() == OWN
    assert one.asked == 2
    # After it, it is; back up, it decides again.
    ticks.at += 0.2
    one.down = False
    assert await clock.now() == ONE + timedelta(seconds=3)
    assert one.asked == 3


async def test_only_unavailability_falls_back() -> None:
    class Broken:
        async def now(self) -> datetime:
            raise RuntimeError("a bug, not an outage")

    with pytest.raises(RuntimeError):
        await ReadingClock(Broken(), lambda: OWN).now()


async def test_a_clock_slower_than_the_patience_is_not_waited_for() -> None:
    class Hung:
        async def now(self) -> datetime:
            await asyncio.sleep(60)
            return ONE

    started = asyncio.get_running_loop().time()
    assert await ReadingClock(Hung(), lambda: OWN, patience=0.05).now() == OWN
    assert asyncio.get_running_loop().time() - started < 5
