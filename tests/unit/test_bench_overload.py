"""`just bench`'s overload phase: what the generator's figures mean, and the flash-crowd
targets drawn from them."""

from __future__ import annotations

from typing import Any

import pytest

from bench.figures import Level, SoldOutRates, sold_out_rates, targets


def generator_result(
    *, ok: int, unavailable: int = 0, timeouts: int = 0, errors: int = 0, seconds: float = 10
) -> dict[str, Any]:
    """bench/openloop.c's BENCH_RESULT, as much of it as the phase reads: the coupons
    answered evenly over the window, in 100 ms buckets, and nothing in the drain."""
    buckets = round(seconds * 10)
    return {
        "duration_s": seconds,
        "timeline": {"bucket_s": 0.1, "ok": [ok // buckets] * buckets + [0, 0]},
        "answers": {"ok": ok, "sold_out": 0, "unavailable": unavailable, "other": 0},
        "latency_ms": {
            "ok": {"count": ok, "p50": 4.0, "p99": 40.0},
            "unavailable": {"count": unavailable, "p99": 3.0} if unavailable else {"count": 0},
        },
        "timeouts": timeouts,
        "expired_in_queue": 0,
        "connection_errors": errors,
        "connect_failures": 0,
        "kept_up": True,
    }


def test_goodput_counts_only_coupons_answered_while_the_load_was_offered() -> None:
    # 1 s of load: 300 coupons answered in it, then 2,000 more as the queue drained.
    result = generator_result(ok=2_300, seconds=1)
    result["timeline"]["ok"] = [30] * 10 + [1_000, 1_000]

    assert Level.from_result(4, 10_000, result).goodput_per_s == pytest.approx(300)


def test_a_level_reads_goodput_excess_and_failures_from_the_generator() -> None:
    level = Level.from_result(
        4, 20_000, generator_result(ok=50_000, unavailable=150_000, timeouts=2, errors=1)
    )

    assert level.goodput_per_s == 5_000
    assert (level.excess, level.excess_p99_ms) == (150_000, 3.0)
    assert (level.timeouts, level.connection_errors) == (2, 1)
    assert level.success_p99_ms == 40.0


def test_the_sold_out_rate_is_taken_after_the_last_coupon_and_the_issue_rate_before() -> None:
    # 100 ms buckets: 1,000 coupons over the first 5 buckets, then sold-out answers at 600
    # per bucket until the generator stops (trailing empty buckets do not count).
    timeline = {
        "bucket_s": 0.1,
        "ok": [200, 200, 200, 200, 200, 0, 0, 0, 0],
        "sold_out": [0, 0, 0, 0, 50, 600, 600, 600, 0],
    }

    rates = sold_out_rates(timeline, stock=1000)

    assert rates.sold_out_after_s == pytest.approx(0.5)
    assert rates.issue_per_s == pytest.approx(2000)
    assert rates.sold_out_answers_per_s == pytest.approx(6000)
    assert rates.ratio == pytest.approx(3.0)


def test_a_campaign_that_never_sold_out_has_no_rates() -> None:
    rates = sold_out_rates({"bucket_s": 0.1, "ok": [10, 10], "sold_out": [0, 0]}, stock=1000)

    assert rates == SoldOutRates(None, None, None)
    assert rates.ratio is None


def record(**levels: dict[str, Any]) -> dict[str, Any]:
    return {
        "levels": {
            factor: Level.from_result(float(factor), 1000.0 * float(factor), result).__dict__
            for factor, result in levels.items()
        }
    }


def test_a_service_that_sheds_the_excess_quickly_meets_the_targets() -> None:
    found = record(
        **{
            "1": generator_result(ok=10_000),
            "2": generator_result(ok=9_800, unavailable=10_000),
            "4": generator_result(ok=9_500, unavailable=30_000),
        }
    )
    found["sold_out"] = {"rates": SoldOutRates(1.0, 2000.0, 9000.0).__dict__}
    found["herd"] = {
        "users": 100_000,
        "coupons": 10_000,
        "verified": True,
        "summary": {"sold_out": True, "sell_out_s": 2.1, "answered_within_s": {"5": 1.0}},
    }

    assert all(ok for _, ok, _ in targets(found)), targets(found)


def test_an_excess_neither_shed_nor_timed_out_was_queued_and_fails() -> None:
    # 4x offered, a quarter issued, no 503 and no time-out yet: the requests waited.
    found = record(**{"1": generator_result(ok=10_000), "4": generator_result(ok=10_000)})

    met = {name: ok for name, ok, _ in targets(found)}

    assert [ok for name, ok in met.items() if name.startswith("every excess")] == [False]
    assert "queued unanswered at 4x" in next(v for n, _, v in targets(found) if "excess" in n)


def test_a_service_that_queues_the_excess_fails_them() -> None:
    found = record(
        **{
            "1": generator_result(ok=10_000),
            "4": generator_result(ok=4_000, timeouts=300),  # goodput fell, clients gave up
        }
    )
    found["herd"] = {
        "users": 100_000,
        "coupons": 10_000,
        "verified": True,
        "summary": {"sold_out": True, "sell_out_s": 9.0, "answered_within_s": {"5": 0.4}},
    }

    met = {name: ok for name, ok, _ in targets(found)}

    assert met["goodput at 4x >= 90% of 1x"] is False
    assert [ok for name, ok in met.items() if name.startswith("every excess")] == [False]
    assert [ok for name, ok in met.items() if name.startswith("herd")] == [False]


def herd_record(cpu: dict[str, float] | None) -> dict[str, Any]:
    return {
        "herd": {
            "users": 100_000,
            "coupons": 10_000,
            "verified": True,
            "summary": {"sold_out": True, "sell_out_s": 2.0, "answered_within_s": {"5": 0.9}},
            "cpu": cpu,
        }
    }


def test_a_herd_whose_load_tool_core_was_full_says_the_tool_bounded_it() -> None:
    cpu = {"window_s": 5.4, "server_cores": 0.35, "generator_busy": 0.98}

    (row,) = targets(herd_record(cpu))

    assert row[1] is False  # the verdict stands; the figures say why
    assert "the server used 0.35 of its core, the load tool's core was 98% busy" in row[2]
    assert "the load tool's core bounded the herd" in row[2]


@pytest.mark.parametrize(
    "cpu",
    [
        {"window_s": 5.4, "server_cores": 0.97, "generator_busy": 0.98},  # both full
        {"window_s": 5.4, "server_cores": 0.97, "generator_busy": 0.60},  # the server's
        {"window_s": 5.4, "server_cores": 0.40, "generator_busy": 0.60},  # neither
    ],
)
def test_a_herd_is_not_put_on_the_load_tool_unless_only_its_core_was_full(
    cpu: dict[str, float],
) -> None:
    (row,) = targets(herd_record(cpu))

    assert f"the load tool's core was {cpu['generator_busy']:.0%} busy" in row[2]
    assert "bounded" not in row[2]


def test_a_herd_without_cpu_figures_reports_the_rest() -> None:
    (row,) = targets(herd_record(None))

    assert row[2].endswith("90.0% answered within 5 s")
