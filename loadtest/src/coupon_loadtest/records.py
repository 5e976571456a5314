"""What the clients saw: one compact row per request, and the coupon of every success.

Columns of machine integers rather than an object per request, so a million requests cost
about 30 MB and cross process boundaries as a handful of byte buffers.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from connectrpc.code import Code

# Outcome of a request: "ok", a Connect error code the server answered with, "lost": no
# answer we can trust (timeout, broken connection, a response that is not Connect), or
# "outcome_unknown": `unavailable` from a service that says it may have issued the coupon
# all the same (PostgreSQL failed while recording it); after either, the server may or may
# not have issued a coupon, and a retry returns it if it did.
OUTCOMES: tuple[str, ...] = ("ok", *(code.value for code in Code), "lost", "outcome_unknown")
OUTCOME_INDEX: dict[str, int] = {name: i for i, name in enumerate(OUTCOMES)}
OK = OUTCOME_INDEX["ok"]
LOST = OUTCOME_INDEX["lost"]
OUTCOME_UNKNOWN = OUTCOME_INDEX["outcome_unknown"]
SOLD_OUT = OUTCOME_INDEX[Code.RESOURCE_EXHAUSTED.value]
NOT_OPEN = OUTCOME_INDEX[Code.FAILED_PRECONDITION.value]
UNAVAILABLE = OUTCOME_INDEX[Code.UNAVAILABLE.value]

# The service's `failed_precondition` says which of its two windows' edges it is at by its
# message alone (src/coupon/domain/errors.py: CampaignNotStarted, CampaignEnded); it sends
# no structured detail. The report counts the two apart, under these names: a refusal
# before the start probes early issuance, one after the end says the load went on too long.
ENDED_PREFIX = "campaign has ended"
NOT_STARTED_NAME = f"{Code.FAILED_PRECONDITION.value} (not started)"
ENDED_NAME = f"{Code.FAILED_PRECONDITION.value} (ended)"


def user_id(prefix: str, user: int) -> str:
    return f"{prefix}{user}"


@dataclass(frozen=True)
class Request:
    """One row, materialised on demand (verification and tests, not the hot path)."""

    index: int
    user: int
    intended_ns: int
    sent_ns: int
    done_ns: int
    outcome: int


@dataclass(frozen=True)
class Success:
    request: Request
    code: str
    issued_at_ns: int  # server clock, ns since the epoch
    already_issued: bool


class Observations:
    """Rows of one process, or of the whole run once merged.

    Times are ns after the load start `t0_wall_ns` (client wall clock, ns since the epoch),
    which every process shares, so rows of different processes compare directly.
    """

    def __init__(self, user_prefix: str, t0_wall_ns: int) -> None:
        self.user_prefix = user_prefix
        self.t0_wall_ns = t0_wall_ns
        self.user = array("q")
        self.intended_ns = array("q")
        self.sent_ns = array("q")
        self.done_ns = array("q")
        self.outcome = array("B")
        # One entry per "ok" row.
        self.ok_row = array("q")
        self.ok_code: list[str] = []
        self.ok_issued_at_ns = array("q")
        self.ok_already = array("B")
        # A success whose coupon names another user or campaign than the request did.
        self.mismatched: list[str] = []

    def __len__(self) -> int:
        return len(self.outcome)

    def record(self, user: int, intended_ns: int, sent_ns: int, done_ns: int, outcome: int) -> int:
        self.user.append(user)
        self.intended_ns.append(intended_ns)
        self.sent_ns.append(sent_ns)
        self.done_ns.append(done_ns)
        self.outcome.append(outcome)
        return len(self.outcome) - 1

    def record_success(
        self, row: int, code: str, issued_at_ns: int, *, already_issued: bool
    ) -> None:
        self.ok_row.append(row)
        self.ok_code.append(code)
        self.ok_issued_at_ns.append(issued_at_ns)
        self.ok_already.append(1 if already_issued else 0)

    def extend(self, other: Observations) -> None:
        if other.t0_wall_ns != self.t0_wall_ns or other.user_prefix != self.user_prefix:
            raise ValueError("observations of different runs cannot be merged")
        offset = len(self.outcome)
        self.user.extend(other.user)
        self.intended_ns.extend(other.intended_ns)
        self.sent_ns.extend(other.sent_ns)
        self.done_ns.extend(other.done_ns)
        self.outcome.extend(other.outcome)
        self.ok_row.extend(row + offset for row in other.ok_row)
        self.ok_code.extend(other.ok_code)
        self.ok_issued_at_ns.extend(other.ok_issued_at_ns)
        self.ok_already.extend(other.ok_already)
        self.mismatched.extend(other.mismatched)

    def wall_ns(self, rel_ns: int) -> int:
        return self.t0_wall_ns + rel_ns

    def user_id(self, user: int) -> str:
        return user_id(self.user_prefix, user)

    def row(self, i: int) -> Request:
        return Request(
            i, self.user[i], self.intended_ns[i], self.sent_ns[i], self.done_ns[i], self.outcome[i]
        )

    def successes(self) -> Iterator[Success]:
        for k, row in enumerate(self.ok_row):
            yield Success(
                self.row(row), self.ok_code[k], self.ok_issued_at_ns[k], bool(self.ok_already[k])
            )

    def counts(self) -> dict[str, int]:
        """Requests per outcome name (only outcomes that happened)."""
        tally = [0] * len(OUTCOMES)
        for outcome in self.outcome:
            tally[outcome] += 1
        return {OUTCOMES[i]: n for i, n in enumerate(tally) if n}
