"""`just bench-scale`'s export phase: reading a Connect stream cut anywhere, the server's
memory during the export, and its options."""

from __future__ import annotations

from typing import Any

import pytest

from bench.scale.export import END_STREAM, Envelopes, rss_during
from bench.scale.main import parse_args


def envelope(flags: int, message: bytes) -> bytes:
    return bytes([flags]) + len(message).to_bytes(4, "big") + message


STREAM = [(0, b"first"), (0, b""), (0, b"x" * 70_000), (END_STREAM, b"{}")]
WIRE = b"".join(envelope(f, m) for f, m in STREAM)


@pytest.mark.parametrize("cut", [1, 2, 5, 6, 7, 4096, len(WIRE)])
def test_envelopes_come_out_whole_however_the_stream_is_cut(cut: int) -> None:
    envelopes = Envelopes()

    got = [e for i in range(0, len(WIRE), cut) for e in envelopes.feed(WIRE[i : i + cut])]

    assert got == STREAM
    assert envelopes.pending == 0


def test_a_stream_cut_mid_message_leaves_its_bytes_pending() -> None:
    envelopes = Envelopes()

    got = list(envelopes.feed(WIRE[:-1]))

    assert got == STREAM[:-1]
    assert envelopes.pending == len(envelope(END_STREAM, b"{}")) - 1


PIDS = {10: "main", 11: "worker 1", 12: "worker 2"}


def samples(*rss: dict[int, float | None]) -> list[dict[str, Any]]:
    return [{"t": i / 2, "rss": {str(p): v for p, v in r.items()}} for i, r in enumerate(rss)]


def test_growth_is_each_process_from_before_the_export_to_its_peak_during_it() -> None:
    series = samples(
        {10: 50.0, 11: 90.0, 12: 95.0},  # long before: not the baseline
        {10: 50.0, 11: 80.0, 12: 80.0},  # the last sample before the export
        {10: 50.0, 11: 85.0, 12: 81.0},
        {10: 50.0, 11: 82.0, 12: 83.0},
    )
    marks = {10: 60.0, 11: 100.0, 12: 100.0}  # high-water marks that did not move

    processes, growth = rss_during(PIDS, series, 1, marks, marks)

    assert processes["11"] == {
        "role": "worker 1",
        "before": 80.0,
        "peak": 85.0,
        "end": 82.0,
        "hwm_before": 100.0,
        "hwm_after": 100.0,
    }
    assert growth == pytest.approx(0.0 + 5.0 + 3.0)


def test_a_peak_between_samples_is_caught_by_the_high_water_mark() -> None:
    series = samples({10: 50.0, 11: 80.0, 12: 80.0}, {10: 50.0, 11: 81.0, 12: 80.0})
    before = {10: 60.0, 11: 100.0, 12: 100.0}
    after = {10: 60.0, 11: 300.0, 12: 100.0}  # worker 1 rose to 300 MiB and fell back

    processes, growth = rss_during(PIDS, series, 0, before, after)

    assert processes["11"]["peak"] == 300.0
    assert processes["12"]["peak"] == 80.0
    assert growth == pytest.approx(220.0)


def test_a_process_gone_before_the_export_counts_for_no_growth() -> None:
    series = samples({10: 50.0, 11: None, 12: 80.0}, {10: 50.0, 11: 90.0, 12: 80.0})
    marks: dict[int, float | None] = {10: None, 11: None, 12: None}

    processes, growth = rss_during(PIDS, series, 0, marks, marks)

    assert processes["11"]["before"] is None
    assert growth == 0.0


def test_export_is_a_phase_of_its_own_with_its_size() -> None:
    args = parse_args(["--only", "export", "--export-rows", "100000"])

    assert args.only == ["export"]
    assert args.export_rows == 100_000
    assert parse_args([]).only == ["sellout", "paging", "export"]


@pytest.mark.parametrize(
    "argv", [["--export-rows", "0"], ["--export-rows", "10000001"], ["--only", "exports"]]
)
def test_an_export_outside_the_schema_or_an_unknown_phase_is_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
