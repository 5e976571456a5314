"""A coupon server in a few lines, with switches that break each promise, and a client that
drives it the way the load tool's workers do, so the verifier can be fed real-looking runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from coupon_loadtest.clock import ClockOffset
from coupon_loadtest.records import LOST, NOT_OPEN, OK, SOLD_OUT, UNAVAILABLE, Observations
from coupon_loadtest.schedule import OpenLoopSchedule, UserPicker
from coupon_loadtest.verify import CampaignFacts, Ledger, ListedCoupon, Plan
from coupon_loadtest.wire import IssueReply

MS = 1_000_000
NS_PER_S = 1_000_000_000
T0 = 1_800_000_000 * NS_PER_S  # the client's load start, wall clock
PREFIX = "lt-test-"
CAMPAIGN = "0194b2a0-0000-7000-8000-000000000001"
# The server's clock runs ahead of the client's; the verifier must work in the server's.
SERVER_AHEAD_NS = 3 * MS
CLOCK = ClockOffset(SERVER_AHEAD_NS, MS // 5, "test")
LATENCY_NS = MS


@dataclass
class Faults:
    over_issue: int = 0  # coupons issued beyond the stock
    duplicate_every: int = 0  # every n-th code repeats the one before it
    opens_early_ns: int = 0  # admits requests this long before starts_at
    backdate: bool = False  # ... and stamps those coupons with starts_at, hiding it
    new_coupon_on_repeat: bool = False
    forget_every: int = 0  # every n-th coupon is acknowledged but never recorded
    records_then_unavailable: int = 0  # records n coupons but tells their users "unavailable"
    opens_late_ns: int = 0  # keeps saying "not started" this long after starts_at
    sold_out_early_by: int = 0  # says "sold out" with this many coupons left
    foreign_coupon_on_repeat: bool = False  # a repeat gets another user's coupon


@dataclass
class FakeServer:
    stock: int
    starts_at_ns: int
    faults: Faults = field(default_factory=Faults)
    recorded: list[ListedCoupon] = field(default_factory=list)
    holders: dict[str, ListedCoupon] = field(default_factory=dict)
    issued: int = 0

    def issue(self, user_id: str, now_ns: int) -> IssueReply:
        f = self.faults
        opens_at = self.starts_at_ns - f.opens_early_ns + f.opens_late_ns
        if now_ns < opens_at:
            return IssueReply(NOT_OPEN, message="campaign has not started yet")
        held = self.holders.get(user_id)
        if held is not None and not f.new_coupon_on_repeat:
            if f.foreign_coupon_on_repeat:
                other = next(c for c in self.holders.values() if c.user_id != user_id)
                return self._reply(other, already=True)
            return self._reply(held, already=True)
        if self.issued >= self.stock + f.over_issue - f.sold_out_early_by:
            return IssueReply(SOLD_OUT, message="sold out")
        self.issued += 1
        n = self.issued
        code = f"C{n - 1 if f.duplicate_every and n % f.duplicate_every == 0 else n}"
        issued_at = max(now_ns, self.starts_at_ns) if f.backdate else now_ns
        coupon = ListedCoupon(user_id, code, issued_at)
        if not (f.forget_every and n % f.forget_every == 0):
            self.recorded.append(coupon)
        if n <= f.records_then_unavailable:
            # Worse than a lost response: the server says nothing was issued.
            return IssueReply(UNAVAILABLE, message="try again")
        self.holders[user_id] = coupon
        return self._reply(coupon, already=False)

    @staticmethod
    def _reply(coupon: ListedCoupon, *, already: bool) -> IssueReply:
        return IssueReply(
            OK,
            code=coupon.code,
            issued_at_ns=coupon.issued_at_ns,
            already_issued=already,
            user_id=coupon.user_id,
            campaign_id=CAMPAIGN,
        )

    def ledger(self, source: str = "api") -> Ledger:
        return Ledger(
            source=source,
            campaign=CampaignFacts(
                total_coupons=self.stock,
                issued_count=len(self.recorded),
                starts_at_ns=self.starts_at_ns,
                ends_at_ns=None,
            ),
            coupons=list(self.recorded),
        )


@dataclass
class Run:
    observations: Observations
    plan: Plan
    server: FakeServer


def drive(
    server: FakeServer,
    *,
    users: int,
    requests: int,
    rate: float = 1000.0,
    repeat_fraction: float = 0.2,
    lose: frozenset[int] = frozenset(),
) -> Run:
    """Send `requests` at `rate` from T0, the way one worker process would.

    Requests numbered in `lose` reach the server, but their answers never come back.
    """
    observations = Observations(PREFIX, T0)
    schedule = OpenLoopSchedule(rate)
    picker = UserPicker(users, repeat_fraction, seed=7)
    for i in range(requests):
        sent = schedule.intended_ns(i)
        user = picker.next()
        arrives = T0 + sent + SERVER_AHEAD_NS + LATENCY_NS // 2
        reply = server.issue(observations.user_id(user), arrives)
        outcome = LOST if i in lose else reply.outcome
        row = observations.record(user, sent, sent, sent + LATENCY_NS, outcome)
        if outcome == OK:
            observations.record_success(
                row, reply.code, reply.issued_at_ns, already_issued=reply.already_issued
            )
            if reply.user_id != observations.user_id(user):
                observations.mismatched.append(f"{reply.code} for {reply.user_id}")
    plan = Plan(CAMPAIGN, server.stock, server.starts_at_ns)
    return Run(observations, plan, server)


def starting_after(seconds: float) -> int:
    """starts_at (server clock) `seconds` after the client's T0."""
    return T0 + SERVER_AHEAD_NS + round(seconds * NS_PER_S)
