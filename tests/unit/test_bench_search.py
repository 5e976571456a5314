"""`just bench`'s saturation search: which connection count a phase is measured at."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.main import parse_args
from bench.search import probe_ratios, search_peak

LADDER = (64, 128, 256, 512, 1024)


class Curve:
    """A server whose throughput is `rate(connections)`; it remembers what was probed."""

    def __init__(
        self, rate: Callable[[int], float], errors: Callable[[int], int] = lambda _: 0
    ) -> None:
        self.rate = rate
        self.errors = errors
        self.probed: list[int] = []

    def __call__(self, connections: int) -> tuple[float, int]:
        self.probed.append(connections)
        return self.rate(connections), self.errors(connections)


def test_a_peak_between_two_steps_is_found_halfway() -> None:
    curve = Curve(lambda c: 30_000 - (c - 200) ** 2)  # best at 200

    probes, chosen = search_peak(LADDER, curve)

    # 256 is the ladder's best; halfway to its neighbours are 192 and 384; then the two
    # best, 192 and 256, once more.
    assert curve.probed == [*LADDER, 192, 384, 192, 256]
    assert chosen == 192
    assert list(probes) == sorted(probes)
    assert probes[192] == {"requests_per_s": 30_000 - 8**2, "errors": 0, "probes": 2}
    assert probes[64]["probes"] == 1


def test_a_peak_at_the_top_of_the_ladder_is_refined_below_only() -> None:
    curve = Curve(float)

    _, chosen = search_peak(LADDER, curve)

    assert curve.probed == [*LADDER, 768, 768, 1024]
    assert chosen == 1024


def test_a_peak_at_the_bottom_is_refined_above_only() -> None:
    curve = Curve(lambda c: 1e6 / c)

    _, chosen = search_peak(LADDER, curve)

    assert curve.probed == [*LADDER, 96, 64, 96]
    assert chosen == 64


def test_every_count_is_probed_even_past_a_dip() -> None:
    # A dip at 256 (noise, say) must not end the search before the real peak at 1,024.
    rates = {64: 10.0, 128: 12.0, 256: 9.0, 512: 14.0, 1024: 15.0, 768: 13.0}
    curve = Curve(lambda c: rates[c])

    _, chosen = search_peak(LADDER, curve)

    assert chosen == 1024


def test_one_lucky_probe_does_not_choose_a_count() -> None:
    # 1,024 is fast once, then slow; 256 is steadily a little slower than its first probe.
    seen: dict[int, int] = {}

    def rate(connections: int) -> float:
        seen[connections] = seen.get(connections, 0) + 1
        if connections == 1024:
            return 20_000.0 if seen[connections] == 1 else 10_000.0
        return {256: 18_000.0, 512: 17_000.0, 768: 16_000.0}.get(connections, 12_000.0)

    probes, chosen = search_peak(LADDER, Curve(rate))

    assert probes[1024]["requests_per_s"] == 15_000.0  # the mean of its two probes
    assert chosen == 256


def test_a_count_with_errors_is_not_chosen_while_another_is_clean() -> None:
    curve = Curve(float, errors=lambda c: 3 if c >= 768 else 0)

    probes, chosen = search_peak(LADDER, curve)

    assert probes[1024]["errors"] == 3
    assert chosen == 512


def test_when_every_count_has_errors_the_fastest_is_chosen() -> None:
    curve = Curve(float, errors=lambda _: 1)

    _, chosen = search_peak(LADDER, curve)

    assert chosen == 1024


def test_no_halfway_count_below_the_least_wrk_accepts() -> None:
    curve = Curve(lambda c: 1e6 / c)  # best at the bottom, 2

    search_peak((2, 4), curve, least=4)

    assert 3 not in curve.probed  # fewer connections than wrk threads


def test_connections_take_one_count_or_a_ladder() -> None:
    assert parse_args(["--connections", "128"]).connections == [128]
    assert parse_args(["--connections", "256,64,64"]).connections == [64, 256]
    assert parse_args([]).connections == list(LADDER)


@pytest.mark.parametrize("given", ["a,b", "", "1"])
def test_connections_that_wrk_cannot_run_are_refused(given: str) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--connections", given, "--threads", "2"])


def test_ratios_at_equal_counts_use_only_counts_both_searches_probed() -> None:
    def probes(rates: dict[int, float]) -> dict[int, dict[str, float]]:
        return {c: {"requests_per_s": r, "errors": 0} for c, r in rates.items()}

    searches = {
        "a1": probes({64: 20_000, 96: 22_000, 128: 20_000}),
        "a2": probes({64: 40_000, 128: 40_000}),
        "b": probes({64: 5_000, 128: 10_000, 192: 11_000}),
    }

    assert probe_ratios(searches, "a1") == (
        "(b)/(a1) at equal connections, from the search probes: 64 0.25 · 128 0.50"
    )
    assert probe_ratios(searches, "a2") == (
        "(b)/(a2) at equal connections, from the search probes: 64 0.12 · 128 0.25"
    )
    assert probe_ratios({"a1": searches["a1"]}, "a1") == ""
