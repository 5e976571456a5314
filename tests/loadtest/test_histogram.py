"""HDR latency histograms: percentiles within the promised precision, merged across processes."""

from __future__ import annotations

import random

import pytest

from coupon_loadtest.histogram import LatencyHistogram

MS = 1_000_000


def test_percentiles_of_a_known_distribution_are_within_a_tenth_of_a_percent() -> None:
    histogram = LatencyHistogram()
    histogram.record_many_ns(n * MS for n in range(1, 1001))  # 1 ms .. 1000 ms

    summary = histogram.summary()

    assert summary["count"] == 1000
    assert summary["p50"] == pytest.approx(500, rel=1e-3)
    assert summary["p90"] == pytest.approx(900, rel=1e-3)
    assert summary["p99"] == pytest.approx(990, rel=1e-3)
    assert summary["p99.9"] == pytest.approx(999, rel=1e-3)
    assert summary["max"] == pytest.approx(1000, rel=1e-3)
    assert summary["mean"] == pytest.approx(500.5, rel=1e-3)


def test_merging_histograms_equals_recording_everything_in_one() -> None:
    rng = random.Random(5)
    values = [int(rng.expovariate(1 / (20 * MS))) for _ in range(5000)]
    whole, left, right = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    whole.record_many_ns(values)
    left.record_many_ns(values[:1234])
    right.record_many_ns(values[1234:])

    left.merge(right)

    assert left.summary() == whole.summary()


def test_a_histogram_survives_the_trip_between_processes() -> None:
    histogram = LatencyHistogram()
    histogram.record_many_ns([3 * MS, 7 * MS, 250 * MS])

    copy = LatencyHistogram.decode(histogram.encode())

    assert copy.summary() == histogram.summary()


def test_values_outside_the_range_are_counted_not_dropped() -> None:
    histogram = LatencyHistogram()
    histogram.record_ns(0)
    histogram.record_ns(10 * 3600 * 1000 * MS)  # ten hours

    assert histogram.count == 2


def test_an_empty_histogram_reports_no_percentiles() -> None:
    assert LatencyHistogram().summary() == {"count": 0}
    assert LatencyHistogram().percentile_ms(99.0) == 0.0
