"""The verifier passes an honest server and fails each deliberately broken one."""

from __future__ import annotations

import dataclasses

from coupon_loadtest.verify import Ledger, ListedCoupon, Plan, Verification, verify

from .fakes import CLOCK, MS, FakeServer, Faults, Run, drive, starting_after

STOCK = 100


def run_server(
    faults: Faults | None = None,
    *,
    users: int = 300,
    requests: int = 1200,
    repeat_fraction: float = 0.2,
    lose: frozenset[int] = frozenset(),
) -> Run:
    server = FakeServer(STOCK, starting_after(0.3), faults or Faults())
    return drive(server, users=users, requests=requests, repeat_fraction=repeat_fraction, lose=lose)


def check(run: Run, *ledgers: Ledger) -> Verification:
    return verify(run.observations, run.plan, CLOCK, ledgers or (run.server.ledger(),))


def failed(verification: Verification) -> set[str]:
    return {c.name for c in verification.failures}


def test_an_honest_server_passes_every_check() -> None:
    run = run_server()

    result = check(run, run.server.ledger("api"), run.server.ledger("database"))

    assert result.passed, [c.as_dict() for c in result.failures]
    assert len(run.server.recorded) == STOCK
    assert {c.source for c in result.checks} == {"client", "api", "database", "api+database"}


def test_an_honest_server_passes_when_fewer_users_than_coupons_ask() -> None:
    result = check(run_server(users=40, requests=600))

    assert result.passed, [c.as_dict() for c in result.failures]


def test_over_issuing_server_fails() -> None:
    result = check(run_server(Faults(over_issue=5)))

    assert "no over-issue" in failed(result)
    assert "issued = min(stock, demand)" in failed(result)


def test_server_that_duplicates_codes_fails() -> None:
    result = check(run_server(Faults(duplicate_every=10)))

    assert "no duplicate code" in failed(result)
    assert "no code received by two users" in failed(result)


def test_server_that_issues_early_fails() -> None:
    result = check(run_server(Faults(opens_early_ns=50 * MS)))

    assert "no coupon issued outside the window" in failed(result)
    assert "no success received before starts_at" in failed(result)


def test_early_issue_hidden_by_backdated_timestamps_is_caught_by_when_it_arrived() -> None:
    result = check(run_server(Faults(opens_early_ns=50 * MS, backdate=True)))

    assert "no coupon issued outside the window" not in failed(result)
    assert "no success received before starts_at" in failed(result)


def test_opening_earlier_than_the_clock_error_can_resolve_is_not_a_violation() -> None:
    # 0.4 ms early, backdated: the answer may have left the server after the start, given
    # the 0.5 ms of travel and the 0.2 ms clock uncertainty.
    within = check(run_server(Faults(opens_early_ns=MS * 4 // 10, backdate=True)))
    # 2 ms early: the answer reached the client before the start, whatever the clock error.
    beyond = check(run_server(Faults(opens_early_ns=2 * MS, backdate=True)))

    assert within.passed, [c.as_dict() for c in within.failures]
    assert "no success received before starts_at" in failed(beyond)


def test_second_coupon_for_the_same_user_fails() -> None:
    result = check(run_server(Faults(new_coupon_on_repeat=True)))

    assert "at most one coupon per user" in failed(result)
    assert "repeat requests return the same coupon" in failed(result)


def test_acknowledged_coupon_missing_from_the_list_fails() -> None:
    result = check(run_server(Faults(forget_every=7)))

    assert "every received coupon is listed" in failed(result)


def test_listed_coupon_that_no_client_received_fails() -> None:
    # Every request from a new user, so no retry can pick the coupon up later.
    run = run_server(Faults(records_then_unavailable=3), users=1200, repeat_fraction=0.0)

    assert "nothing listed that no client received" in failed(check(run))


def test_listed_coupon_whose_response_was_lost_is_excused_and_reported() -> None:
    # Requests 300.. arrive just after the start; the first five answers are lost.
    run = run_server(users=1200, repeat_fraction=0.0, lose=frozenset(range(300, 305)))

    result = check(run)

    assert result.passed, [c.as_dict() for c in result.failures]
    assert result.facts["lost_responses"] == 5
    nothing_unreceived = next(c for c in result.checks if c.name.startswith("nothing listed"))
    assert "5 excused" in nothing_unreceived.detail


def test_server_that_opens_late_fails() -> None:
    result = check(run_server(Faults(opens_late_ns=100 * MS)))

    assert "campaign opened on time" in failed(result)


def test_server_that_never_opens_fails() -> None:
    result = check(run_server(Faults(opens_late_ns=3600 * 10**9)))

    assert "campaign opened on time" in failed(result)


def test_server_that_says_sold_out_with_stock_left_fails() -> None:
    result = check(run_server(Faults(sold_out_early_by=10)))

    assert failed(result) == {"issued = min(stock, demand)"}
    # Short of the stock: the failure says what else than a fault explains it.
    (short,) = result.failures
    assert any(e.startswith("10 short:") and "--tail longer than" in e for e in short.examples), (
        short.examples
    )


def test_coupon_of_another_user_fails() -> None:
    result = check(run_server(Faults(foreign_coupon_on_repeat=True)))

    assert "coupons match their requests" in failed(result)
    assert "no code received by two users" in failed(result)


def test_api_and_database_that_disagree_fail() -> None:
    run = run_server()
    api = run.server.ledger("api")
    database = dataclasses.replace(run.server.ledger("database"), coupons=run.server.recorded[1:])

    result = check(run, api, database)

    assert "API and database agree" in failed(result)


def test_code_also_held_by_another_campaign_fails() -> None:
    run = run_server()
    database = dataclasses.replace(
        run.server.ledger("database"), codes_used_elsewhere=[run.server.recorded[0].code]
    )

    assert "no duplicate code" in failed(check(run, database))


def test_issued_count_that_disagrees_with_the_list_fails() -> None:
    run = run_server()
    ledger = run.server.ledger()
    wrong = dataclasses.replace(
        ledger, campaign=dataclasses.replace(ledger.campaign, issued_count=STOCK - 1)
    )

    assert "campaign record consistent" in failed(check(run, wrong))


def test_coupons_issued_before_the_run_are_not_counted_as_the_runs() -> None:
    # An existing campaign: ten coupons went to other users before this run started.
    server = FakeServer(STOCK + 10, starting_after(0.3))
    earlier = [ListedCoupon(f"someone-{i}", f"OLD{i}", starting_after(0.3)) for i in range(10)]
    server.recorded.extend(earlier)
    server.issued = 10
    run = drive(server, users=300, requests=1200)
    plan = Plan(
        run.plan.campaign_id,
        STOCK + 10,
        run.plan.starts_at_ns,
        baseline_codes=frozenset(c.code for c in earlier),
    )

    result = verify(run.observations, plan, CLOCK, [server.ledger()])

    assert result.passed, [c.as_dict() for c in result.failures]


def test_a_coupon_issued_before_the_run_outside_the_window_fails() -> None:
    # An existing campaign whose earlier coupons include one stamped an hour before its
    # start: I3 judges every coupon listed, as I1, I2 and I4 do, not just the run's.
    server = FakeServer(STOCK + 2, starting_after(0.3))
    starts = starting_after(0.3)
    earlier = [
        ListedCoupon("someone", "OLD0", starts),
        ListedCoupon("eve", "OLD1", starts - 3600 * 1000 * MS),
    ]
    server.recorded.extend(earlier)
    server.issued = 2
    run = drive(server, users=300, requests=1200)
    plan = dataclasses.replace(
        run.plan, total_coupons=STOCK + 2, baseline_codes=frozenset(c.code for c in earlier)
    )

    result = verify(run.observations, plan, CLOCK, [server.ledger()])

    assert failed(result) == {"no coupon issued outside the window"}
    (outside,) = result.failures
    assert outside.examples[0].startswith("OLD1 (user eve) issued at ")
