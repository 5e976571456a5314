"""A Connect stream's protocol headers refused in the stream's own terms: HTTP 200 and an
end-stream message that carries the error, which a stream's client reads (connect-es
reported a unary call's HTTP 400 as `internal`, its code and message lost)."""

from __future__ import annotations

import json
import struct

import httpx
import pytest

from harness.server import ServerProcess

pytestmark = pytest.mark.e2e

EXPORT = "/coupon.v1.CouponService/ExportCoupons"
CAMPAIGN = "0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50"


def end_stream(body: bytes) -> dict[str, object]:
    flags, length = struct.unpack(">BI", body[:5])
    assert flags == 0x02 and len(body) == 5 + length, body
    message: dict[str, object] = json.loads(body[5:])
    return message


@pytest.mark.parametrize(
    ("header", "value", "named"),
    [
        ("connect-timeout-ms", "x", "connect-timeout-ms"),
        ("connect-timeout-ms", "12345678901", "connect-timeout-ms"),
        ("connect-protocol-version", "2", "connect-protocol-version"),
    ],
)
def test_a_malformed_protocol_header_of_a_stream_is_its_end_stream_error(
    coupon_server: ServerProcess, header: str, value: str, named: str
) -> None:
    message = json.dumps({"campaignId": CAMPAIGN}).encode()
    answer = httpx.post(
        f"{coupon_server.url}{EXPORT}",
        content=struct.pack(">BI", 0, len(message)) + message,
        headers={"content-type": "application/connect+json", header: value},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/connect+json"
    error = end_stream(answer.content)["error"]
    assert isinstance(error, dict)
    assert error["code"] == "invalid_argument" and str(error["message"]).startswith(named)


def test_a_unary_method_called_as_a_stream_is_refused_for_its_media_type(
    coupon_server: ServerProcess,
) -> None:
    """The method is no stream: never answered with a stream's end-stream message, whatever
    its protocol headers say (a 415 for the media type, or the unary call's own error for a
    malformed deadline)."""
    for timeout, status in (("5", 415), ("x", 400)):
        answer = httpx.post(
            f"{coupon_server.url}/coupon.v1.CouponService/IssueCoupon",
            content=b"\x00\x00\x00\x00\x02{}",
            headers={"content-type": "application/connect+json", "connect-timeout-ms": timeout},
            timeout=10,
        )
        assert answer.status_code == status, (timeout, answer.text)
