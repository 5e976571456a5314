"""The clock reads are dated by: the one clock, or the process's own while it is down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

from coupon.application.ports import Clock
from coupon.domain.errors import Unavailable


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ReadingClock:
    """A ViewClock: `decides` (the one clock) while it answers within `patience` seconds;
    once it is unavailable or slower, the process's own clock, without asking `decides`
    again for `pause` seconds, so a read during an outage or a hang does not wait for the
    one clock each time."""

    def __init__(
        self,
        decides: Clock,
        own: Callable[[], datetime] = _utc_now,
        *,
        pause: float = 1.0,
        patience: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._decides = decides
        self._own = own
        self._pause = pause
        self._patience = patience
        self._monotonic = monotonic
        self._retry_at = 0.0

    async def now(self) -> datetime:
        if self._monotonic() < self._retry_at:
            return self._own()
        try:
            async with asyncio.timeout(self._patience):
                return await self._decides.now()
        except (Unavailable, TimeoutError):
            self._retry_at = self._monotonic() + self._pause
            return self._own()
