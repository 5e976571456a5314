"""The admission script's reply, decoded in one place: every shape the script can send."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime

import pytest

from coupon.adapters.redis.admission_reply import (
    NO_END,
    RESULT_ENDED,
    RESULT_SOLD_OUT,
    Held,
    ReplyKind,
    decode,
    from_micros,
    held_coupon,
    holding,
    micros,
)
from coupon.domain.coupon import Coupon

NOW = 1_764_000_000_123_456


def test_not_loaded_and_too_late_carry_only_the_time() -> None:
    assert decode([2, NOW]).kind is ReplyKind.NOT_LOADED
    late = decode([4, NOW])
    assert late.kind is ReplyKind.TOO_LATE and late.now_us == NOW


def test_not_started_carries_the_version_and_the_start() -> None:
    reply = decode([3, NOW, b"171.ab", 7, NOW + 5])
    assert reply.kind is ReplyKind.NOT_STARTED
    assert reply.version == ("171.ab", 7) and reply.starts_us == NOW + 5


def test_a_decided_reply_has_one_result_per_user_and_the_stale_pairs() -> None:
    value = b"3|\xea\xb0\x80|" + str(NOW).encode()
    reply = decode(
        [
            1,
            NOW,
            b"171.ab",
            9,
            NOW - 60_000_000,
            NO_END,
            NOW + 600_000,
            [5, RESULT_SOLD_OUT, RESULT_ENDED, [3, 0, 0, value], [4, 1, 1, b"4:tok"]],
            [b"ghost", 4, b"other", 2],
        ]
    )
    assert reply.kind is ReplyKind.DECIDED
    assert reply.version == ("171.ab", 9)
    assert reply.ends_us == NO_END and reply.reopens_us == NOW + 600_000
    assert reply.results[:3] == [5, RESULT_SOLD_OUT, RESULT_ENDED]
    assert reply.results[3] == Held(3, pending=False, stale=False, value=value)
    assert reply.results[4] == Held(4, pending=True, stale=True, value=b"4:tok")
    assert reply.stale == (("ghost", 4), ("other", 2))


@pytest.mark.parametrize("raw", [[], [9, NOW], [1, NOW, b"g"], "nonsense", [3, NOW, b"g", "x"]])
def test_anything_else_is_refused(raw: object) -> None:
    with pytest.raises(ValueError, match="admission script"):
        decode(raw)  # type: ignore[arg-type]


def test_a_holding_names_the_coupon_and_a_pending_value_names_none() -> None:
    when = datetime(2026, 11, 24, 12, 0, 0, 123_456, tzinfo=UTC)
    coupon = Coupon("가나다라마바자차카타", "c", "alice", when, 17)
    value = holding(coupon).encode()
    assert held_coupon("c", "alice", value) == coupon
    assert held_coupon("c", "alice", b"17:origin.3") is None
    assert from_micros(micros(when)) == when


def test_holdings_of_coupons_issued_at_other_times_name_their_own_time() -> None:
    """Coupons of one batch share their issue time, which is written once; a coupon of
    another time, or of an equal time held in another object, is written with its own."""
    first = datetime(2026, 11, 24, 12, 0, 0, 1, tzinfo=UTC)
    later = datetime(2026, 11, 24, 12, 0, 1, 2, tzinfo=UTC)
    equal = datetime(2026, 11, 24, 12, 0, 0, 1, tzinfo=UTC)
    for when in (first, first, later, first, equal, later):
        coupon = Coupon("가나다라마바자차카타", "c", "bob", when, 3)
        assert held_coupon("c", "bob", holding(coupon).encode()) == coupon


@pytest.mark.parametrize(
    "moment",
    [
        "2000-01-01T00:00:00+00:00",
        "2026-12-05T13:00:00.123456+00:00",
        "2300-01-01T00:00:00.999999+00:00",
        "8999-12-31T23:59:59.999998+00:00",  # the last day a campaign may start
    ],
)
def test_a_time_goes_to_the_gate_to_the_microsecond(moment: str) -> None:
    """Past about 2242 a float timestamp rounds x.999999 up to the next second: the gate
    took such a campaign's start (and end) a second late."""
    value = datetime.fromisoformat(moment)
    exact = calendar.timegm(value.utctimetuple()) * 1_000_000 + value.microsecond
    assert micros(value) == exact
    assert from_micros(exact) == value
