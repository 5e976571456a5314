"""`just bench-side`: the ratios, medians and verdict it reads from its rounds; the
interpreter B may run on."""

from __future__ import annotations

import platform
import sys

import pytest

from bench.generators import BenchBroke
from bench.side import (
    Round,
    Sample,
    parse_args,
    python_version,
    round_line,
    summarize,
    summary_lines,
    verdict,
)

CLEAN = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}


def sample(us_per_request: float, requests: int = 10_000, **errors: int) -> Sample:
    """A side that answered `requests` in 8 s with `us_per_request` of worker CPU each."""
    return Sample(requests, {**CLEAN, **errors}, 8.0, us_per_request * requests / 1e6)


def test_each_round_is_a_ratio_b_over_a_and_the_summary_takes_medians() -> None:
    rounds = [
        Round("A", sample(100), sample(95)),
        Round("B", sample(120), sample(120)),
        Round("A", sample(80), sample(72)),
    ]

    summary = summarize(rounds)

    assert summary.ratios == pytest.approx([0.95, 1.0, 0.9])
    assert summary.median_ratio == pytest.approx(0.95)
    assert summary.median_a == pytest.approx(100)
    assert summary.median_b == pytest.approx(95)


def test_a_round_with_errors_is_flagged_and_left_out_of_the_medians() -> None:
    rounds = [
        Round("A", sample(100), sample(90)),
        Round("B", sample(100), sample(50, status=12)),  # non-200 answers on B
        Round("A", sample(100, timeout=1), sample(100)),  # a wrk time-out on A
        Round("B", sample(100), sample(94)),
    ]

    summary = summarize(rounds)

    assert summary.ratios == pytest.approx([0.9, None, None, 0.94])
    assert summary.median_ratio == pytest.approx(0.92)
    assert "ERRORS" in round_line(2, rounds[1])
    assert "status 12" in round_line(2, rounds[1])
    assert "ERRORS" not in round_line(1, rounds[0])
    assert verdict(summary, "abc1234", "working tree") == (
        "working tree: 0.920 of abc1234's CPU per issue "
        "(2 rounds of 4, 2 with errors left out, every ratio 0.90-0.94)"
    )


def test_the_verdict_names_both_sides_and_the_spread_of_the_ratios() -> None:
    rounds = [Round("AB"[i % 2], sample(100), sample(r)) for i, r in enumerate([94, 96, 95, 97])]

    summary = summarize([*rounds, Round("A", sample(100), sample(95.5))])

    assert verdict(summary, "abc1234", "working tree") == (
        "working tree: 0.955 of abc1234's CPU per issue (5 rounds, every ratio 0.94-0.97)"
    )
    assert summary_lines(summary, "abc1234", "working tree")[1] == (
        "B/A per round: 0.940 0.960 0.950 0.970 0.955; median 0.955"
    )


def test_no_clean_round_compares_nothing() -> None:
    summary = summarize([Round("A", sample(100, read=3), sample(100))])

    assert summary.median_ratio is None
    assert summary.median_a is None
    assert verdict(summary, "abc1234", "def5678") == (
        "def5678 against abc1234: no round without errors, nothing to compare"
    )
    assert summary_lines(summary, "abc1234", "def5678")[1] == "B/A per round: errors; median -"


def test_a_side_that_answered_nothing_has_no_ratio() -> None:
    silent = Round("A", sample(100), Sample(0, dict(CLEAN), 8.0, 0.5))

    assert not silent.clean
    assert silent.ratio is None
    assert "B/A -" in round_line(1, silent)


def test_arguments_and_their_defaults() -> None:
    args = parse_args(["HEAD~1"])
    assert (args.ref, args.against_ref) == ("HEAD~1", None)
    assert (args.rounds, args.seconds, args.connections) == (5, 8, 128)

    args = parse_args(["HEAD~2", "--against-ref", "HEAD", "--rounds", "3", "--seconds", "5"])
    assert (args.ref, args.against_ref, args.rounds, args.seconds) == ("HEAD~2", "HEAD", 3, 5)


@pytest.mark.parametrize("given", [[], ["HEAD", "--rounds", "0"], ["HEAD", "--seconds", "x"]])
def test_arguments_it_cannot_run_with_are_refused(given: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(given)


def test_b_may_run_on_another_interpreter_which_must_import_the_service() -> None:
    assert parse_args(["HEAD"]).python_b is None
    assert parse_args(["HEAD", "--python-b", sys.executable]).python_b == sys.executable

    assert python_version(sys.executable) == platform.python_version()
    with pytest.raises(BenchBroke, match="cannot import the service"):
        python_version("/bin/false")
    with pytest.raises(BenchBroke, match="--python-b /nonexistent/python"):
        python_version("/nonexistent/python")
