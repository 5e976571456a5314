"""Open-loop scheduling, the choice of users, and the verdict on whether the generator kept up."""

from __future__ import annotations

import pytest

from coupon_loadtest.schedule import (
    NS_PER_S,
    GeneratorVerdict,
    OpenLoopSchedule,
    UserPicker,
    judge_generator,
)


def test_requests_are_due_at_evenly_spaced_times_from_the_load_start() -> None:
    schedule = OpenLoopSchedule(rate=4.0)

    assert [schedule.intended_ns(i) for i in range(5)] == [
        0,
        NS_PER_S // 4,
        NS_PER_S // 2,
        3 * NS_PER_S // 4,
        NS_PER_S,
    ]


def test_processes_interleave_to_send_every_request_of_the_run_exactly_once() -> None:
    rate, processes = 1000.0, 3
    whole_run = OpenLoopSchedule(rate)
    times = sorted(
        OpenLoopSchedule(rate, k, processes).intended_ns(i)
        for k in range(processes)
        for i in range(100)
    )

    assert times == [whole_run.intended_ns(j) for j in range(300)]


@pytest.mark.parametrize(
    ("rate", "processes", "index"), [(1000.0, 1, 0), (3.0, 4, 2), (777.7, 3, 1)]
)
def test_due_before_counts_exactly_the_requests_due_before_a_time(
    rate: float, processes: int, index: int
) -> None:
    schedule = OpenLoopSchedule(rate, index, processes)
    times = [schedule.intended_ns(i) for i in range(500)]

    for t in [0, 1, *times[:50], *(x + 1 for x in times[:50]), times[-1]]:
        assert schedule.due_before(t) == sum(1 for x in times if x < t)


def test_a_whole_run_is_due_at_the_rate_times_the_window() -> None:
    schedule = OpenLoopSchedule(1000.0)

    assert schedule.due_before(3 * NS_PER_S) == 3000
    assert schedule.due_before(3 * NS_PER_S + 1) == 3001  # request 3000 is due at 3 s


def test_first_requests_come_from_distinct_users_and_retries_from_users_who_asked() -> None:
    picker = UserPicker(users=50, repeat_fraction=0.3, seed=1)
    asked: set[int] = set()

    for _ in range(200):
        user = picker.next()
        if user not in asked:
            assert user == len(asked)  # new users arrive in order
        asked.add(user)

    assert asked == set(range(50))


def test_retries_make_up_about_the_asked_fraction_of_requests() -> None:
    picker = UserPicker(users=100_000, repeat_fraction=0.25, seed=3)
    seen: set[int] = set()
    repeats = 0
    for _ in range(20_000):
        user = picker.next()
        repeats += user in seen
        seen.add(user)

    assert 0.23 < repeats / 20_000 < 0.27


def test_once_every_user_has_asked_every_request_is_a_retry() -> None:
    picker = UserPicker(users=10, repeat_fraction=0.0)
    first = [picker.next() for _ in range(10)]
    later = [picker.next() for _ in range(50)]

    assert first == list(range(10))
    assert set(later) <= set(range(10))


def test_processes_own_disjoint_users_that_together_are_all_users() -> None:
    users, processes = 103, 4
    owned = []
    for k in range(processes):
        picker = UserPicker(users, 0.0, process_index=k, processes=processes)
        owned.append({picker.next() for _ in range(picker.owned)})

    assert sum(len(s) for s in owned) == users
    assert set().union(*owned) == set(range(users))


def judge(
    sent: int = 3000, lag_p99_ms: float = 1.2, inflight_cap_waits: int = 0
) -> GeneratorVerdict:
    """A 3 s run asked at 1,000/s (3,000 due), judged against a 50 ms p99 send-lag limit."""
    return judge_generator(
        rate=1000.0,
        window_ns=3 * NS_PER_S,
        due=3000,
        sent=sent,
        lag_p99_ms=lag_p99_ms,
        max_lag_ms=50.0,
        inflight_cap_waits=inflight_cap_waits,
    )


def test_generator_that_sent_every_request_on_time_kept_up() -> None:
    verdict = judge()

    assert verdict.kept_up
    assert verdict.offered_rps == pytest.approx(1000.0)


def test_generator_that_left_due_requests_unsent_fell_behind() -> None:
    verdict = judge(sent=2400)

    assert not verdict.kept_up
    assert verdict.unsent == 600
    assert "600 of 3000 due requests were never sent" in verdict.message
    assert "--processes" in verdict.message


def test_generator_that_sent_everything_but_late_fell_behind() -> None:
    verdict = judge(lag_p99_ms=120.0)

    assert not verdict.kept_up
    assert "p99 send lag" in verdict.message


def test_generator_held_back_by_the_inflight_cap_says_the_answers_were_too_slow() -> None:
    verdict = judge(sent=1000, lag_p99_ms=900.0, inflight_cap_waits=42)

    assert not verdict.kept_up
    assert "--max-inflight" in verdict.message
