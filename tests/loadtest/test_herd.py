"""The crowd model's pure parts: when users press, how long they wait to press again, what
they do with each answer, and what their records add up to."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from coupon.domain.errors import CampaignEnded, CampaignNotStarted
from coupon_loadtest.herd import (
    ENDED_PREFIX,
    Final,
    RetryPolicy,
    UserBook,
    answered_ns,
    decide,
    first_presses,
    press_origin_ns,
    retry_delay_ns,
    summarize,
)
from coupon_loadtest.records import LOST, NOT_OPEN, OK, OUTCOME_INDEX, SOLD_OUT, UNAVAILABLE

MS = 1_000_000
S = 1_000_000_000
POLICY = RetryPolicy(floor_ns=50 * MS, cap_ns=2 * S, patience_ns=10 * S)


def test_first_presses_fall_within_the_spread_and_repeat_with_the_seed() -> None:
    presses = first_presses(10_000, S, seed=3)

    assert len(presses) == 10_000
    assert all(0 <= p < S for p in presses)
    # Spread over the whole second, not bunched: every tenth of it gets about a tenth.
    tenths = [sum(1 for p in presses if k * S // 10 <= p < (k + 1) * S // 10) for k in range(10)]
    assert min(tenths) > 800
    assert first_presses(100, S, seed=3) == presses[:100]
    assert first_presses(100, S, seed=4) != presses[:100]


def test_without_a_spread_everyone_presses_at_the_start() -> None:
    assert first_presses(50, 0, seed=1) == [0] * 50


def test_a_herd_presses_at_the_start_or_at_once_when_the_campaign_is_open() -> None:
    assert press_origin_ns(3 * S) == 3 * S
    # Opened an hour before the load: the herd presses from the load's start, not in the
    # past, where every user's patience would be spent before their first press.
    assert press_origin_ns(-3600 * S) == 0


def test_a_hinted_delay_honours_the_hint_with_jitter_on_top() -> None:
    rng = random.Random(7)

    delays = [retry_delay_ns(1000, 1, POLICY, rng) for _ in range(5000)]

    # Never before the hint: at least it, at most half of it again, uniformly.
    assert all(1000 * MS <= d <= 1500 * MS for d in delays)
    assert 1200 * MS < sum(delays) / len(delays) < 1300 * MS
    assert min(delays) < 1010 * MS
    assert max(delays) > 1490 * MS


def test_a_hint_under_the_floor_waits_the_floor() -> None:
    delays = [retry_delay_ns(10, 1, POLICY, random.Random(k)) for k in range(100)]

    assert min(delays) == 50 * MS


def test_a_hint_beyond_the_cap_is_cut_to_the_cap() -> None:
    rng = random.Random(7)

    delays = [retry_delay_ns(60_000, 1, POLICY, rng) for _ in range(1000)]

    assert max(delays) == 2 * S


def test_without_a_hint_the_backoff_doubles_from_the_floor() -> None:
    rng = random.Random(7)

    def largest(attempt: int) -> int:
        return max(retry_delay_ns(None, attempt, POLICY, rng) for _ in range(2000))

    assert 45 * MS < largest(1) <= 50 * MS
    assert 190 * MS < largest(3) <= 200 * MS  # floor x 4
    assert largest(30) == 2 * S  # capped, however many attempts


def test_a_policy_with_the_floor_above_the_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="floor"):
        RetryPolicy(floor_ns=3 * S, cap_ns=2 * S, patience_ns=S)


@pytest.mark.parametrize(
    ("outcome", "final"),
    [
        (OK, Final.COUPON),
        (SOLD_OUT, Final.SOLD_OUT),
        (OUTCOME_INDEX["invalid_argument"], Final.ERROR),
        (OUTCOME_INDEX["not_found"], Final.ERROR),
        (OUTCOME_INDEX["internal"], Final.ERROR),
    ],
)
def test_a_coupon_sold_out_or_a_hard_error_is_final(outcome: int, final: Final) -> None:
    decision = decide(
        outcome, None, attempt=1, now_ns=S, first_ns=0, policy=POLICY, rng=random.Random(1)
    )

    assert decision.final is final
    assert not decision.gave_up


@pytest.mark.parametrize("outcome", [UNAVAILABLE, NOT_OPEN, LOST])
def test_shed_not_yet_open_or_lost_means_press_again_later(outcome: int) -> None:
    decision = decide(
        outcome, 300, attempt=1, now_ns=S, first_ns=0, policy=POLICY, rng=random.Random(1)
    )

    assert decision.final is Final.NONE and not decision.gave_up
    if outcome == UNAVAILABLE:  # only `unavailable` carries the hint: at least it
        assert S + 300 * MS <= decision.retry_at_ns <= S + 450 * MS
    else:
        assert S + 50 * MS <= decision.retry_at_ns <= S + 50 * MS


def test_a_campaign_that_has_ended_is_a_final_answer_and_not_started_is_not() -> None:
    def answer(message: str) -> Final:
        decision = decide(
            NOT_OPEN, None, attempt=1, now_ns=S, first_ns=0, policy=POLICY,
            rng=random.Random(1), message=message,
        )  # fmt: skip
        return decision.final

    # The service's messages (src/coupon/domain/errors.py).
    assert answer("campaign has ended: it ended at 2026-12-04T10:00:00Z") is Final.ENDED
    assert answer("campaign has not started yet: it starts at 2026-12-04T10:00:00Z") is (Final.NONE)


def test_the_messages_the_herd_tells_apart_are_the_services() -> None:
    now = datetime.now(UTC)
    assert str(CampaignEnded(now)).startswith(ENDED_PREFIX)
    assert not str(CampaignNotStarted(now)).startswith(ENDED_PREFIX)


def test_a_user_gives_up_rather_than_press_after_their_patience() -> None:
    # First press at 0; an answer at 9.99 s with a hint of at least the floor: the next
    # press would come after the 10 s of patience.
    decision = decide(
        UNAVAILABLE,
        1000,
        attempt=5,
        now_ns=9_990 * MS,
        first_ns=0,
        policy=POLICY,
        rng=random.Random(1),
    )

    assert decision.gave_up
    assert decision.final is Final.NONE


def book_of(rows: list[tuple[int, int, Final, int, bool]]) -> UserBook:
    """(first press, final answer or -1, how it ended, presses, gave up) per user."""
    book = UserBook([r[0] for r in rows])
    for i, (_, final_ns, final, presses, gave_up) in enumerate(rows):
        book.final_ns[i] = final_ns
        book.final[i] = final
        book.presses[i] = presses
        book.gave_up[i] = int(gave_up)
    return book


def test_the_summary_counts_every_user_once_by_how_they_ended() -> None:
    starts = 2 * S
    book = book_of(
        [
            (starts, starts + 100 * MS, Final.COUPON, 1, False),
            (starts + 200 * MS, starts + 1_500 * MS, Final.COUPON, 3, False),
            (starts + 300 * MS, starts + 4_000 * MS, Final.SOLD_OUT, 12, False),
            (starts + 400 * MS, starts + 12_000 * MS, Final.SOLD_OUT, 2, False),  # impatient
            (starts + 500 * MS, starts + 600 * MS, Final.ERROR, 1, False),
            (starts + 600 * MS, -1, Final.NONE, 4, True),
            (starts + 700 * MS, -1, Final.NONE, 1, False),  # cut off by the stop
        ]
    )

    summary = summarize(
        book,
        starts_rel_ns=starts,
        patience_ns=10 * S,
        fresh_done_ns=[starts + 50 * MS, starts + 1_550 * MS],
        sell_out_s=1.5,
        sold_out=True,
    )

    assert summary.users == 7
    assert (summary.got_coupon, summary.got_sold_out, summary.got_error) == (2, 2, 1)
    assert (summary.gave_up, summary.unanswered) == (1, 1)
    # Coupon or sold out within 10 s of the user's own first press: three of seven.
    assert summary.answered_within_patience == pytest.approx(3 / 7)
    assert summary.answered_within_s == {
        "1": pytest.approx(1 / 7),
        "2": pytest.approx(2 / 7),
        "5": pytest.approx(3 / 7),
        "10": pytest.approx(3 / 7),
    }
    assert summary.time_to_final_ms["p50"] == pytest.approx(1300.0)
    assert summary.time_to_final_ms["max"] == pytest.approx(11_600.0)
    assert summary.retries_histogram == {"0": 3, "1": 1, "2": 1, "3": 1, "10+": 1}
    assert summary.retries["max"] == 11
    # One new coupon in the first tenth of a second after the start, one in the 16th.
    assert summary.goodput_per_s[0] == pytest.approx(10.0)
    assert summary.goodput_per_s[15] == pytest.approx(10.0)
    assert sum(summary.goodput_per_s) == pytest.approx(20.0)


def test_users_told_the_campaign_ended_were_answered() -> None:
    book = book_of([(0, 100 * MS, Final.SOLD_OUT, 1, False), (0, 200 * MS, Final.ENDED, 2, False)])

    summary = summarize(
        book, starts_rel_ns=0, patience_ns=10 * S, fresh_done_ns=[], sell_out_s=None,
        sold_out=False,
    )  # fmt: skip

    assert (summary.got_sold_out, summary.got_ended, summary.unanswered) == (1, 1, 0)
    assert summary.answered_within_patience == 1.0


def test_the_users_answered_are_those_the_summary_counts_not_errors() -> None:
    book = book_of(
        [
            (0, 10, Final.COUPON, 1, False),
            (0, 20, Final.SOLD_OUT, 1, False),
            (0, 30, Final.ENDED, 1, False),
            (0, 40, Final.ERROR, 1, False),
            (0, -1, Final.NONE, 3, True),
        ]
    )

    assert answered_ns(book) == [10, 20, 30]


def test_books_of_several_processes_add_up() -> None:
    one = book_of([(0, 5, Final.COUPON, 1, False)])
    two = book_of([(1, -1, Final.NONE, 3, True), (2, 9, Final.SOLD_OUT, 2, False)])

    one.extend(two)

    assert len(one) == 3
    assert list(one.final) == [Final.COUPON, Final.NONE, Final.SOLD_OUT]
    assert list(one.presses) == [1, 3, 2]
