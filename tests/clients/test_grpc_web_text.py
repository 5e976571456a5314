"""gRPC-Web's text mode (`application/grpc-web-text`), the grpc-web JavaScript client's
default, against a real server over a real socket: requests built by hand (the base64 of
gRPC-Web's framing), answers decoded by hand."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import subprocess
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from coupon.gen.coupon.v1 import coupon_pb
from harness.client import connect_client, create_campaign
from harness.raw_http import Response, open_connection, read_response
from harness.server import ServerProcess
from tests.clients.conftest import ROOT, TOKEN, need_node_packages
from tests.clients.h2client import CODEC, grpc_frame

pytestmark = pytest.mark.e2e

SERVICE = "/coupon.v1.CouponService/"
TEXT = "application/grpc-web-text+proto"


@pytest.fixture(scope="module")
async def campaign(coupon_server: ServerProcess) -> str:
    async with connect_client(coupon_server.url) as client:
        made = await create_campaign(client, total=100, token=TOKEN, name="text mode")
    return made.id


def encoded(message: object) -> bytes:
    return base64.b64encode(grpc_frame(message))


async def call(
    server: ServerProcess,
    rpc: str,
    chunks: Sequence[bytes],
    *,
    content_type: str = TEXT,
    headers: str = "",
) -> Response:
    """POST the body in `chunks`: one of them with a Content-Length, several sent chunked,
    each written on its own after a pause (its own packet)."""
    reader, writer = await open_connection(server.url)
    try:
        head = f"POST {SERVICE}{rpc} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
        head += headers
        if len(chunks) == 1:
            writer.write(f"{head}Content-Length: {len(chunks[0])}\r\n\r\n".encode() + chunks[0])
        else:
            writer.write(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            for chunk in chunks:
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            writer.write(b"0\r\n\r\n")
        return await asyncio.wait_for(read_response(reader), 30)
    finally:
        writer.close()


def frames(response: Response) -> list[tuple[int, bytes]]:
    """The gRPC-Web frames of a text-mode answer. Each 4-character quantum of base64
    decodes on its own, so padded chunks concatenated decode as well as one encoding."""
    text = response.body
    assert len(text) % 4 == 0, text
    data = b"".join(
        base64.b64decode(text[i : i + 4], validate=True) for i in range(0, len(text), 4)
    )
    found = []
    while data:
        flags, length = struct.unpack(">BI", data[:5])
        found.append((flags, data[5 : 5 + length]))
        data = data[5 + length :]
    return found


def messages_and_trailers(response: Response) -> tuple[list[bytes], dict[str, str]]:
    """The messages, then the trailer frame's fields, which must end the body."""
    assert response.status == 200
    *messages, (flags, trailer) = frames(response)
    assert flags == 0x80, "the body ends with the trailer frame"
    assert all(f == 0 for f, _ in messages)
    fields = {}
    for line in trailer.decode().split("\r\n"):
        if line:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    return [m for _, m in messages], fields


def issued(response: Response) -> coupon_pb.IssueCouponResponse:
    messages, trailers = messages_and_trailers(response)
    assert trailers["grpc-status"] == "0", trailers
    assert len(messages) == 1
    return CODEC.decode(messages[0], coupon_pb.IssueCouponResponse)


@pytest.mark.parametrize("content_type", [TEXT, "application/grpc-web-text"])
async def test_a_text_mode_call_is_answered_in_text_mode(
    coupon_server: ServerProcess, campaign: str, content_type: str
) -> None:
    request = coupon_pb.IssueCouponRequest(campaign_id=campaign, user_id=f"text {content_type}")
    response = await call(
        coupon_server, "IssueCoupon", [encoded(request)], content_type=content_type
    )
    assert response.headers["content-type"] == content_type
    coupon = issued(response).coupon
    assert coupon is not None and coupon.user_id == request.user_id


async def test_an_error_comes_in_the_encoded_trailer_frame(
    coupon_server: ServerProcess, campaign: str
) -> None:
    request = coupon_pb.IssueCouponRequest(campaign_id=campaign, user_id="")
    response = await call(coupon_server, "IssueCoupon", [encoded(request)])
    assert response.headers["content-type"] == TEXT
    messages, trailers = messages_and_trailers(response)
    assert messages == []
    assert trailers["grpc-status"] == "3"  # invalid_argument
    assert unquote(trailers["grpc-message"]) == "user_id: must not be empty"


async def test_a_body_split_anywhere_across_packets_is_read_whole(
    coupon_server: ServerProcess, campaign: str
) -> None:
    text = encoded(coupon_pb.IssueCouponRequest(campaign_id=campaign, user_id="in pieces"))
    pieces = [text[:1], text[1:3], text[3:10], text[10:11], text[11:]]
    coupon = issued(await call(coupon_server, "IssueCoupon", pieces)).coupon
    assert coupon is not None and coupon.user_id == "in pieces"


async def test_padded_chunks_concatenated_are_read_as_one_body(
    coupon_server: ServerProcess, campaign: str
) -> None:
    """The gRPC-Web spec lets a client encode each chunk on its own, padding included."""
    frame = grpc_frame(coupon_pb.IssueCouponRequest(campaign_id=campaign, user_id="padded"))
    parts = [frame[:4], frame[4:9], frame[9:]]  # 4 and 5 bytes: both end padded
    body = b"".join(base64.b64encode(part) for part in parts)
    assert body.count(b"=") >= 2 and not body.endswith(b"=")
    for chunks in ([body], [body[:7], body[7:13], body[13:]]):
        coupon = issued(await call(coupon_server, "IssueCoupon", chunks)).coupon
        assert coupon is not None and coupon.user_id == "padded"


@pytest.mark.parametrize(
    "body",
    [b"AAAA*AAA", b"AA=AAAAA", b"AAAAA", b"AA\r\nAAAA"],
    ids=["not-base64", "padding-inside", "a-lone-character", "a-line-break"],
)
async def test_a_body_that_is_not_base64_is_invalid_argument(
    coupon_server: ServerProcess, body: bytes
) -> None:
    response = await call(coupon_server, "IssueCoupon", [body])
    assert response.headers["content-type"] == TEXT
    messages, trailers = messages_and_trailers(response)
    assert messages == []
    assert trailers["grpc-status"] == "3"
    assert unquote(trailers["grpc-message"]) == "request body: not valid base64 (gRPC-Web text)"


async def test_the_server_stream_comes_message_by_message_then_its_trailers(
    coupon_server: ServerProcess,
) -> None:
    async with connect_client(coupon_server.url) as client:
        made = await create_campaign(client, total=5, token=TOKEN, name="export in text")
    users = ["ana", "ben", "cy"]
    for user in users:
        request = coupon_pb.IssueCouponRequest(campaign_id=made.id, user_id=user)
        issued(await call(coupon_server, "IssueCoupon", [encoded(request)]))
    request = coupon_pb.ExportCouponsRequest(campaign_id=made.id)
    response = await call(
        coupon_server,
        "ExportCoupons",
        [encoded(request)],
        headers=f"Authorization: Bearer {TOKEN}\r\n",
    )
    assert response.headers["content-type"] == TEXT
    messages, trailers = messages_and_trailers(response)
    assert trailers["grpc-status"] == "0", trailers
    exported = [
        coupon.user_id
        for message in messages
        for coupon in CODEC.decode(message, coupon_pb.ExportCouponsResponse).coupons
    ]
    assert sorted(exported) == users


async def test_an_admin_call_without_the_token_is_unauthenticated(
    coupon_server: ServerProcess, campaign: str
) -> None:
    request = coupon_pb.GetCampaignRequest(campaign_id=campaign)
    response = await call(coupon_server, "GetCampaign", [encoded(request)])
    messages, trailers = messages_and_trailers(response)
    assert (messages, trailers["grpc-status"]) == ([], "16")


async def test_json_in_text_mode_is_an_unsupported_content_type(
    coupon_server: ServerProcess,
) -> None:
    """gRPC-Web's text mode is protobuf only: 415, listing the types the method takes."""
    response = await call(coupon_server, "IssueCoupon", [b"e30="], content_type=TEXT[:-5] + "json")
    assert response.status == 415
    accepted = {t.strip() for t in response.headers["accept-post"].split(",")}
    assert {TEXT, "application/grpc-web+proto"} <= accepted


@pytest.mark.parametrize("http2", [False, True], ids=["HTTP/1.1", "HTTP/2"])
def test_text_mode_over_each_http_version(
    coupon_server: ServerProcess, campaign: str, http2: bool
) -> None:
    request = coupon_pb.IssueCouponRequest(campaign_id=campaign, user_id=f"over h2={http2}")
    with httpx.Client(http1=not http2, http2=http2, timeout=30) as web:
        answer = web.post(
            f"{coupon_server.url}{SERVICE}IssueCoupon",
            content=encoded(request),
            headers={"content-type": TEXT, "x-grpc-web": "1"},
        )
    assert answer.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert answer.headers["content-type"] == TEXT
    response = Response(answer.status_code, dict(answer.headers), answer.content)
    coupon = issued(response).coupon
    assert coupon is not None and coupon.user_id == request.user_id


GRPCWEB_TEXT = ROOT / "tests" / "clients" / "node" / "grpcweb_text.mjs"


def grpcweb_text_calls(base_url: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each call's result from the grpc-web JavaScript client in text mode, on Node:
    {"response"} or {"error": {"code", "message"}} (gRPC's numeric code)."""
    need_node_packages()
    if not (ROOT / "node_modules" / "grpc-web").is_dir():
        pytest.skip("the npm package grpc-web (npm ci, run by `just test`) is needed")
    done = subprocess.run(
        ["node", str(GRPCWEB_TEXT), json.dumps({"baseUrl": base_url, "calls": calls})],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


async def test_the_grpc_web_javascript_client_in_text_mode(
    coupon_server: ServerProcess,
) -> None:
    """The client nobody here wrote, as protoc-gen-grpc-web's code drives it: a coupon
    issued, then again (alreadyIssued), an error, and the server stream."""
    async with connect_client(coupon_server.url) as client:
        made = await create_campaign(client, total=3, token=TOKEN, name="grpc-web text")
    issue = {"rpc": "IssueCoupon", "request": {"campaignId": made.id, "userId": "grpc-web"}}
    first, again, invalid, unauthenticated, exported = grpcweb_text_calls(
        coupon_server.url,
        [
            issue,
            issue,
            {"rpc": "IssueCoupon", "request": {"campaignId": made.id, "userId": ""}},
            {"rpc": "GetCampaign", "request": {"campaignId": made.id}},
            {"rpc": "ExportCoupons", "request": {"campaignId": made.id}, "token": TOKEN},
        ],
    )
    coupon = first["response"]["coupon"]
    assert coupon["userId"] == "grpc-web"
    assert again["response"] == {"coupon": coupon, "alreadyIssued": True}
    assert invalid["error"] == {"code": 3, "message": "user_id: must not be empty"}
    assert unauthenticated["error"]["code"] == 16
    [page] = exported["response"]["messages"]
    assert page["coupons"] == [coupon]


async def test_unavailable_carries_its_retry_hint_in_text_mode(
    coupon_server: ServerProcess, redis_down_server: ServerProcess, campaign: str
) -> None:
    """Redis down: `unavailable`, nothing issued, with the retry hint as a header and as
    the RetryInfo detail of the encoded trailer frame."""
    request = coupon_pb.IssueCouponRequest(campaign_id=campaign, user_id="no redis")
    response = await call(redis_down_server, "IssueCoupon", [encoded(request)])
    assert response.headers["content-type"] == TEXT
    messages, trailers = messages_and_trailers(response)
    assert messages == []
    assert trailers["grpc-status"] == "14"  # unavailable
    assert unquote(trailers["grpc-message"]).startswith("Redis is unavailable")
    assert int(response.headers["retry-after-ms"]) > 0
    details = base64.b64decode(trailers["grpc-status-details-bin"] + "==")
    assert b"google.rpc.RetryInfo" in details
