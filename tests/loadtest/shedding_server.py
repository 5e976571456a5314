"""The real service (in memory) behind a front door that sheds each user's first
IssueCoupon the way an overloaded server answers: at once, Connect `unavailable` (HTTP 503)
with a `retry-after-ms` hint. A herd must come back after the hint and still get exactly
the stock. Run with COUPON_BACKEND=memory:

    python -m uvicorn tests.loadtest.shedding_server:app

`outcome_unknown_app` answers instead as the service does when PostgreSQL fails while
recording a coupon: every third user's first IssueCoupon is issued (and listed), but its
answer is `unavailable` whose message says the outcome is unknown. `unmarked_app` does the
same with a plain `unavailable`, a refusal that claims nothing was issued: a server that
lies so must fail the tool's checks.

`slow_listing_app` serves IssueCoupon as it is, but answers the first full GetCampaign
listing (a page of more than one coupon: the read-back after the load) only after
SLOW_LISTING_S; `failing_listing_app` answers every one with `internal`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from litestar.types import Message, Receive, Scope, Send
from protobuf import Message as ProtoMessage

from coupon.entrypoints.app import create_app
from coupon.gen.coupon.v1 import coupon_pb

M = TypeVar("M", bound=ProtoMessage[Any])

ISSUE_PATH = "/coupon.v1.CouponService/IssueCoupon"
GET_CAMPAIGN_PATH = "/coupon.v1.CouponService/GetCampaign"
SLOW_LISTING_S = 2.0
RETRY_AFTER_MS = 1000


OUTCOME_UNKNOWN_MESSAGE = (
    "outcome unknown: PostgreSQL is unavailable: ConnectionDoesNotExistError: connection was "
    "closed in the middle of operation, while recording: it may have been recorded all the "
    "same; retry (a coupon recorded is returned to its user, never issued twice)"
)


class ShedFirstPress:
    def __init__(self) -> None:
        self._service = create_app()
        self._seen: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != ISSUE_PATH:
            await self._service(scope, receive, send)
            return
        body = await _body(receive)
        user = _request(scope, body, coupon_pb.IssueCouponRequest).user_id
        first = user not in self._seen
        self._seen.add(user)
        await self.answer(scope, _replay(body, receive), send, user, first=first)

    async def answer(
        self, scope: Scope, receive: Receive, send: Send, user: str, *, first: bool
    ) -> None:
        if first:
            await _shed(send)
        else:
            await self._service(scope, receive, send)


class RecordedButUnanswered(ShedFirstPress):
    """Issues every third user's first request, then answers it `unavailable` with
    `message`, as if the answer had been lost to a PostgreSQL failure."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self._message = message

    async def answer(
        self, scope: Scope, receive: Receive, send: Send, user: str, *, first: bool
    ) -> None:
        if not first or int(user.rsplit("-", 1)[1]) % 3:
            await self._service(scope, receive, send)
            return

        async def swallow(message: Message) -> None:
            pass

        await self._service(scope, receive, swallow)
        await _shed(send, self._message)


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _shed(send: Send, message: str = "overloaded: try again shortly") -> None:
    payload = json.dumps({"code": "unavailable", "message": message, "details": []}).encode()
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


class SlowListing:
    """The full listing is slow the first `slow` times, and fails after that if `fail`."""

    def __init__(self, *, slow: int, fail: bool) -> None:
        self._service = create_app()
        self._slow = slow
        self._fail = fail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != GET_CAMPAIGN_PATH:
            await self._service(scope, receive, send)
            return
        body = await _body(receive)
        request = _request(scope, body, coupon_pb.GetCampaignRequest)
        if request.page_size > 1:
            if self._slow > 0:
                self._slow -= 1
                await asyncio.sleep(SLOW_LISTING_S)
            elif self._fail:
                await _error(send, 500, "internal", "listing is broken")
                return
        await self._service(scope, _replay(body, receive), send)


async def _body(receive: Receive) -> bytes:
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")  # type: ignore[operator]
        more = bool(message.get("more_body", False))
    return body


def _request(scope: Scope, body: bytes, message: type[M]) -> M:
    """The request message, in JSON or binary as its content type says."""
    content_type = dict(scope["headers"]).get(b"content-type", b"")
    if content_type.startswith(b"application/json"):
        return message.from_json(body)
    return message.from_binary(body)


async def _error(send: Send, status: int, code: str, message: str) -> None:
    payload = json.dumps({"code": code, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})


app = ShedFirstPress()
outcome_unknown_app = RecordedButUnanswered(OUTCOME_UNKNOWN_MESSAGE)
unmarked_app = RecordedButUnanswered("PostgreSQL is unavailable: it did not answer in time")
slow_listing_app = SlowListing(slow=1, fail=False)
failing_listing_app = SlowListing(slow=0, fail=True)
