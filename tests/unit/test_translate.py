"""Times cross the API as protobuf Timestamps: whole seconds since the epoch and nanos."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone

from connectrpc.codec import proto_binary_codec
from hypothesis import given
from hypothesis import strategies as st

from coupon.domain.coupon import Coupon
from coupon.entrypoints.translate import (
    issue_response,
    issue_response_bytes,
    to_datetime,
    to_timestamp,
)
from coupon.gen.coupon.v1 import coupon_pb

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


ENCODER = proto_binary_codec()
moments = st.datetimes(
    min_value=EARLIEST.replace(tzinfo=None), max_value=LATEST.replace(tzinfo=None)
).map(lambda naive: naive.replace(tzinfo=UTC))


@given(
    code=st.text(max_size=12),
    campaign_id=st.text(max_size=40),
    # Up to 200 characters of any plane: lengths whose varint takes one byte and two.
    user_id=st.text(max_size=200),
    issued_at=st.one_of(
        moments, st.sampled_from([datetime(1970, 1, 1, tzinfo=UTC), EARLIEST, LATEST])
    ),
    slot=st.integers(1, 10_000_000),
    already_issued=st.booleans(),
)
def test_the_issue_answer_written_directly_is_the_librarys_encoding(
    code: str,
    campaign_id: str,
    user_id: str,
    issued_at: datetime,
    slot: int,
    already_issued: bool,
) -> None:
    coupon = Coupon(code, campaign_id, user_id, issued_at, slot)
    written = issue_response_bytes(coupon, already_issued)
    assert written == ENCODER.encode(issue_response(coupon, already_issued))
    # ...and read back by the library as the same message.
    assert ENCODER.decode(written, coupon_pb.IssueCouponResponse) == issue_response(
        coupon, already_issued
    )


def test_coupons_sharing_an_issue_time_each_get_their_own_answer() -> None:
    # The campaign and timestamp fields are kept for the next coupon of the same time (by
    # identity) and campaign: a coupon of another time (even one equal in value but another
    # object) or of another campaign is encoded anew.
    first = datetime(2026, 12, 3, 12, 0, 0, 1, tzinfo=UTC)
    later = datetime(2026, 12, 3, 12, 0, 1, 2, tzinfo=UTC)
    equal = datetime(2026, 12, 3, 12, 0, 0, 1, tzinfo=UTC)
    for at, campaign in (
        (first, "c"),
        (first, "c"),
        (first, "d"),
        (later, "d"),
        (first, "d"),
        (first, "c"),
        (equal, "c"),
    ):
        coupon = Coupon("가나다라마바자차카타", campaign, "u", at, 1)
        assert issue_response_bytes(coupon, False) == ENCODER.encode(issue_response(coupon, False))
