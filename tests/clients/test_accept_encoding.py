"""The codings a client accepts, weights and all (RFC 9110, 12.5.3): the answer is in the
coding it wants most among those served (gzip), never in one it weighs 0, and `*` stands
for any coding it does not name. For the Connect protocol's unary calls (Accept-Encoding),
its streams (Connect-Accept-Encoding) and gRPC (grpc-accept-encoding)."""

from __future__ import annotations

import json

import httpx
import pytest

from coupon.gen.coupon.v1 import coupon_pb
from harness.server import ServerProcess
from tests.clients.conftest import TOKEN
from tests.clients.h2client import SERVICE, H2Client, Response, grpc_frame, grpc_headers

pytestmark = pytest.mark.e2e

# What the client accepts, and the coding of the answer.
CASES = {
    "gzip, second choice": ("deflate, gzip;q=0.5", "gzip"),
    "gzip, weights in capitals": ("br;q=0.9, GZIP;Q=0.8", "gzip"),
    "gzip weighed 0": ("gzip;q=0", "identity"),
    "identity preferred": ("gzip;q=0.5, identity", "identity"),
    "identity preferred by weight": ("gzip;q=0.2, identity;q=0.7", "identity"),
    "anything": ("*", "gzip"),
    "anything but gzip": ("gzip;q=0, *", "identity"),
    "a weight malformed": ("gzip;q=high", "identity"),
}


@pytest.mark.parametrize("http2", [False, True], ids=["HTTP/1.1", "HTTP/2"])
@pytest.mark.parametrize("case", CASES)
def test_a_connect_unary_answer_is_in_the_coding_most_wanted(
    coupon_server: ServerProcess, http2: bool, case: str
) -> None:
    accepted, coding = CASES[case]
    with httpx.Client(http1=not http2, http2=http2, timeout=10) as web:
        answer = web.post(
            f"{coupon_server.url}{SERVICE}ListUserCoupons",
            json={"userId": "weights"},
            headers={"accept-encoding": accepted},
        )
    assert answer.status_code == 200, answer.text
    assert answer.headers.get("content-encoding", "identity") == coding
    assert answer.json() == {}  # decoded as the coding it says


@pytest.mark.parametrize("case", ["gzip, second choice", "gzip weighed 0"])
def test_a_connect_stream_is_in_the_coding_most_wanted(
    coupon_server: ServerProcess, case: str
) -> None:
    accepted, coding = CASES[case]
    body = json.dumps({"campaignId": "01a244b6-5173-7232-9e3e-cfbd538716e1"}).encode()
    answer = httpx.post(
        f"{coupon_server.url}{SERVICE}ExportCoupons",
        content=b"\x00" + len(body).to_bytes(4, "big") + body,
        headers={
            "content-type": "application/connect+json",
            "connect-accept-encoding": accepted,
            "authorization": f"Bearer {TOKEN}",
        },
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["connect-content-encoding"] == coding


@pytest.mark.parametrize("case", ["gzip, second choice", "gzip weighed 0"])
def test_a_grpc_answer_is_in_the_coding_most_wanted(
    coupon_server: ServerProcess, case: str
) -> None:
    accepted, coding = CASES[case]
    request = grpc_frame(coupon_pb.ListUserCouponsRequest(user_id="weights"))
    with H2Client(coupon_server.port) as client:
        stream_id = client.conn.get_next_available_stream_id()
        extra = ((b"te", b"trailers"), (b"grpc-accept-encoding", accepted.encode()))
        client.conn.send_headers(stream_id, grpc_headers("ListUserCoupons", *extra))
        client.conn.send_data(stream_id, request, end_stream=True)
        client.responses[stream_id] = Response()
        client.flush()
        [response] = client.wait(stream_id)
    assert response.grpc_status == b"0", response
    assert response.headers[b"grpc-encoding"] == coding.encode()
