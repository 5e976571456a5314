"""Did the server keep its promises? Judged from what the clients saw and what it lists.

Pure: the caller fetches the lists (API pages, PostgreSQL rows); this module only compares.
Each check names the invariant it guards (as the README lists them):

- I1 no over-issue, I2 unique codes, I3 never early (nor at/after the end), I4 one per user,
- I5 every acknowledged coupon is recorded (a success a client received is in the list),
- plus: nothing is listed that no client received (unless its response was lost, or the
  service answered that its outcome is unknown: PostgreSQL failed while recording it), the number
  issued equals min(stock, users who asked while the campaign was open), and the campaign
  opened on time (no "not started" answer to a request that reached it after the start).

Times compare in the server's clock: client times are shifted by the measured offset and
given the benefit of its uncertainty, so only a difference the clock error cannot explain is
a violation. The end is the one the service kept: a campaign ended by hand (EndCampaign)
during the run, as the API reads it back, closed then, before any scheduled end.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from coupon_loadtest.clock import ClockOffset
from coupon_loadtest.records import LOST, NOT_OPEN, OK, OUTCOME_UNKNOWN, SOLD_OUT, Observations

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Plan:
    """The campaign as the run set it up, before any load."""

    campaign_id: str
    total_coupons: int
    starts_at_ns: int
    ends_at_ns: int | None = None
    # Coupons already issued before the run (when targeting an existing campaign).
    baseline_codes: frozenset[str] = frozenset()

    @property
    def stock(self) -> int:
        return self.total_coupons - len(self.baseline_codes)


@dataclass(frozen=True)
class CampaignFacts:
    total_coupons: int
    issued_count: int
    starts_at_ns: int
    ends_at_ns: int | None
    ended_at_ns: int | None = None  # when EndCampaign ended it; None: not ended by hand


@dataclass(frozen=True)
class ListedCoupon:
    user_id: str
    code: str
    issued_at_ns: int


@dataclass(frozen=True)
class Ledger:
    """The campaign's issued coupons as one source lists them after the run."""

    source: str  # "api" or "database"
    campaign: CampaignFacts
    coupons: Sequence[ListedCoupon]
    # Database only: codes of this campaign that another campaign holds too (I2 is global).
    codes_used_elsewhere: Sequence[str] = ()


@dataclass(frozen=True)
class Check:
    name: str
    invariant: str
    source: str
    passed: bool
    detail: str
    examples: tuple[str, ...] = ()
    # False: the check could not be made (its source could not be read), which is no
    # violation but no pass either.
    done: bool = True

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "invariant": self.invariant,
            "source": self.source,
            "passed": self.passed,
            "detail": self.detail,
            "examples": list(self.examples),
            "done": self.done,
        }


@dataclass(frozen=True)
class Verification:
    checks: tuple[Check, ...]
    facts: dict[str, object]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        """Checks made that failed: violations."""
        return [check for check in self.checks if not check.passed and check.done]

    @property
    def not_done(self) -> list[Check]:
        return [check for check in self.checks if not check.done]

    def as_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "sources": sorted({check.source for check in self.checks}),
            "facts": self.facts,
            "checks": [check.as_dict() for check in self.checks],
        }


@dataclass
class ClientView:
    """What the clients saw, keyed by user id, in the server's clock where times matter."""

    codes_by_user: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    fresh_by_user: Counter[str] = field(default_factory=Counter)
    users_by_code: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # Users the campaign answered as open: they got a coupon or were told it is sold out.
    demand: set[str] = field(default_factory=set)
    lost_users: set[str] = field(default_factory=set)
    lost_requests: int = 0
    # Users answered `unavailable` with "outcome unknown": their coupon may exist.
    unknown_users: set[str] = field(default_factory=set)
    unknown_requests: int = 0
    # Counts, and the first few as examples: a broken server can produce millions.
    early_count: int = 0
    early_successes: list[str] = field(default_factory=list)
    late_count: int = 0
    late_successes: list[str] = field(default_factory=list)
    refused_while_open: list[str] = field(default_factory=list)
    refused_while_open_count: int = 0
    mismatched: list[str] = field(default_factory=list)

    @property
    def received(self) -> int:
        return sum(len(codes) for codes in self.codes_by_user.values())


def _iso(ns: int) -> str:
    text = datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def summarize(observations: Observations, plan: Plan, clock: ClockOffset) -> ClientView:
    view = ClientView()
    uid = observations.user_id
    wall = observations.wall_ns
    u = clock.uncertainty_ns
    starts = plan.starts_at_ns
    ends = plan.ends_at_ns
    for user, outcome, sent, done in zip(
        observations.user,
        observations.outcome,
        observations.sent_ns,
        observations.done_ns,
        strict=True,
    ):
        if outcome in (OK, SOLD_OUT):
            view.demand.add(uid(user))
        elif outcome == LOST:
            view.lost_users.add(uid(user))
            view.lost_requests += 1
        elif outcome == OUTCOME_UNKNOWN:
            view.unknown_users.add(uid(user))
            view.unknown_requests += 1
        elif outcome == NOT_OPEN:
            # Reached the server after the start and was answered before the end, even
            # with the clock error stacked against us: it should have been served.
            earliest_arrival = clock.to_server(wall(sent)) - u
            latest_answer = clock.to_server(wall(done)) + u
            if earliest_arrival >= starts and (ends is None or latest_answer < ends):
                view.refused_while_open_count += 1
                if len(view.refused_while_open) < MAX_EXAMPLES:
                    view.refused_while_open.append(
                        f"user {uid(user)} sent at {_iso(earliest_arrival)} (server clock, "
                        f"earliest) was told the campaign is not open"
                    )
    for success in observations.successes():
        request = success.request
        holder = uid(request.user)
        view.codes_by_user[holder].add(success.code)
        view.users_by_code[success.code].add(holder)
        if not success.already_issued:
            view.fresh_by_user[holder] += 1
        latest_receipt = clock.to_server(wall(request.done_ns)) + u
        if latest_receipt < starts:
            view.early_count += 1
        if latest_receipt < starts and len(view.early_successes) < MAX_EXAMPLES:
            view.early_successes.append(
                f"user {holder} received {success.code} by {_iso(latest_receipt)} (server clock, "
                f"latest), {(starts - latest_receipt) / 1e6:.3f} ms before starts_at"
            )
        if ends is not None and not success.already_issued:
            earliest_arrival = clock.to_server(wall(request.sent_ns)) - u
            if earliest_arrival >= ends:
                view.late_count += 1
            if earliest_arrival >= ends and len(view.late_successes) < MAX_EXAMPLES:
                view.late_successes.append(
                    f"user {holder} was issued {success.code} for a request sent at "
                    f"{_iso(earliest_arrival)} (server clock, earliest), after ends_at"
                )
    view.mismatched = list(observations.mismatched)
    return view


def _check(
    name: str, invariant: str, source: str, problems: Sequence[str], ok_detail: str, bad: str
) -> Check:
    if problems:
        return Check(name, invariant, source, False, bad, tuple(problems[:MAX_EXAMPLES]))
    return Check(name, invariant, source, True, ok_detail)


def client_checks(view: ClientView) -> list[Check]:
    src = "client"
    shared_codes = [
        f"{code} was received by {len(users)} users: {', '.join(sorted(users)[:3])}"
        for code, users in view.users_by_code.items()
        if len(users) > 1
    ]
    multi_code = [
        f"user {user} received {len(codes)} different codes: {', '.join(sorted(codes)[:3])}"
        for user, codes in view.codes_by_user.items()
        if len(codes) > 1
    ]
    multi_fresh = [
        f"user {user} was told {n} times that a new coupon was issued"
        for user, n in view.fresh_by_user.items()
        if n > 1
    ]
    # A repeat answer ("already issued") for a coupon no client saw being issued can only
    # be explained by a lost response to that user's earlier request, or one whose outcome
    # the service said is unknown.
    unexplained_repeat = [
        f"user {user} got already_issued=true but no client was ever issued that coupon"
        for user in view.codes_by_user
        if view.fresh_by_user[user] == 0
        and user not in view.lost_users
        and user not in view.unknown_users
    ]
    return [
        _check(
            "no code received by two users",
            "I2",
            src,
            shared_codes,
            f"{len(view.users_by_code)} distinct codes received, each by one user",
            f"{len(shared_codes)} codes were handed to more than one user",
        ),
        _check(
            "no success received before starts_at",
            "I3",
            src,
            view.early_successes + view.late_successes,
            "every success arrived after starts_at (within the clock uncertainty)",
            f"{view.early_count} successes arrived before starts_at and "
            f"{view.late_count} were issued after ends_at",
        ),
        _check(
            "repeat requests return the same coupon",
            "I4",
            src,
            multi_code + multi_fresh + unexplained_repeat,
            "every user received at most one code, issued once",
            f"{len(multi_code)} users received several codes, {len(multi_fresh)} were issued "
            f"anew more than once, {len(unexplained_repeat)} got an unexplained repeat",
        ),
        _check(
            "coupons match their requests",
            "",
            src,
            view.mismatched,
            "every coupon named the requesting user and campaign",
            f"{len(view.mismatched)} coupons named another user or campaign",
        ),
        _check(
            "campaign opened on time",
            "I6",
            src,
            view.refused_while_open,
            "no request that arrived while the campaign was open was refused as not open",
            f"{view.refused_while_open_count} requests that arrived after starts_at were "
            "refused with failed_precondition",
        ),
    ]


def ledger_checks(ledger: Ledger, plan: Plan, view: ClientView) -> list[Check]:
    src = ledger.source
    facts = ledger.campaign
    coupons = ledger.coupons
    run_coupons = [c for c in coupons if c.code not in plan.baseline_codes]
    total = plan.total_coupons

    over = []
    if len(coupons) > total:
        over.append(f"{len(coupons)} coupons listed for a stock of {total}")
    if facts.issued_count > total:
        over.append(f"issued_count {facts.issued_count} exceeds total_coupons {total}")

    consistency = []
    if facts.issued_count != len(coupons):
        consistency.append(f"issued_count {facts.issued_count} but {len(coupons)} coupons listed")
    if facts.total_coupons != total:
        consistency.append(f"total_coupons changed from {total} to {facts.total_coupons}")
    if facts.starts_at_ns != plan.starts_at_ns:
        consistency.append(
            f"starts_at changed from {_iso(plan.starts_at_ns)} to {_iso(facts.starts_at_ns)}"
        )

    code_counts = Counter(c.code for c in coupons)
    duplicates = [f"{code} listed {n} times" for code, n in code_counts.items() if n > 1]
    duplicates += [
        f"{code} is also a coupon of another campaign" for code in ledger.codes_used_elsewhere
    ]

    # Every coupon listed, as I1, I2 and I4 count them: one issued before the run (on a
    # campaign targeted with --campaign-id) outside the window breaks I3 all the same.
    outside = []
    for c in coupons:
        if c.issued_at_ns < plan.starts_at_ns:
            outside.append(
                f"{c.code} (user {c.user_id}) issued at {_iso(c.issued_at_ns)}, "
                f"{(plan.starts_at_ns - c.issued_at_ns) / 1e6:.3f} ms before starts_at"
            )
        elif plan.ends_at_ns is not None and c.issued_at_ns >= plan.ends_at_ns:
            outside.append(
                f"{c.code} (user {c.user_id}) issued at {_iso(c.issued_at_ns)}, after ends_at"
            )

    user_counts = Counter(c.user_id for c in coupons)
    multi = [f"user {user} holds {n} coupons" for user, n in user_counts.items() if n > 1]

    listed_by_user: dict[str, set[str]] = defaultdict(set)
    for c in coupons:
        listed_by_user[c.user_id].add(c.code)
    unlisted = [
        f"user {user} received {code}, which is not listed"
        for user, codes in view.codes_by_user.items()
        for code in codes
        if code not in listed_by_user.get(user, ())
    ]

    phantom: list[str] = []
    excused = 0
    unknown = 0
    for c in run_coupons:
        if c.code in view.codes_by_user.get(c.user_id, ()):
            continue
        if c.user_id in view.lost_users:
            excused += 1
            continue
        if c.user_id in view.unknown_users:
            # Answered "outcome unknown": the service said it may have issued it.
            unknown += 1
            continue
        phantom.append(f"{c.code} listed for user {c.user_id}, who never received it")
    why = [f"{excused} excused: their responses were lost"] if excused else []
    why += [f"outcome unknown: {unknown}"] if unknown else []

    lo = min(plan.stock, len(view.demand))
    hi = min(plan.stock, len(view.demand | view.lost_users | view.unknown_users))
    issued = len(run_coupons)
    demand_problems = []
    if not lo <= issued <= hi:
        expected = f"{lo}" if lo == hi else f"between {lo} and {hi}"
        demand_problems.append(
            f"{issued} issued, expected {expected} = min(stock {plan.stock}, "
            f"{len(view.demand)} users answered while open"
            + (f", +{hi - lo} with lost or outcome-unknown responses)" if hi != lo else ")")
        )
        if issued < lo:
            # Stock held by a request whose server process died mid-run is the service's
            # again only after its pending lease: a run that ends sooner cannot see it issued.
            demand_problems.append(
                f"{lo - issued} short: if a server process died during the run, its admitted "
                "stock returns after the service's pending lease (COUPON_PENDING_LEASE_SECONDS, "
                "15 s by default): run with --tail longer than it to see it issued"
            )

    return [
        _check(
            "no over-issue",
            "I1",
            src,
            over,
            f"{len(coupons)} coupons listed, issued_count {facts.issued_count}, stock {total}",
            "more coupons than the stock",
        ),
        _check(
            "campaign record consistent",
            "",
            src,
            consistency,
            f"issued_count matches the {len(coupons)} listed coupons",
            "the campaign record disagrees with its coupons or with how it was created",
        ),
        _check(
            "no duplicate code",
            "I2",
            src,
            duplicates,
            f"{len(code_counts)} codes, all distinct",
            f"{len(duplicates)} duplicated codes",
        ),
        _check(
            "no coupon issued outside the window",
            "I3",
            src,
            outside,
            f"all {len(coupons)} coupons were issued at or after starts_at"
            + ("" if plan.ends_at_ns is None else " and before the end"),
            f"{len(outside)} coupons issued outside [starts_at, ends_at)",
        ),
        _check(
            "at most one coupon per user",
            "I4",
            src,
            multi,
            f"{len(user_counts)} users, one coupon each",
            f"{len(multi)} users hold more than one coupon",
        ),
        _check(
            "every received coupon is listed",
            "I5",
            src,
            unlisted,
            f"all {view.received} coupons clients received are listed",
            f"{len(unlisted)} coupons a client received are missing",
        ),
        _check(
            "nothing listed that no client received",
            "",
            src,
            phantom,
            "every listed coupon reached its user" + (f" ({'; '.join(why)})" if why else ""),
            f"{len(phantom)} listed coupons reached no client, and no response to their "
            "users was lost or of unknown outcome",
        ),
        _check(
            "issued = min(stock, demand)",
            "I6",
            src,
            demand_problems,
            f"{issued} issued = min(stock {plan.stock}, {len(view.demand)} users answered "
            "while open)"
            + (f" within {lo}..{hi} given lost or outcome-unknown responses" if lo != hi else ""),
            "the number issued does not match the demand",
        ),
    ]


def agreement_check(api: Ledger, database: Ledger) -> Check:
    api_set = {(c.user_id, c.code) for c in api.coupons}
    db_set = {(c.user_id, c.code) for c in database.coupons}
    problems = [
        f"API lists {code} for {user}, the database does not"
        for user, code in sorted(api_set - db_set)
    ]
    problems += [
        f"the database holds {code} for {user}, the API does not list it"
        for user, code in sorted(db_set - api_set)
    ]
    return _check(
        "API and database agree",
        "",
        "api+database",
        problems,
        f"the same {len(db_set)} coupons in both",
        f"{len(api_set - db_set)} coupons only in the API, "
        f"{len(db_set - api_set)} only in the database",
    )


UNREAD_CHECK = "read back the issued coupons"


def kept_window(plan: Plan, ledgers: Sequence[Ledger]) -> Plan:
    """The plan with the end the service kept: the kill switch's, when EndCampaign ended
    the campaign before its scheduled end. Requests after it were rightly refused as ended,
    and a coupon issued at or after it is late."""
    ended = min(
        (e for e in (ledger.campaign.ended_at_ns for ledger in ledgers) if e is not None),
        default=None,
    )
    if ended is None or (plan.ends_at_ns is not None and plan.ends_at_ns <= ended):
        return plan
    return replace(plan, ends_at_ns=ended)


def verify(
    observations: Observations,
    plan: Plan,
    clock: ClockOffset,
    ledgers: Sequence[Ledger],
    unread: Mapping[str, str] | None = None,
) -> Verification:
    """`unread`: sources ("api", "database") that could not be read back, and why; their
    checks are marked not done."""
    plan = kept_window(plan, ledgers)
    view = summarize(observations, plan, clock)
    checks = client_checks(view)
    for ledger in ledgers:
        checks.extend(ledger_checks(ledger, plan, view))
    for source, why in (unread or {}).items():
        checks.append(Check(UNREAD_CHECK, "", source, False, f"not done: {why}", done=False))
    by_source = {ledger.source: ledger for ledger in ledgers}
    if "api" in by_source and "database" in by_source:
        checks.append(agreement_check(by_source["api"], by_source["database"]))
    facts: dict[str, object] = {
        "stock": plan.stock,
        "users_answered_while_open": len(view.demand),
        "users_with_lost_responses": len(view.lost_users),
        "lost_responses": view.lost_requests,
        "users_with_outcome_unknown": len(view.unknown_users),
        "outcome_unknown_responses": view.unknown_requests,
        "coupons_received": view.received,
        "clock": clock.as_dict(),
    }
    return Verification(tuple(checks), facts)
