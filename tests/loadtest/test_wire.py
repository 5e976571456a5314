"""Reading IssueCoupon answers: binary and JSON successes, Connect errors, and non-answers."""

from __future__ import annotations

from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from coupon.gen.coupon.v1 import coupon_pb
from coupon_loadtest.records import LOST, OK, OUTCOME_INDEX
from coupon_loadtest.wire import IssueCodec

RESPONSE = coupon_pb.IssueCouponResponse(
    coupon=coupon_pb.Coupon(
        code="가나다1",
        campaign_id="c-1",
        user_id="u-1",
        issued_at=Timestamp(seconds=1_800_000_000, nanos=123_456_000),
    ),
    already_issued=True,
)


def test_binary_success_yields_the_coupon() -> None:
    codec = IssueCodec(json=False)

    reply = codec.decode(200, RESPONSE.to_binary())

    assert reply.outcome == OK
    assert (reply.code, reply.user_id, reply.campaign_id) == ("가나다1", "u-1", "c-1")
    assert reply.issued_at_ns == 1_800_000_000_123_456_000
    assert reply.already_issued


def test_json_success_yields_the_same_coupon() -> None:
    codec = IssueCodec(json=True)

    reply = codec.decode(200, RESPONSE.to_json().encode())

    assert reply.outcome == OK
    assert reply.code == "가나다1"
    assert reply.issued_at_ns == 1_800_000_000_123_456_000


def test_requests_are_encoded_as_asked() -> None:
    binary = IssueCodec(json=False).encode("c-1", "u-1")
    json = IssueCodec(json=True).encode("c-1", "u-1")

    assert coupon_pb.IssueCouponRequest.from_binary(binary).user_id == "u-1"
    assert coupon_pb.IssueCouponRequest.from_json(json).campaign_id == "c-1"


def test_connect_error_yields_its_code_and_message() -> None:
    body = b'{"code": "resource_exhausted", "message": "all 5 coupons have been issued"}'

    reply = IssueCodec(json=False).decode(429, body)

    assert reply.outcome == OUTCOME_INDEX["resource_exhausted"]
    assert reply.message == "all 5 coupons have been issued"


def test_error_that_is_not_from_the_service_counts_as_lost() -> None:
    reply = IssueCodec(json=False).decode(502, b"<html>Bad Gateway</html>")

    assert reply.outcome == LOST
    assert "HTTP 502" in reply.message


def test_success_that_cannot_be_read_counts_as_lost() -> None:
    assert IssueCodec(json=False).decode(200, b"\xff\xff\xff").outcome == LOST
    assert IssueCodec(json=True).decode(200, b"{}").outcome == LOST


def test_binary_requests_are_what_the_protobuf_library_encodes() -> None:
    codec = IssueCodec(json=False)
    long_user = "u" * 200  # a two-byte length

    for campaign, user in (("0194b2a0-0000-7000-8000-000000000001", "lt-1"), ("c", long_user)):
        body = codec.encode(campaign, user)

        expected = coupon_pb.IssueCouponRequest(campaign_id=campaign, user_id=user)
        assert body == expected.to_binary()
        decoded = coupon_pb.IssueCouponRequest.from_binary(body)
        assert (decoded.campaign_id, decoded.user_id) == (campaign, user)
