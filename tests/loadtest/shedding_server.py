"""The real service (in memory) behind a front door that sheds each user's first
IssueCoupon the way an overloaded server answers: at once, Connect `unavailable` (HTTP 503)
with a `retry-after-ms` hint. A herd must come back after the hint and still get exactly
the stock. Run with COUPON_BACKEND=memory:

    python -m uvicorn tests.loadtest.shedding_server:app
"""

from __future__ import annotations

import json

from litestar.types import Message, Receive, Scope, Send

from coupon.entrypoints.app import create_app
from coupon.gen.coupon.v1 import coupon_pb

ISSUE_PATH = "/coupon.v1.CouponService/IssueCoupon"
RETRY_AFTER_MS = 200


class ShedFirstPress:
    def __init__(self) -> None:
        self._service = create_app()
        self._seen: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != ISSUE_PATH:
            await self._service(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")  # type: ignore[operator]
            more = bool(message.get("more_body", False))
        content_type = dict(scope["headers"]).get(b"content-type", b"")
        if content_type.startswith(b"application/json"):
            user = coupon_pb.IssueCouponRequest.from_json(body).user_id
        else:
            user = coupon_pb.IssueCouponRequest.from_binary(body).user_id
        if user not in self._seen:
            self._seen.add(user)
            await _shed(send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self._service(scope, replay, send)


async def _shed(send: Send) -> None:
    payload = json.dumps(
        {"code": "unavailable", "message": "overloaded: try again shortly", "details": []}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"retry-after-ms", str(RETRY_AFTER_MS).encode()),
                (b"retry-after", b"1"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})


app = ShedFirstPress()
