"""IssueCoupon's hot path, without the generic Connect machinery around it.

The common request — a unary POST of a binary protobuf or JSON body, uncompressed, with
a Content-Length and no timeout header — is answered here with the Connect library's own
codecs and the Connect protocol's error format. Anything else (compression, deadlines, GET,
chunked bodies, gRPC, gRPC-Web) goes to the full Connect application, which implements the
whole protocol.

`IssueRoute` turns a request body into response bytes; two front doors use it: the HTTP/1.1
protocol (entrypoints/http/h1.py), which answers without an ASGI cycle at all, and
`FastIssue`, the same route as an ASGI app (HTTP/2, and HTTP/1.1 requests the protocol
leaves to uvicorn). What needs no I/O — a malformed body, a bad field, a remembered
refusal, a request shed under overload — is answered synchronously, without a task.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

from connectrpc.code import Code
from connectrpc.codec import Codec, proto_binary_codec
from connectrpc.errors import ConnectError
from litestar.types import (
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Receive,
    Scope,
    Send,
)

from coupon.application.issue import Issued, Pending
from coupon.entrypoints.codecs import IssueJsonCodec, binary_error, refused_charset
from coupon.entrypoints.logs import REQUEST_HEADERS
from coupon.entrypoints.overload import Doorman, RetryLater, retry_headers
from coupon.entrypoints.translate import issue_response, issue_response_bytes
from coupon.gen.coupon.v1 import coupon_pb

ISSUE_PATH = "/coupon.v1.CouponService/IssueCoupon"
ISSUE_PATH_BYTES = ISSUE_PATH.encode()

Headers = list[tuple[bytes, bytes]]
# status, content type, body, extra headers
Answer = tuple[int, bytes, bytes, Headers]

_CODECS: dict[bytes, tuple[Codec, bytes]] = {
    b"application/proto": (proto_binary_codec(), b"application/proto"),
    b"application/json": (IssueJsonCodec(), b"application/json"),
}
# The Connect protocol's HTTP status for each code.
_STATUS = {
    Code.CANCELED: 499,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.UNAVAILABLE: 503,
    Code.UNAUTHENTICATED: 401,
}
_NO_HEADERS: Headers = []
# The most digits a Content-Length has: more would be past any body limit (a quintillion
# bytes), and Python's int() refuses a string of more than 4,300 of them.
CONTENT_LENGTH_DIGITS = 18
# The Connect (and gRPC) headers that carry one value: a request giving one of them more
# than once is refused (invalid_argument, app.py) rather than read one way or another.
SINGLE_VALUED = frozenset(
    {
        b"content-type",
        b"connect-protocol-version",
        b"connect-timeout-ms",
        b"grpc-timeout",
        b"content-encoding",
        b"connect-content-encoding",
    }
)


class IssueService(Protocol):
    """What the route needs of the service (entrypoints/connect_service.py)."""

    def issue_at_once(
        self, request: coupon_pb.IssueCouponRequest, arrived: float
    ) -> ConnectError | None: ...

    def issue_unreadable(self, error: ConnectError, arrived: float) -> None:
        """Count a request whose body is not an IssueCouponRequest (answered `error`)."""
        ...

    def issue_begin(self, request: coupon_pb.IssueCouponRequest, arrived: float) -> Pending: ...

    def issue_finish(
        self,
        request: coupon_pb.IssueCouponRequest,
        arrived: float,
        outcome: asyncio.Future[Issued],
    ) -> Issued: ...

    @property
    def doorman(self) -> Doorman | None:
        """Its admission control, whose `hold` says how long not to read again from a
        connection just turned away (None: no admission control)."""
        ...


_BY_HEADER: dict[bytes, tuple[Codec, bytes] | None] = {}


def content_length(value: bytes) -> int:
    """A Content-Length value as a number; -1 when it is malformed: not digits alone (RFC
    9110, 8.6), or more of them than CONTENT_LENGTH_DIGITS."""
    return int(value) if value.isdigit() and len(value) <= CONTENT_LENGTH_DIGITS else -1


def other_protocol_version(value: bytes) -> bool:
    """Whether a Connect-Protocol-Version value names a version other than 1, the only one:
    such a request goes to the full Connect application, which refuses it."""
    return value.strip(b" \t") != b"1"


def codec_for(content_type: bytes) -> tuple[Codec, bytes] | None:
    """The codec a Content-Type names (remembered per header value: clients send one)."""
    try:
        return _BY_HEADER[content_type]
    except KeyError:
        pass
    codec = _CODECS.get(content_type.split(b";", 1)[0].strip().lower())
    if codec is not None and refused_charset(content_type) is not None:
        codec = None  # refused by the app (a 415)
    if len(_BY_HEADER) < 64:
        _BY_HEADER[content_type] = codec
    return codec


def error_answer(error: ConnectError) -> Answer:
    """A Connect error as the Connect protocol sends it for a unary call."""
    body: dict[str, object] = {"code": error.code.value, "message": error.message}
    extra = _NO_HEADERS
    if error.details:
        details: list[dict[str, object]] = []
        for detail in error.details:
            value = base64.b64encode(detail.message_bytes).decode().rstrip("=")
            details.append({"type": detail.type_name, "value": value})
        body["details"] = details
    if isinstance(error, RetryLater):
        extra = retry_headers(error.retry_after_ms)
        details[-1]["debug"] = {"retryDelay": f"{error.retry_after_ms / 1000:.3f}s"}
    payload = json.dumps(body, ensure_ascii=False).encode()
    return _STATUS.get(error.code, 500), b"application/json", payload, extra


class IssueRoute:
    def __init__(self, service: IssueService) -> None:
        self._service = service
        self._doorman = service.doorman
        # Answers to errors the service hands out again and again (one per hint value, one
        # per remembered refusal): encoded once.
        self._answers: dict[int, tuple[ConnectError, Answer]] = {}

    def at_once(
        self, body: bytes, codec: tuple[Codec, bytes], arrived: float
    ) -> Answer | coupon_pb.IssueCouponRequest:
        """The answer, when it needs no I/O; else the decoded request, let in (the caller
        must then await `answer`, which lets it out)."""
        try:
            request = codec[0].decode(body, coupon_pb.IssueCouponRequest)
        except ConnectError as exc:  # the JSON codec's, which says it plainly
            return self._unreadable(exc, arrived)
        except Exception:  # noqa: BLE001 - the binary codec's, said plainly
            return self._unreadable(binary_error(body, coupon_pb.IssueCouponRequest), arrived)
        error = self._service.issue_at_once(request, arrived)
        if error is None:
            return request
        known = self._answers.get(id(error))
        if known is None or known[0] is not error:
            if len(self._answers) > 256:
                self._answers.clear()
            known = self._answers[id(error)] = (error, error_answer(error))
        return known[1]

    def _unreadable(self, error: ConnectError, arrived: float) -> Answer:
        self._service.issue_unreadable(error, arrived)
        return error_answer(error)

    def hold_after(self, answer: Answer) -> float:
        """After a request turned away, how long its connection should not be read from."""
        doorman = self._doorman
        return doorman.hold if doorman is not None and answer[0] == 503 else 0.0

    async def answer(
        self, request: coupon_pb.IssueCouponRequest, codec: tuple[Codec, bytes], arrived: float
    ) -> Answer:
        """The answer to a request `at_once` let in (the ASGI door's way; the HTTP/1.1
        lane's is `answer_soon`). Cancelled, it cancels the request, which leaves the door
        all the same."""
        outcome = await self._service.issue_begin(request, arrived).settled()
        return self._finished(request, codec, arrived, outcome)

    def answer_soon(
        self,
        request: coupon_pb.IssueCouponRequest,
        codec: tuple[Codec, bytes],
        arrived: float,
        reply: Callable[[Answer], object],
        request_id: bytes = b"",
    ) -> Pending:
        """`answer` without a task: `reply` is called with the answer as the request's
        outcome settles (at once when it has already), unless it is cancelled (returned:
        cancel it through `Pending.cancel`). `request_id`, the caller's X-Request-Id, is
        what the service's log lines of the request carry."""
        pending = self._service.issue_begin(request, arrived)
        pending.when_settled(partial(self._answered, request, codec, arrived, reply, request_id))
        return pending

    def _answered(
        self,
        request: coupon_pb.IssueCouponRequest,
        codec: tuple[Codec, bytes],
        arrived: float,
        reply: Callable[[Answer], object],
        request_id: bytes,
        pending: Pending,
    ) -> None:
        # Without a task, the request's context is only this: its id, when it has one.
        token = REQUEST_HEADERS.set(((b"x-request-id", request_id),)) if request_id else None
        try:
            answer = self._finished(request, codec, arrived, pending.outcome)
        except asyncio.CancelledError:
            return
        finally:
            if token is not None:
                REQUEST_HEADERS.reset(token)
        reply(answer)

    def _finished(
        self,
        request: coupon_pb.IssueCouponRequest,
        codec: tuple[Codec, bytes],
        arrived: float,
        outcome: asyncio.Future[Issued],
    ) -> Answer:
        """The answer from a settled outcome (CancelledError raised when it was
        cancelled); the request leaves the door."""
        try:
            issued = self._service.issue_finish(request, arrived, outcome)
        except Exception as exc:  # noqa: BLE001 - counted and logged by the service already
            return _failure(exc)
        decoder, content_type = codec
        if content_type == b"application/proto":
            payload = issue_response_bytes(issued.coupon, issued.already_issued)
        else:
            payload = decoder.encode(issue_response(issued.coupon, issued.already_issued))
        return 200, content_type, payload, _NO_HEADERS


def _failure(exc: Exception) -> Answer:
    if isinstance(exc, ConnectError):
        return error_answer(exc)
    # A Connect error all the same, as the full Connect application would answer, not the
    # server's bare 500.
    return error_answer(ConnectError(Code.INTERNAL, type(exc).__name__))


class FastIssue:
    """The route as an ASGI app, for requests that `accepts`."""

    def __init__(self, route: IssueRoute, max_bytes: int) -> None:
        self._route = route
        self._max_bytes = max_bytes

    def accepts(self, scope: Scope) -> tuple[Codec, bytes] | None:
        """The codec for this request, or None when the full Connect app must take it."""
        if scope.get("method") != "POST":
            return None
        codec = None
        length = -1
        # Given twice, a header the app refuses (SINGLE_VALUED).
        typed = versioned = encoded = False
        for name, value in scope["headers"]:
            if name == b"content-type":
                if typed:
                    return None
                typed = True
                codec = codec_for(value)
            elif name == b"content-length":
                length = content_length(value)
            elif name in (b"content-encoding", b"connect-content-encoding"):
                if encoded or value.strip().lower() != b"identity":
                    return None
                encoded = True
            elif name == b"connect-protocol-version":
                if versioned or other_protocol_version(value):
                    return None
                versioned = True
            elif name in (b"connect-timeout-ms", b"grpc-timeout"):
                return None  # a deadline (or, twice, a refusal): the app's
        if codec is None or not 0 <= length <= self._max_bytes:
            return None
        return codec

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, codec: tuple[Codec, bytes]
    ) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")  # type: ignore[operator]
            if not message.get("more_body", False):
                break
        arrived = time.monotonic()
        answer = self._route.at_once(body, codec, arrived)
        if not isinstance(answer, tuple):
            answer = await self._route.answer(answer, codec, arrived)
        await respond(send, answer)


async def respond(send: Send, answer: Answer) -> None:
    status, content_type, payload, extra = answer
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type),
            (b"content-length", str(len(payload)).encode()),
            *extra,
        ],
    }
    await send(start)
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": payload, "more_body": False}
    await send(end)
