"""Load shedding for IssueCoupon, per server process.

A flash sale is overload by nature: far more people press at the start than any server can
serve. Each process therefore takes only as many IssueCoupon requests at once as it can
answer within a target latency, and answers the rest at once with `unavailable` and a retry
hint, before any Redis or PostgreSQL work: a refusal costs a few microseconds, the requests
it lets in keep their latency, and its throughput does not fall as the crowd grows.

The limit adapts (as Envoy's adaptive concurrency and Netflix's concurrency limits do):
every window, the latency of the requests answered in it (from arrival to answer, queueing
in the process included) is compared with the target. Above it, the limit shrinks in
proportion; below it, and only while the limit was what held requests back, it grows by a
tenth. Little's law keeps the two apart: a process that answers X requests a second with L
in flight keeps each L / X seconds, so the limit settles near X times the target.

What a crowd taught is forgotten once it has gone: a process that has had nothing in
flight and nothing to answer for a second starts the next crowd (the next sale) where a new
process would, rather than at a limit that the last one's loop saturation pushed down.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf.wkt import Any

RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"


class Doorman:
    """Admission control: `enter` before any work, `leave` after the answer."""

    WINDOW_SECONDS = 0.1
    PERCENTILE = 0.95
    # A new process has measured nothing yet: it starts permissive and learns.
    INITIAL = 1024
    # Below this the batches that make an issue cheap (one Redis call, one commit for many
    # requests) shrink, and throughput with them, while a loop kept busy by turned-away
    # requests keeps latency up anyway: fewer would not make anyone faster.
    FLOOR = 64
    HINT_MIN_MS = 50
    HINT_MAX_MS = 2_000
    # A held connection may carry other users' requests (a proxy's pool): never for long.
    HOLD_MAX = 1.0
    # Idle this long (nothing in flight, nothing answered or turned away): start afresh.
    IDLE_SECONDS = 1.0
    # A window that turned away more than this many requests per request answered spent
    # more of the loop on refusals than on issues (a refusal costs about a third of an
    # issue); this many such windows in a row are a crowd that does not wait.
    CROWDED_RATIO = 3
    CROWDED_WINDOWS = 3

    def __init__(
        self,
        *,
        target_seconds: float = 0.1,
        initial: int = INITIAL,
        floor: int = FLOOR,
        ceiling: int = 8_192,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target_seconds
        self._floor = floor
        self._ceiling = ceiling
        self._clock = clock
        self._initial = float(initial)
        self.limit = float(initial)
        self.in_flight = 0
        self._samples: list[float] = []
        self._window_ends = clock() + self.WINDOW_SECONDS
        self._peak = 0
        self._shed = 0
        self._served = 0
        self._hint_ms = self.HINT_MIN_MS
        self.shed_total = 0
        # Started by the app once its loop runs (see CouponApp._lifespan).
        self.loop_lag = LoopLag()
        # How long a connection that was just turned away is not read from: while the loop
        # is saturated, the hint (a client that honours it loses nothing); else 0. Reading
        # every connection of a crowd on every turn of a saturated loop would leave no time
        # for the requests let in; the crowd's requests wait in the kernel instead.
        self.hold = 0.0
        self._crowded = 0  # windows in a row that were mostly refusals

    def close(self) -> None:
        self.loop_lag.stop()

    def enter(self) -> bool:
        """True: the request is let in (call `leave` when it is answered). False: answer it
        `unavailable` now, with `retry_after_ms`."""
        if not self.in_flight and self._clock() - self._window_ends > self.IDLE_SECONDS:
            self._start_afresh()
        if self.in_flight >= self.limit:
            self._shed += 1
            self.shed_total += 1
            if self._clock() >= self._window_ends:
                self._adjust()
            return False
        self.in_flight += 1
        self._peak = max(self._peak, self.in_flight)
        return True

    def leave(self, arrived: float) -> None:
        """The request let in at `enter` was answered; it arrived at `arrived` (the clock's
        time when its last byte was read)."""
        self.in_flight -= 1
        now = self._clock()
        self._samples.append(now - arrived)
        self._served += 1
        if now >= self._window_ends:
            self._adjust()

    @property
    def retry_after_ms(self) -> int:
        """How long a turned-away client should wait: longer the more the process turns
        away (clients add their own jitter)."""
        return self._hint_ms

    def _start_afresh(self) -> None:
        """After an idle spell: the limit no lower than a new process's, no hold, the
        shortest hint (the last crowd's loop saturation says nothing of the next one's)."""
        self.limit = max(self.limit, self._initial)
        self.hold = 0.0
        self._crowded = 0
        self._hint_ms = self.HINT_MIN_MS
        self._new_window(peak=0)

    def _new_window(self, *, peak: int) -> None:
        self._samples = []
        self._peak = peak
        self._shed = self._served = 0
        self._window_ends = self._clock() + self.WINDOW_SECONDS

    def _adjust(self) -> None:
        samples = self._samples
        if samples:
            samples.sort()
            latency = samples[min(len(samples) - 1, int(len(samples) * self.PERCENTILE))]
            # What no request of the window escaped (a turn of a busy loop, a round trip):
            # latency beyond it is queueing behind the requests let in.
            base = samples[int(len(samples) * 0.05)]
            if latency > self._target and latency - base > self._target / 2:
                self.limit = max(self._floor, self.limit * max(0.7, self._target / latency))
            elif latency <= self._target and (self._shed or self._peak >= 0.9 * self.limit):
                self.limit = min(self._ceiling, self.limit * 1.1 + 1)
        elif self._shed and self.in_flight < self.limit:
            self.limit = min(self._ceiling, self.limit * 1.1 + 1)
        pressure = self._shed / max(1, self._served)
        self._hint_ms = int(
            min(self.HINT_MAX_MS, max(self.HINT_MIN_MS, 1000 * self._target * (1 + pressure)))
        )
        # Turning requests away has been most of the loop's work for a while: a crowd that
        # comes straight back, ignoring the hint, as a closed loop of clients does.
        crowded = self._shed > self.CROWDED_RATIO * self._served
        self._crowded = self._crowded + 1 if crowded else 0
        # As long as the hint asks the client to wait: one that honours it loses nothing.
        # Held while the loop is saturated, and while such a crowd lasts: its refusals
        # would otherwise fill the loop, the requests let in would slow, and the limit,
        # following their latency, would stay down with goodput.
        held = self.loop_lag.saturated or self._crowded >= self.CROWDED_WINDOWS
        self.hold = min(self._hint_ms / 1000, self.HOLD_MAX) if held else 0.0
        self._new_window(peak=self.in_flight)


class LoopLag:
    """How late the event loop runs callbacks: a probe every PERIOD seconds measures its own
    delay. A loop that runs late is saturated: everything it does, shedding included, waits
    for a turn, and requests it let in cannot finish in time however few they are."""

    PERIOD = 0.01
    # Saturated when the smoothed delay is beyond this.
    SATURATED = 0.02

    def __init__(self) -> None:
        self.lag = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0

    @property
    def saturated(self) -> bool:
        return self.lag > self.SATURATED

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._handle is None:
            self._loop = loop
            self._due = loop.time() + self.PERIOD
            self._handle = loop.call_at(self._due, self._probe)

    def _probe(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        # Smoothed over about ten probes.
        self.lag += (max(0.0, now - self._due) - self.lag) * 0.2
        self._due = now + self.PERIOD
        self._handle = loop.call_at(self._due, self._probe)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def retry_info(retry_after_ms: int) -> bytes:
    """google.rpc.RetryInfo{retry_delay: Duration}, encoded by hand (two varints)."""
    seconds, millis = divmod(retry_after_ms, 1000)
    duration = b""
    if seconds:
        duration += b"\x08" + _varint(seconds)
    if millis:
        duration += b"\x10" + _varint(millis * 1_000_000)
    return b"\x0a" + _varint(len(duration)) + duration


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class RetryLater(ConnectError):
    """`unavailable` with a hint: the standard RetryInfo detail, and the `retry-after-ms`
    response header the front doors add."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        detail = Any(type_url=RETRY_INFO_TYPE, value=retry_info(retry_after_ms))
        super().__init__(Code.UNAVAILABLE, message, [detail])
        self.retry_after_ms = retry_after_ms


def retry_headers(retry_after_ms: int) -> list[tuple[bytes, bytes]]:
    """`retry-after-ms`, and the standard `retry-after` in whole seconds (at least 1)."""
    return [
        (b"retry-after-ms", str(retry_after_ms).encode()),
        (b"retry-after", str(max(1, math.ceil(retry_after_ms / 1000))).encode()),
    ]
