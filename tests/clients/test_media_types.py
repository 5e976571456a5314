"""A gRPC or gRPC-Web Content-Type written otherwise than in lower case without parameters
is the same media type (RFC 9110, 8.3.1: case-insensitive, parameters allowed; gRPC's own
servers take `application/grpc; charset=utf-8`): answered in its protocol, not with a 415."""

from __future__ import annotations

import httpx
import pytest

from coupon.gen.coupon.v1 import coupon_pb
from harness.server import ServerProcess
from tests.clients.h2client import SERVICE, H2Client, grpc_frame

pytestmark = pytest.mark.e2e

REQUEST = grpc_frame(coupon_pb.ListUserCouponsRequest(user_id="someone"))


@pytest.mark.parametrize(
    "content_type",
    [
        "Application/gRPC-Web+Proto",
        "application/grpc-web+proto; charset=utf-8",
        "APPLICATION/GRPC-WEB",
    ],
)
def test_grpc_web_in_any_case_or_with_parameters(
    coupon_server: ServerProcess, content_type: str
) -> None:
    answer = httpx.post(
        f"{coupon_server.url}{SERVICE}ListUserCoupons",
        content=REQUEST,
        headers={"content-type": content_type},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/grpc-web")
    assert b"grpc-status:0" in answer.content.replace(b" ", b""), answer.content


@pytest.mark.parametrize(
    "content_type", [b"application/grpc; charset=utf-8", b"Application/GRPC+proto"]
)
def test_grpc_in_any_case_or_with_parameters(
    coupon_server: ServerProcess, content_type: bytes
) -> None:
    with H2Client(coupon_server.port) as client:
        stream_id = client.request(f"{SERVICE}ListUserCoupons".encode(), content_type, REQUEST)
        [response] = client.wait(stream_id)
    assert response.headers[b":status"] == b"200", response
    assert response.grpc_status == b"0", response
