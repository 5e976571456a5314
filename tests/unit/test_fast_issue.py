"""The IssueCoupon fast path answers in the Connect protocol whatever the service raises."""

from __future__ import annotations

import json

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from litestar.types import Message, Scope

from coupon.entrypoints.fast_issue import ISSUE_PATH, FastIssue
from coupon.gen.coupon.v1 import coupon_pb


async def call(fast: FastIssue, body: bytes) -> tuple[int, dict[str, str], bytes]:
    scope: Scope = {  # type: ignore[typeddict-item]
        "type": "http",
        "method": "POST",
        "path": ISSUE_PATH,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    codec = fast.accepts(scope)
    assert codec is not None
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await fast(scope, receive, send, codec)  # type: ignore[arg-type]
    start, end = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, end["body"]


async def test_an_unexpected_exception_is_a_connect_internal_error() -> None:
    async def issue(_: coupon_pb.IssueCouponRequest) -> coupon_pb.IssueCouponResponse:
        raise RuntimeError("boom")

    status, headers, body = await call(FastIssue(issue, 1024), b'{"campaignId": "x"}')
    assert status == 500
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"code": "internal", "message": "RuntimeError"}


async def test_a_connect_error_keeps_its_code_and_http_status() -> None:
    async def issue(_: coupon_pb.IssueCouponRequest) -> coupon_pb.IssueCouponResponse:
        raise ConnectError(Code.RESOURCE_EXHAUSTED, "sold out")

    status, _, body = await call(FastIssue(issue, 1024), b'{"campaignId": "x"}')
    assert status == 429
    assert json.loads(body) == {"code": "resource_exhausted", "message": "sold out"}
