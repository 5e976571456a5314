"""Times cross the API as protobuf Timestamps: whole seconds since the epoch and nanos."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from coupon.entrypoints.translate import to_datetime, to_timestamp

EARLIEST = datetime(1, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)


@given(st.datetimes(min_value=EARLIEST.replace(tzinfo=None), max_value=LATEST.replace(tzinfo=None)))
def test_to_timestamp_is_exact_over_the_whole_range(naive: datetime) -> None:
    value = naive.replace(tzinfo=UTC)
    stamp = to_timestamp(value)
    assert stamp.seconds == calendar.timegm(value.utctimetuple())
    assert stamp.nanos == value.microsecond * 1000
    assert to_datetime("t", stamp) == value


def test_to_timestamp_before_the_epoch_rounds_down() -> None:
    stamp = to_timestamp(datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC))
    assert (stamp.seconds, stamp.nanos) == (-1, 500_000_000)


def test_to_timestamp_of_a_time_in_another_zone() -> None:
    seoul = datetime(2026, 11, 25, 6, 0, 0, 250_000, tzinfo=timezone(timedelta(hours=9)))
    utc = datetime(2026, 11, 24, 21, 0, 0, 250_000, tzinfo=UTC)
    assert to_timestamp(seoul) == to_timestamp(utc)
