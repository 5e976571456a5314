"""The estimate of the server's clock: NTP-style from stamped round trips, and the coarse
fallback from the Date header. Whatever the samples, the true offset lies within the bound."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coupon_loadtest.clock import (
    MICROSECOND_NS,
    NS_PER_S,
    ClockSample,
    from_http_date,
    shortest_round_trip,
)

US = 1_000
MS = 1_000_000
T = 1_800_000_000 * NS_PER_S  # a client wall-clock time


def stamped(sent_ns: int, read_after_ns: int, received_ns: int, true_offset_ns: int) -> ClockSample:
    """The server reads its clock `read_after_ns` after our send and stamps it in whole µs."""
    server = sent_ns + read_after_ns + true_offset_ns
    return ClockSample(sent_ns, server - server % MICROSECOND_NS, received_ns, "GetCampaign")


def test_offset_is_the_stamp_against_the_midpoint_give_or_take_half_the_round_trip() -> None:
    sample = ClockSample(T, T + 5 * MS + 200 * US, T + 400 * US, "GetCampaign.server_time")

    estimate = shortest_round_trip([sample])

    # Half a µs of the stamp's truncation on top of the 400 µs round trip's half.
    assert estimate.offset_ns == 5 * MS + 500
    assert estimate.uncertainty_ns == 200 * US + 500
    assert estimate.source == "GetCampaign.server_time"


def test_the_shortest_round_trip_is_kept_wherever_it_comes() -> None:
    slow = ClockSample(T, T + 3 * MS, T + 6 * MS, "CreateCampaign.created_at")
    fast = ClockSample(T + 10 * MS, T + 10 * MS + 150 * US, T + 10 * MS + 300 * US, "Get")
    slower = ClockSample(T + 20 * MS, T + 21 * MS, T + 22 * MS, "Get")

    estimate = shortest_round_trip([slow, fast, slower])

    assert estimate.offset_ns == 500  # fast's stamp is its midpoint, plus half a µs
    assert estimate.uncertainty_ns == 150 * US + 500
    assert estimate.source == "Get, shortest of 3 round trips"


def test_created_at_is_kept_when_its_round_trip_is_the_shortest() -> None:
    created = ClockSample(T, T + 150 * US, T + 300 * US, "CreateCampaign.created_at")
    probe = ClockSample(T + MS, T + 1500 * US, T + 2 * MS, "GetCampaign.server_time")

    assert shortest_round_trip([created, probe]).source.startswith("CreateCampaign.created_at")


def test_no_samples_is_an_error_not_a_zero_offset() -> None:
    with pytest.raises(ValueError, match="no clock samples"):
        shortest_round_trip([])


def test_an_answer_before_its_request_is_refused() -> None:
    with pytest.raises(ValueError, match="received before sent"):
        ClockSample(T, T, T - 1, "GetCampaign").offset()


@given(
    true_offset=st.integers(-5 * NS_PER_S, 5 * NS_PER_S),
    exchanges=st.lists(
        st.tuples(
            st.integers(0, 50 * MS),  # the way there
            st.integers(0, 50 * MS),  # the way back
            st.integers(0, 10 * MS),  # the gap before the next exchange
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_the_true_offset_always_lies_within_the_estimate(
    true_offset: int, exchanges: list[tuple[int, int, int]]
) -> None:
    samples = []
    sent = T
    for there, back, gap in exchanges:
        samples.append(stamped(sent, there, sent + there + back, true_offset))
        sent += there + back + gap

    estimate = shortest_round_trip(samples)

    assert abs(estimate.offset_ns - true_offset) <= estimate.uncertainty_ns
    assert estimate.uncertainty_ns == min(s.offset().uncertainty_ns for s in samples)


def test_a_date_header_a_second_stale_still_bounds_the_offset() -> None:
    # uvicorn remakes its Date once a second: read at 12:00:01.9 the header can still say
    # 12:00:00. The clocks agree; the estimate must admit it.
    server_now = T + NS_PER_S + 900 * MS
    date_s = (server_now - NS_PER_S) // NS_PER_S

    estimate = from_http_date(server_now - 100 * US, server_now + 100 * US, date_s, "Date")

    assert abs(estimate.offset_ns) <= estimate.uncertainty_ns
    assert estimate.uncertainty_ns > NS_PER_S  # and says how coarse it is
