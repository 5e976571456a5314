"""The IssueCoupon fast path answers in the Connect protocol whatever the service does."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.codec import proto_binary_codec
from connectrpc.errors import ConnectError
from litestar.types import Message, Scope
from protobuf.wkt import Duration

from coupon.application.issue import Issued, Pending
from coupon.domain.coupon import Coupon
from coupon.entrypoints.fast_issue import ISSUE_PATH, FastIssue, IssueRoute, codec_for
from coupon.entrypoints.overload import RETRY_INFO_TYPE, RetryLater, retry_info
from coupon.gen.coupon.v1 import coupon_pb

Work = Callable[[coupon_pb.IssueCouponRequest], Coroutine[Any, Any, Issued]]


class Service:
    """Answers at once with `at_once` when given, else lets the request in to `work`,
    whose end settles the request's outcome."""

    def __init__(self, work: Work | None = None, at_once: ConnectError | None = None) -> None:
        self._work = work
        self._at_once = at_once
        self.let_in = 0
        self.finished = 0
        self.unreadable: list[Code] = []

    def issue_at_once(
        self, request: coupon_pb.IssueCouponRequest, arrived: float
    ) -> ConnectError | None:
        return self._at_once

    def issue_unreadable(self, error: ConnectError, arrived: float) -> None:
        self.unreadable.append(error.code)

    def issue_begin(self, request: coupon_pb.IssueCouponRequest, arrived: float) -> Pending:
        self.let_in += 1
        assert self._work is not None
        pending = Pending(asyncio.get_running_loop().create_future(), 0.0)
        pending.go_on(self._work(request))
        return pending

    def issue_finish(
        self,
        request: coupon_pb.IssueCouponRequest,
        arrived: float,
        outcome: asyncio.Future[Issued],
    ) -> Issued:
        self.finished += 1  # the request left the door, whatever its outcome
        return outcome.result()

    doorman = None


async def call(service: Service, body: bytes) -> tuple[int, dict[str, str], bytes]:
    fast = FastIssue(IssueRoute(service), 1024)
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


async def test_an_issued_coupon_is_answered_with_its_fields() -> None:
    at = datetime(2026, 12, 3, 12, 0, 0, 250_000, tzinfo=UTC)

    async def issue(request: coupon_pb.IssueCouponRequest) -> Issued:
        return Issued(Coupon("가나다라마바자차카타", request.campaign_id, "u", at, 7), True)

    status, headers, body = await call(Service(issue), b'{"campaignId": "c", "userId": "u"}')
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "coupon": {
            "code": "가나다라마바자차카타",
            "campaignId": "c",
            "userId": "u",
            "issuedAt": "2026-12-03T12:00:00.250Z",
        },
        "alreadyIssued": True,
    }


async def test_a_caller_that_leaves_cancels_the_request_which_still_leaves_the_door() -> None:
    started, stopped = asyncio.Event(), asyncio.Event()

    async def issue(_: coupon_pb.IssueCouponRequest) -> Issued:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()
        raise AssertionError("never answered")

    service = Service(issue)
    caller = asyncio.ensure_future(call(service, b'{"campaignId": "c", "userId": "u"}'))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(stopped.wait(), 1)
    assert service.finished == 1


class Given(Service):
    """Lets every request in to a Pending the test settles itself."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: Pending | None = None

    def issue_begin(self, request: coupon_pb.IssueCouponRequest, arrived: float) -> Pending:
        self.let_in += 1
        if self.pending is None:
            self.pending = Pending(asyncio.get_running_loop().create_future(), 0.0)
        return self.pending


def _lane(service: Service) -> tuple[Pending, list[tuple[int, bytes, bytes, object]]]:
    """The HTTP/1.1 lane's way in: `answer_soon`, replies collected."""
    route = IssueRoute(service)
    codec = codec_for(b"application/json")
    assert codec is not None
    request = route.at_once(b'{"campaignId": "c", "userId": "u"}', codec, 0.0)
    assert isinstance(request, coupon_pb.IssueCouponRequest)
    replies: list[tuple[int, bytes, bytes, object]] = []
    return route.answer_soon(request, codec, 0.0, replies.append), replies


async def test_the_lane_replies_as_the_outcome_settles_not_a_turn_of_the_loop_later() -> None:
    service = Given()
    pending, replies = _lane(service)
    assert replies == []
    pending.succeed(Issued(Coupon("가나다라마바자차카타", "c", "u", datetime.now(UTC), 1), False))
    assert [r[0] for r in replies] == [200]  # no await in between
    assert service.finished == 1


async def test_the_lane_replies_at_once_to_an_outcome_settled_already() -> None:
    service = Given()
    service.pending = Pending(asyncio.get_running_loop().create_future(), 0.0)
    service.pending.fail(ConnectError(Code.NOT_FOUND, "no such campaign"))
    _, replies = _lane(service)
    assert [r[0] for r in replies] == [404]
    assert service.finished == 1


async def test_a_request_cancelled_at_shutdown_leaves_the_door_on_the_next_turn() -> None:
    """A server's shutdown cancels its tasks in a loop over them: the request leaves the
    door, unanswered, but not from inside `cancel`, where a step could change that set."""
    service = Given()
    pending, replies = _lane(service)
    assert pending.cancel(msg="graceful shutdown exceeded")
    assert service.finished == 0
    await asyncio.sleep(0)
    assert service.finished == 1
    assert replies == []
    assert pending.outcome.cancelled()


async def test_an_unexpected_exception_is_a_connect_internal_error() -> None:
    async def issue(_: coupon_pb.IssueCouponRequest) -> Issued:
        raise RuntimeError("boom")

    status, headers, body = await call(Service(issue), b'{"campaignId": "x"}')
    assert status == 500
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"code": "internal", "message": "RuntimeError"}


async def test_a_connect_error_keeps_its_code_and_http_status() -> None:
    async def issue(_: coupon_pb.IssueCouponRequest) -> Issued:
        raise ConnectError(Code.RESOURCE_EXHAUSTED, "sold out")

    status, _, body = await call(Service(issue), b'{"campaignId": "x"}')
    assert status == 429
    assert json.loads(body) == {"code": "resource_exhausted", "message": "sold out"}


async def test_an_undecodable_body_is_invalid_and_never_let_in() -> None:
    service = Service()
    status, _, body = await call(service, b'{"campaignId": 5')
    assert status == 400
    assert json.loads(body)["code"] == "invalid_argument"
    assert service.let_in == 0
    assert service.unreadable == [Code.INVALID_ARGUMENT]  # counted by the service


async def test_a_request_turned_away_carries_the_retry_hint_in_header_and_detail() -> None:
    service = Service(at_once=RetryLater("at capacity", 1250))
    status, headers, body = await call(service, b'{"campaignId": "x", "userId": "u"}')
    assert status == 503
    assert headers["retry-after-ms"] == "1250"
    assert headers["retry-after"] == "2"
    error = json.loads(body)
    assert error["code"] == "unavailable"
    (detail,) = error["details"]
    assert "type.googleapis.com/" + detail["type"] == RETRY_INFO_TYPE
    value = detail["value"]
    assert base64.b64decode(value + "=" * (-len(value) % 4)) == retry_info(1250)
    assert detail["debug"] == {"retryDelay": "1.250s"}
    assert service.let_in == 0


@pytest.mark.parametrize(
    ("ms", "seconds", "nanos"), [(1250, 1, 250_000_000), (300, 0, 300_000_000)]
)
def test_retry_info_is_field_one_holding_the_delay_as_a_duration(
    ms: int, seconds: int, nanos: int
) -> None:
    duration = proto_binary_codec().encode(Duration(seconds=seconds, nanos=nanos))
    assert retry_info(ms) == b"\x0a" + bytes([len(duration)]) + duration
