"""Whitespace around a deadline header's value, which is not part of the value (RFC 9110,
5.5) but which the HTTP/1.1 parser leaves in: the deadline is read, not refused as
malformed. Over a socket by hand, since HTTP clients will not send it."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from coupon.gen.coupon.v1 import coupon_pb
from harness.client import connect_client, create_campaign
from harness.raw_http import ISSUE, Response, open_connection, read_response
from harness.server import ServerProcess
from tests.clients.conftest import TOKEN
from tests.clients.h2client import CODEC, grpc_frame

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def campaign(coupon_server: ServerProcess) -> str:
    async with connect_client(coupon_server.url) as client:
        made = await create_campaign(client, total=100, token=TOKEN, name="deadlines")
    return made.id


async def post(server: ServerProcess, content_type: str, header: bytes, body: bytes) -> Response:
    reader, writer = await open_connection(server.url)
    try:
        writer.write(
            f"POST {ISSUE} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n".encode()
            + header
            + b"\r\n\r\n"
            + body
        )
        return await asyncio.wait_for(read_response(reader), 30)
    finally:
        writer.close()


def decoded(text: bytes) -> bytes:
    """Text mode's answer: padded chunks concatenated, each 4-character quantum on its own."""
    return b"".join(base64.b64decode(text[i : i + 4]) for i in range(0, len(text), 4))


@pytest.mark.parametrize("value", [b"5000 ", b"5000\t", b"5000 \t "])
async def test_a_connect_deadline_with_whitespace_after_it_is_read(
    coupon_server: ServerProcess, campaign: str, value: bytes
) -> None:
    user = f"connect {value!r}"
    body = json.dumps({"campaignId": campaign, "userId": user}).encode()
    header = b"Connect-Timeout-Ms: " + value
    response = await post(coupon_server, "application/json", header, body)
    assert response.status == 200, response.body
    assert response.json()["coupon"]["userId"] == user  # type: ignore[index]


@pytest.mark.parametrize("value", [b"5S ", b"5000m\t", b"5S \t "])
async def test_a_grpc_web_deadline_with_whitespace_after_it_is_read(
    coupon_server: ServerProcess, campaign: str, value: bytes
) -> None:
    user = f"grpc-web {value!r}"
    frame = grpc_frame(coupon_pb.IssueCouponRequest(campaign_id=campaign, user_id=user))
    header = b"X-Grpc-Web: 1\r\nGrpc-Timeout: " + value
    for content_type, body in (
        ("application/grpc-web+proto", frame),
        ("application/grpc-web-text+proto", base64.b64encode(frame)),
    ):
        response = await post(coupon_server, content_type, header, body)
        assert response.status == 200
        data = response.body if "text" not in content_type else decoded(response.body)
        assert response.headers.get("grpc-status") is None, response.headers  # not refused
        length = int.from_bytes(data[1:5], "big")
        message = CODEC.decode(data[5 : 5 + length], coupon_pb.IssueCouponResponse)
        assert message.coupon is not None and message.coupon.user_id == user
        assert b"grpc-status: 0" in data[5 + length :]  # the trailer frame


async def test_a_malformed_deadline_is_still_refused_without_its_whitespace(
    coupon_server: ServerProcess, campaign: str
) -> None:
    body = json.dumps({"campaignId": campaign, "userId": "malformed deadline"}).encode()
    response = await post(coupon_server, "application/json", b"Connect-Timeout-Ms: 12x \t", body)
    assert response.status == 400
    assert response.json() == {
        "code": "invalid_argument",
        "message": "Invalid timeout header: '12x'",
    }


async def send_raw(server: ServerProcess, request: bytes) -> Response:
    reader, writer = await open_connection(server.url)
    try:
        writer.write(request)
        return await asyncio.wait_for(read_response(reader), 30)
    finally:
        writer.close()


async def test_a_host_with_whitespace_after_it_is_the_host(coupon_server: ServerProcess) -> None:
    """The front door took it for a host, the framework for no host (400)."""
    answer = await send_raw(coupon_server, b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1   \r\n\r\n")
    assert answer.status == 200, answer


async def test_a_request_id_is_logged_without_the_whitespace_after_it(
    coupon_server: ServerProcess,
) -> None:
    body = json.dumps({"name": "spaced", "totalCoupons": 1, "startsAt": "2026-01-01T00:00:00Z"})
    answer = await send_raw(
        coupon_server,
        b"POST /coupon.v1.CouponService/CreateCampaign HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\nX-Request-Id: rid-spaced   \r\n"
        + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body.encode(),
    )
    assert answer.status == 200, answer
    logged = [line for line in coupon_server.log().splitlines() if "rid-spaced" in line]
    ids = {json.loads(line).get("request_id") for line in logged if line.startswith("{")}
    assert ids == {"rid-spaced"}, ids
