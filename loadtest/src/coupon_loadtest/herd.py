"""The crowd model: N users who all press at the start, honour the retry hint, give up.

Pure: when each user first presses, what a user does with each answer, and what the run's
per-user records add up to. The sending is herd_worker's.

A user presses once at the campaign's start (or, when it is open already, at the load's
start) plus a random offset within the spread. An
answer is final when it is a coupon (new or already issued), "sold out" or "campaign has
ended"; any other
Connect error is final too, as an error. `unavailable` (the server shed the request, maybe
with a retry hint), "not started yet" and a lost response (time-out, broken connection) are
not: the user presses again after the hint plus up to half of it again (or, without a
hint, a delay drawn uniformly between zero and an exponential backoff from the floor),
clamped to [floor, cap].
A user whose next press would come after their patience (counted from their first press)
gives up.
"""

from __future__ import annotations

import bisect
import math
import random
from array import array
from dataclasses import dataclass
from enum import IntEnum

from coupon_loadtest.records import (
    ENDED_PREFIX,
    LOST,
    NOT_OPEN,
    OK,
    OUTCOME_UNKNOWN,
    SOLD_OUT,
    UNAVAILABLE,
)

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000
_MAX_BACKOFF_DOUBLINGS = 16


class Final(IntEnum):
    """How a user's presses ended; NONE while pressing, and for those who gave up."""

    NONE = 0
    COUPON = 1
    SOLD_OUT = 2
    ERROR = 3
    ENDED = 4  # the campaign has ended: nothing more to get, like sold out


@dataclass(frozen=True)
class RetryPolicy:
    floor_ns: int
    cap_ns: int
    patience_ns: int

    def __post_init__(self) -> None:
        if not 0 < self.floor_ns <= self.cap_ns:
            raise ValueError("the retry floor must be positive and at most the cap")
        if self.patience_ns <= 0:
            raise ValueError("patience must be positive")


# A hinted retry waits the hint plus up to this share of it again, so that a crowd told the
# same hint does not come back all at once.
HINT_JITTER = 0.5


def retry_delay_ns(
    hint_ms: int | None, attempt: int, policy: RetryPolicy, rng: random.Random
) -> int:
    """The server's hint honoured, with jitter on top (hint x (1 + U(0, HINT_JITTER))), or,
    when there is none, full jitter on an exponential backoff from the floor (`attempt` =
    presses so far); never under the floor, never over the cap."""
    if hint_ms is not None:
        delay = int(hint_ms * NS_PER_MS * (1 + rng.random() * HINT_JITTER))
    else:
        base = policy.floor_ns << min(max(attempt - 1, 0), _MAX_BACKOFF_DOUBLINGS)
        delay = int(rng.random() * base)
    return min(policy.cap_ns, max(policy.floor_ns, delay))


@dataclass(frozen=True)
class Decision:
    final: Final  # NONE: press again at `retry_at_ns`, unless `gave_up`
    retry_at_ns: int = 0
    gave_up: bool = False


def decide(
    outcome: int,
    hint_ms: int | None,
    *,
    attempt: int,
    now_ns: int,
    first_ns: int,
    policy: RetryPolicy,
    rng: random.Random,
    message: str = "",
) -> Decision:
    """What a user does with an answer received at `now_ns`, after `attempt` presses, the
    first at `first_ns`; `message` is an error's, as the server sent it."""
    if outcome == OK:
        return Decision(Final.COUPON)
    if outcome == SOLD_OUT:
        return Decision(Final.SOLD_OUT)
    if outcome == NOT_OPEN and message.startswith(ENDED_PREFIX):
        # "Not started yet" is worth pressing again, "ended" is not (records.ENDED_PREFIX).
        return Decision(Final.ENDED)
    if outcome not in (UNAVAILABLE, OUTCOME_UNKNOWN, NOT_OPEN, LOST):
        return Decision(Final.ERROR)
    # After an outcome unknown the coupon may exist: pressing again gets it back.
    hinted = outcome in (UNAVAILABLE, OUTCOME_UNKNOWN)
    at = now_ns + retry_delay_ns(hint_ms if hinted else None, attempt, policy, rng)
    if at - first_ns > policy.patience_ns:
        return Decision(Final.NONE, gave_up=True)
    return Decision(Final.NONE, retry_at_ns=at)


def press_origin_ns(starts_rel_ns: int) -> int:
    """When the herd begins to press, in ns after the load start: at the campaign's start,
    or at once when the campaign is open already (targeted with --campaign-id). Each user's
    patience counts from their own first press, so it is never spent before it."""
    return max(starts_rel_ns, 0)


def first_presses(users: int, spread_ns: int, seed: int) -> list[int]:
    """Each user's first press, in ns after the start, in the users' order: uniform over
    the spread (everyone at once when it is zero)."""
    rng = random.Random(seed)
    return [int(rng.random() * spread_ns) for _ in range(users)]


class UserBook:
    """One process's users: when each first pressed, when and how each ended, and how many
    times each pressed. Columns of machine integers, sent to the parent as they are."""

    def __init__(self, first_ns: list[int]) -> None:
        count = len(first_ns)
        self.first_ns = array("q", first_ns)  # intended, ns after the load start
        self.final_ns = array("q", [-1] * count)
        self.final = array("B", [Final.NONE] * count)
        self.presses = array("I", [0] * count)
        self.gave_up = array("B", [0] * count)

    def __len__(self) -> int:
        return len(self.first_ns)

    def extend(self, other: UserBook) -> None:
        self.first_ns.extend(other.first_ns)
        self.final_ns.extend(other.final_ns)
        self.final.extend(other.final)
        self.presses.extend(other.presses)
        self.gave_up.extend(other.gave_up)

    @classmethod
    def empty(cls) -> UserBook:
        return cls([])


@dataclass(frozen=True)
class HerdSummary:
    users: int
    got_coupon: int
    got_sold_out: int
    got_error: int
    got_ended: int  # told the campaign has ended
    gave_up: int
    # Of those, users who never sent a request: their press was still waiting for one of
    # the tool's connections when their patience ran out (the tool's queue, not the server).
    gave_up_before_sending: int
    unanswered: int  # neither final nor given up when the run ended
    answered_within_patience: float  # share of users with a final answer in their patience
    answered_within_s: dict[str, float]  # seconds after starts_at -> share of users
    time_to_final_ms: dict[str, float]  # from the user's first press: percentiles
    retries: dict[str, float]  # per user: mean and percentiles
    retries_histogram: dict[str, int]  # "0", "1", ... "10+" -> users
    sell_out_s: float | None  # starts_at to the last coupon issued, when sold out
    sold_out: bool  # the campaign
    goodput_bucket_s: float
    goodput_per_s: list[float]  # new coupons answered per second, bucket by bucket

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


WITHIN_S = (1.0, 2.0, 5.0, 10.0)
# Final answers a user was meant to get: the coupon, or that there is none left to get.
_ANSWERED = (Final.COUPON, Final.SOLD_OUT, Final.ENDED)
_PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0))


def _percentile(ordered: list[int], q: float) -> int:
    """Nearest rank of an ascending list."""
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(
    book: UserBook,
    *,
    starts_rel_ns: int,
    patience_ns: int,
    fresh_done_ns: list[int],
    sell_out_s: float | None,
    sold_out: bool,
    bucket_s: float = 0.1,
) -> HerdSummary:
    """The run's figures from every user's record; `fresh_done_ns` are the times (ns after
    the load start) at which new coupons were answered, for goodput over time."""
    users = len(book)
    finals = [Final(f) for f in book.final]
    answered = [book.final_ns[i] - book.first_ns[i] for i in range(users) if finals[i] in _ANSWERED]
    since_start = sorted(
        book.final_ns[i] - starts_rel_ns for i in range(users) if finals[i] in _ANSWERED
    )
    ordered = sorted(answered)
    presses = sorted(book.presses)
    retries = [max(0, p - 1) for p in presses]
    histogram: dict[str, int] = {}
    for r in retries:
        key = str(r) if r < 10 else "10+"
        histogram[key] = histogram.get(key, 0) + 1
    width_ns = round(bucket_s * NS_PER_S)
    goodput: list[float] = []
    for done in fresh_done_ns:
        index = max(0, (done - starts_rel_ns) // width_ns)
        while len(goodput) <= index:
            goodput.append(0.0)
        goodput[index] += 1 / bucket_s
    gave_up = sum(book.gave_up)
    final_any = sum(1 for f in finals if f is not Final.NONE)
    return HerdSummary(
        users=users,
        got_coupon=finals.count(Final.COUPON),
        got_sold_out=finals.count(Final.SOLD_OUT),
        got_error=finals.count(Final.ERROR),
        got_ended=finals.count(Final.ENDED),
        gave_up=gave_up,
        gave_up_before_sending=sum(
            1 for g, p in zip(book.gave_up, book.presses, strict=True) if g and not p
        ),
        unanswered=users - final_any - gave_up,
        answered_within_patience=(
            sum(1 for t in answered if t <= patience_ns) / users if users else 0.0
        ),
        answered_within_s={
            f"{s:g}": (
                bisect.bisect_right(since_start, round(s * NS_PER_S)) / users if users else 0.0
            )
            for s in WITHIN_S
        },
        time_to_final_ms=(
            {name: _percentile(ordered, q) / NS_PER_MS for name, q in _PERCENTILES}
            if ordered
            else {}
        ),
        retries=(
            {
                "mean": sum(retries) / len(retries),
                **{name: float(_percentile(retries, q)) for name, q in _PERCENTILES},
            }
            if retries
            else {}
        ),
        retries_histogram=dict(sorted(histogram.items(), key=lambda kv: _histogram_order(kv[0]))),
        sell_out_s=sell_out_s,
        sold_out=sold_out,
        goodput_bucket_s=bucket_s,
        goodput_per_s=[round(g, 3) for g in goodput],
    )


def answered_ns(book: UserBook) -> list[int]:
    """When each user answered (a coupon, sold out, ended) got it, ns after the load start;
    as the summary counts them: an error is an ending, not an answer."""
    return [book.final_ns[i] for i in range(len(book)) if Final(book.final[i]) in _ANSWERED]


def _histogram_order(key: str) -> int:
    return 10 if key == "10+" else int(key)
