"""When each request is due, which user sends it, and whether the generator kept up."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class OpenLoopSchedule:
    """Constant arrival rate over the whole run, interleaved across processes.

    Request j of the run is due at j / rate seconds after the load start whatever happened to
    the requests before it (open loop, as wrk2 does): a slow response never delays the next
    send, so queueing in the server shows up in the latencies instead of being hidden.
    Process k of P sends j = k, k + P, k + 2P, ... so P processes together offer exactly the
    asked rate and no two send the same j.
    """

    rate: float
    process_index: int = 0
    processes: int = 1

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be positive (got {self.rate})")
        if not 0 <= self.process_index < self.processes:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.processes})")

    def intended_ns(self, i: int) -> int:
        """Due time of this process's i-th request, in ns after the load start."""
        return math.ceil((i * self.processes + self.process_index) * NS_PER_S / self.rate)

    def due_before(self, t_ns: int) -> int:
        """How many of this process's requests are due strictly before t_ns."""
        if t_ns <= 0:
            return 0
        # Float estimate, then correct it against intended_ns so both agree exactly.
        global_due = t_ns * self.rate / NS_PER_S
        i = max(0, math.ceil((global_due - self.process_index) / self.processes))
        while i > 0 and self.intended_ns(i - 1) >= t_ns:
            i -= 1
        while self.intended_ns(i) < t_ns:
            i += 1
        return i


class UserPicker:
    """Chooses the user of each request of one process.

    Users are split between processes (process k owns users k, k + P, ...) so processes never
    need to agree on who has asked already. A request is a retry by one of this process's
    users who asked before with probability `repeat_fraction`, and always once every user the
    process owns has asked; otherwise it is the next user's first request.
    """

    def __init__(
        self,
        users: int,
        repeat_fraction: float,
        *,
        process_index: int = 0,
        processes: int = 1,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= repeat_fraction <= 1.0:
            raise ValueError(f"repeat_fraction must be in [0, 1] (got {repeat_fraction})")
        self._base = process_index
        self._step = processes
        self._owned = len(range(process_index, users, processes))
        if self._owned == 0:
            raise ValueError(f"process {process_index} of {processes} owns none of {users} users")
        self._repeat = repeat_fraction
        self._asked = 0
        self._rng = random.Random(seed * 1_000_003 + process_index)

    @property
    def owned(self) -> int:
        return self._owned

    def next(self) -> int:
        asked = self._asked
        if asked and (asked == self._owned or self._rng.random() < self._repeat):
            return self._base + self._step * self._rng.randrange(asked)
        self._asked = asked + 1
        return self._base + self._step * asked

    def local_index(self, user: int) -> int:
        """Position of one of this process's users among the users it owns."""
        return (user - self._base) // self._step


@dataclass(frozen=True)
class GeneratorVerdict:
    """Did the generator offer the asked rate? Reported, and a failure when it did not."""

    kept_up: bool
    asked_rps: float
    offered_rps: float
    due: int
    sent: int
    unsent: int
    lag_p99_ms: float
    max_lag_ms: float
    inflight_cap_waits: int
    message: str


def judge_generator(
    *,
    rate: float,
    window_ns: int,
    due: int,
    sent: int,
    lag_p99_ms: float,
    max_lag_ms: float,
    inflight_cap_waits: int,
) -> GeneratorVerdict:
    """Judge an open-loop run: every due request sent, and sent close to when it was due.

    A request the generator never got to is load the server never saw, and a request sent late
    makes the server look better than it is; either way the asked rate was not offered. A late
    send still has its latency counted from the intended time, so the latency figures stay
    honest; the verdict says whether the load was.
    """
    window_s = window_ns / NS_PER_S if window_ns > 0 else 0.0
    offered = sent / window_s if window_s else 0.0
    unsent = max(0, due - sent)
    # Sends cut off by the stop while the generator was at most max_lag behind are not a
    # shortfall: they would have gone out within the lag we tolerate anyway.
    allowed_unsent = max(1, math.ceil(rate * max_lag_ms / 1000), due // 1000)
    problems: list[str] = []
    if unsent > allowed_unsent:
        problems.append(f"{unsent} of {due} due requests were never sent")
    if lag_p99_ms > max_lag_ms:
        problems.append(f"p99 send lag {lag_p99_ms:.1f} ms exceeds the allowed {max_lag_ms:.1f} ms")
    if problems and inflight_cap_waits:
        problems.append(
            f"sends waited {inflight_cap_waits} times for a free slot under --max-inflight: "
            "answers came back too slowly for this rate (the server is saturated, or raise "
            "--max-inflight)"
        )
    elif problems:
        problems.append("the generator is saturated: add --processes or lower --rate")
    message = (
        "; ".join(problems)
        if problems
        else f"offered {offered:.0f}/s of the asked {rate:.0f}/s, p99 send lag {lag_p99_ms:.1f} ms"
    )
    return GeneratorVerdict(
        kept_up=not problems,
        asked_rps=rate,
        offered_rps=offered,
        due=due,
        sent=sent,
        unsent=unsent,
        lag_p99_ms=lag_p99_ms,
        max_lag_ms=max_lag_ms,
        inflight_cap_waits=inflight_cap_waits,
        message=message,
    )


def judge_herd_generator(
    *,
    users: int,
    window_ns: int,
    sent: int,
    gave_up_unsent: int,
    lag_p99_ms: float,
    max_lag_ms: float,
    connection_waits: int,
) -> GeneratorVerdict:
    """Judge a herd's generator: the users' presses went out, and close to when they pressed.

    A user who gave up while their press waited for one of the tool's connections never
    reached the server, and a press that waited long makes the figures measure the tool's
    queue rather than the server: either way the crowd was not offered as modelled. As for a
    burst, a few stragglers (one in a thousand) are tolerated.
    """
    window_s = window_ns / NS_PER_S
    offered = sent / window_s if window_s > 0 else 0.0
    problems: list[str] = []
    if gave_up_unsent > max(0, users // 1000):
        problems.append(
            f"{gave_up_unsent} of {users} users gave up before sending anything, waiting for "
            "one of the tool's connections"
        )
    if lag_p99_ms > max_lag_ms:
        problems.append(
            f"p99 send lag {lag_p99_ms:.1f} ms exceeds the allowed {max_lag_ms:.1f} ms "
            "(a tenth of the patience)"
        )
    if problems and connection_waits:
        problems.append(
            f"presses waited {connection_waits} times for a free connection of the tool's "
            "--connections: the figures measure the tool's queue (raise --connections)"
        )
    elif problems:
        problems.append("the generator is saturated: add --processes or fewer --users")
    message = (
        "; ".join(problems)
        if problems
        else f"every user's presses went out, p99 send lag {lag_p99_ms:.1f} ms"
    )
    return GeneratorVerdict(
        kept_up=not problems,
        asked_rps=0.0,
        offered_rps=offered,
        due=sent + gave_up_unsent,
        sent=sent,
        unsent=gave_up_unsent,
        lag_p99_ms=lag_p99_ms,
        max_lag_ms=max_lag_ms,
        inflight_cap_waits=connection_waits,
        message=message,
    )
