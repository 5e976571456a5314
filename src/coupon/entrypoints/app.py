"""The ASGI application: Connect RPCs (Connect, gRPC and gRPC-Web), gRPC server reflection,
plus Litestar for health, readiness, metrics and the example page."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import logging
import multiprocessing
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc_grpcreflect import (  # type: ignore[import-untyped]
    ServerReflectionAlphaASGIApplication,
    ServerReflectionAlphaService,
    ServerReflectionASGIApplication,
    ServerReflectionService,
)
from litestar import Litestar, MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.file_system import BaseLocalFileSystem
from litestar.static_files import create_static_files_router
from litestar.types import (
    ASGIApp,
    FileInfo,
    Message,
    PathType,
    Receive,
    ReceiveMessage,
    Scope,
    Send,
)

from coupon.entrypoints.codecs import charset_message, codecs, compressions, refused_charset
from coupon.entrypoints.connect_service import AdminGuard, CouponService
from coupon.entrypoints.cors import Cors
from coupon.entrypoints.dashboard import ROUTES as DASHBOARD_ROUTES
from coupon.entrypoints.dashboard import Dashboard, http_error
from coupon.entrypoints.fast_issue import (
    ISSUE_PATH,
    SINGLE_VALUED,
    FastIssue,
    IssueRoute,
    error_answer,
    other_protocol_version,
    respond,
)
from coupon.entrypoints.grpc_health import HealthService
from coupon.entrypoints.grpc_web_text import serve_text, text_media
from coupon.entrypoints.health import Readiness
from coupon.entrypoints.http.host import valid_host
from coupon.entrypoints.http.refusal import refusal
from coupon.entrypoints.ioc import make_container
from coupon.entrypoints.logs import REQUEST_HEADERS, configure_logging
from coupon.entrypoints.metrics import get_metrics, render
from coupon.entrypoints.overload import Doorman
from coupon.entrypoints.settings import Settings, load_settings
from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponServiceASGIApplication
from coupon.gen.google.rpc import error_details_pb
from coupon.gen.grpc.health.v1 import health_pb
from coupon.gen.grpc.health.v1.health_connect import HealthASGIApplication

log = logging.getLogger("coupon")

CONNECT_PREFIX = "/coupon.v1.CouponService/"
EXPORT_PATH = CONNECT_PREFIX + "ExportCoupons"
# What a 415 lists, by (a streaming method, gRPC possible on this connection).
_UNARY = b"application/proto, application/json"
_STREAMING = b"application/connect+proto, application/connect+json"
_GRPC_WEB = (
    b", application/grpc-web+proto, application/grpc-web+json, application/grpc-web-text+proto"
)
_GRPC = b", application/grpc+proto, application/grpc+json"
_ACCEPT_POST = {
    (False, False): _UNARY + _GRPC_WEB,
    (False, True): _UNARY + _GRPC_WEB + _GRPC,
    (True, False): _STREAMING + _GRPC_WEB,
    (True, True): _STREAMING + _GRPC_WEB + _GRPC,
}
# gRPC sends its status in trailers, which HTTP/1.1 here does not carry: a trailers-only
# answer says so (the Connect protocol and gRPC-Web work over HTTP/1.1).
_GRPC_NEEDS_HTTP2: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"12"),
        (
            b"grpc-message",
            b"gRPC needs HTTP/2 (cleartext with prior knowledge, or TLS): over HTTP/1.1"
            b" use the Connect protocol or gRPC-Web",
        ),
        (b"content-length", b"0"),
        (b"connection", b"close"),
    ],
}


# Headers whose values name content codings.
_CODINGS = frozenset(
    {
        b"content-encoding",
        b"connect-content-encoding",
        b"grpc-encoding",
        b"accept-encoding",
        b"connect-accept-encoding",
        b"grpc-accept-encoding",
    }
)


# Headers that list the codings a response may be in, with weights (RFC 9110, 12.5.3).
_ACCEPTS = frozenset({b"accept-encoding", b"connect-accept-encoding", b"grpc-accept-encoding"})
# A weight (RFC 9110, 12.4.2): 0 to 1, at most three decimals.
_QVALUE = re.compile(rb"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")


def _by_preference(value: bytes) -> bytes:
    """A list of acceptable codings as the Connect application reads it, which takes the
    first it knows and reads no weights: the codings from the most wanted to the least (in
    the order given where weights tie), without parameters, those weighted 0 (not
    acceptable) left out, `*` standing for each coding served that the list does not name.
    An element whose weight is malformed is left out. Read as given, `deflate, gzip;q=0.5`
    was answered without compression, though gzip is acceptable there."""
    lowered = value.lower()  # codings are case-insensitive (RFC 9110, 8.4.1): GZIP is gzip
    if b";" not in lowered and b"*" not in lowered:
        return lowered  # no weights: already in the order the client prefers
    weighted: list[tuple[float, int, bytes]] = []
    named: set[bytes] = set()
    anything: tuple[float, int] | None = None
    for position, element in enumerate(lowered.split(b",")):
        coding, *parameters = (part.strip(b" \t") for part in element.split(b";"))
        weight: float | None = 1.0
        for parameter in parameters:
            key, _, given = parameter.partition(b"=")
            if key.strip(b" \t") == b"q":
                given = given.strip(b" \t")
                weight = float(given) if _QVALUE.fullmatch(given) else None
        if not coding or weight is None:
            continue
        if coding == b"*":
            anything = (weight, position)
        else:
            named.add(coding)
            weighted.append((-weight, position, coding))
    if anything is not None:
        for coding in sorted(ACCEPTED_CODINGS - named - {b"identity"}):
            weighted.append((-anything[0], anything[1], coding))
    return b", ".join(coding for weight, _, coding in sorted(weighted) if weight < 0)


# Deadline headers, whose parser in the Connect application takes digits and a unit only:
# spaces and tabs around a field's value are not part of it (RFC 9110, 5.5), but the
# HTTP/1.1 parser leaves trailing ones in.
_TIMEOUTS = frozenset({b"connect-timeout-ms", b"grpc-timeout"})
_OWS = b" \t"


def _normalized(name: bytes, value: bytes) -> bytes:
    """A header's value as the Connect application is to read it: a content coding in lower
    case, a list of accepted codings by preference (_by_preference), a deadline without
    whitespace around it, a gRPC or gRPC-Web media type in lower case without parameters;
    any other as it is."""
    if name in _ACCEPTS:
        return _by_preference(value)
    if name in _CODINGS:
        return value.lower()  # codings are case-insensitive (RFC 9110, 8.4.1): GZIP is gzip
    if name == b"content-type":
        # A media type is case-insensitive and may carry parameters (RFC 9110, 8.3.1), and
        # gRPC's own servers take `application/grpc; charset=utf-8`; the Connect application
        # compares it as written, and took `Application/gRPC-Web+Proto` for the Connect
        # protocol's (a 415).
        return _grpc_media_type(value) if value[:16].lower() == b"application/grpc" else value
    return value.strip(_OWS) if name in _TIMEOUTS else value


def _stream_header_problem(scope: Scope) -> str:
    """What is wrong with a Connect stream's protocol headers, or "". The Connect
    application checks them before it knows the call is a stream, and answered a unary
    call's error (HTTP 400), which a stream's client cannot read: it reads its end-stream
    message, which this refusal is."""
    for name, value in scope["headers"]:
        if name == b"connect-timeout-ms":
            timeout = value.strip(_OWS)
            if not (timeout.isdigit() and len(timeout) <= 10):
                shown = value.decode("latin-1")
                return f"connect-timeout-ms: {shown!r} is not a time-out (1 to 10 digits of ms)"
        elif name == b"connect-protocol-version" and other_protocol_version(value):
            shown = value.decode("latin-1")
            return f"connect-protocol-version: {shown!r} is not a version served (1)"
    return ""


def _grpc_media_type(value: bytes) -> bytes:
    return value.split(b";", 1)[0].strip().lower()


# The content codings the Connect application decodes: its compressions, and none.
ACCEPTED_CODINGS = frozenset({b"identity", *(c.name().encode() for c in compressions())})
_ACCEPTED = b", ".join(sorted(ACCEPTED_CODINGS))
_GRPC_ACCEPTED = b",".join(sorted(ACCEPTED_CODINGS))


def _refused_coding(scope: Scope, content_type: bytes) -> tuple[bytes, bytes] | None:
    """For a request whose body is in a coding the service does not decode (answered
    `unimplemented` by the Connect application), the header that lists those it does, as
    each protocol names it: Accept-Encoding for a Connect unary call (whose coding is its
    Content-Encoding), Connect-Accept-Encoding for a Connect stream, grpc-accept-encoding
    for gRPC and gRPC-Web. None for any other. (No method here takes GET, whose coding
    would be a query parameter.)"""
    if content_type.startswith(b"application/grpc"):
        asked, answer = b"grpc-encoding", (b"grpc-accept-encoding", _GRPC_ACCEPTED)
    elif content_type.startswith(b"application/connect+"):
        asked, answer = b"connect-content-encoding", (b"connect-accept-encoding", _ACCEPTED)
    else:
        asked, answer = b"content-encoding", (b"accept-encoding", _ACCEPTED)
    for name, value in scope["headers"]:
        if name == asked and value.strip().lower() not in ACCEPTED_CODINGS:
            return answer
    return None


def _content_type(scope: Scope) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.lower()
    return b""


# Requests are a few dozen bytes; anything near this is not a request of ours.
MAX_REQUEST_BYTES = 64 * 1024
REFLECTION_PREFIX = "/grpc.reflection."
HEALTH_PREFIX = "/grpc.health.v1.Health/"
# The server-streaming methods besides reflection's (whose 415 lists the stream types).
_STREAMING_PATHS = frozenset({EXPORT_PATH, HEALTH_PREFIX + "Watch"})
# What server reflection serves: the services, and the error detail `unavailable` answers
# carry (so that grpcurl -format-error can print a RetryInfo).
REFLECTED = (coupon_pb.desc(), health_pb.desc(), error_details_pb.desc())
# Every gRPC method this port serves: a gRPC call of any other path is `unimplemented`.
GRPC_METHODS = frozenset(
    [CONNECT_PREFIX + method.name for method in coupon_pb.desc().services[0].methods]
    + [
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
        for version in ("v1", "v1alpha")
    ]
    + [HEALTH_PREFIX + method.name for method in health_pb.desc().services[0].methods]
)
# A page that issues a coupon from a browser with connect-web (see web/ for its source).
EXAMPLE_PAGE = Path(__file__).parent / "static" / "example"


class StaticFiles(BaseLocalFileSystem):
    """The local files, where a path no file can have (a NUL byte, a name too long, a file
    taken for a directory) is a file not found, as any other missing file: Litestar
    answers 404 to FileNotFoundError alone, and 500 to the rest."""

    async def info(self, path: PathType, **kwargs: Any) -> FileInfo:
        try:
            return await super().info(path, **kwargs)
        except PermissionError:
            raise
        except (ValueError, OSError) as exc:
            raise FileNotFoundError(errno.ENOENT, "no such file") from exc


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_bytes: int
    max_headers: int
    request_timeout_seconds: float
    max_request_bytes: int


class CouponApp:
    """Connect paths go straight to the Connect app (no web-framework router on the hot
    path); everything else, lifespan included, goes to Litestar."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics_guard = AdminGuard(settings.metrics_token)
        self.http_limits = HttpLimits(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            request_timeout_seconds=settings.request_timeout_seconds,
            max_request_bytes=MAX_REQUEST_BYTES,
        )
        self.connect: CouponServiceASGIApplication | None = None
        # IssueCoupon's common request, for the HTTP/1.1 protocol's lane (http/h1.py) and
        # as an ASGI app for everything else that qualifies.
        self.issue_route: IssueRoute | None = None
        self.fast_issue: FastIssue | None = None
        self.readiness: Readiness | None = None
        self.dashboard: Dashboard | None = None
        self.cors = Cors(settings.cors_origins) if settings.cors_origins else None
        # The gRPC health-checking protocol: load balancers' and Kubernetes' gRPC probes.
        self.health = HealthASGIApplication(
            HealthService(lambda: self.readiness),
            read_max_bytes=MAX_REQUEST_BYTES,
            codecs=codecs(),
            compressions=compressions(),
        )
        # grpcurl, buf curl and other gRPC tools list and call the service without its proto.
        self.reflection = {
            app.path: app
            for app in (
                ServerReflectionASGIApplication(ServerReflectionService(*REFLECTED)),
                ServerReflectionAlphaASGIApplication(ServerReflectionAlphaService(*REFLECTED)),
            )
        }
        self.web = Litestar(
            route_handlers=[
                healthz,
                readyz,
                metrics,
                *DASHBOARD_ROUTES,
                create_static_files_router(
                    "/example", [EXAMPLE_PAGE], html_mode=True, file_system=StaticFiles()
                ),
            ],
            lifespan=[self._lifespan],
            exception_handlers={HTTPException: http_error},
            openapi_config=None,
            state=State({"coupon": self}),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP and scope["path"].startswith(CONNECT_PREFIX):
            REQUEST_HEADERS.set(scope["headers"])
            cors = self.cors
            if cors is not None and (origin := cors.allowed_origin(scope)) is not None:
                if await cors.answer(scope, receive, send, origin):
                    return
                send = cors.sending(send, origin)
            fast = self.fast_issue
            if fast is not None and scope["path"] == ISSUE_PATH:
                codec = fast.accepts(scope)
                if codec is not None:
                    await fast(scope, receive, send, codec)
                    return
            connect = self.connect
            if connect is not None:
                if not await _unknown_grpc_method(scope, receive, send):
                    scope = _utf8_headers(scope)
                    await self._connect_closing_unread(connect, scope, receive, send)
                return
        elif scope["type"] == ScopeType.HTTP and scope["path"].startswith(HEALTH_PREFIX):
            # Read as the service's own RPCs are read (gRPC over HTTP/1.1 said plainly, media
            # types and codings in any case, an unread body's connection closed).
            if not await _unknown_grpc_method(scope, receive, send):
                await self._connect_closing_unread(self.health, _utf8_headers(scope), receive, send)
            return
        elif scope["type"] == ScopeType.HTTP and scope["path"].startswith(REFLECTION_PREFIX):
            reflection = self.reflection.get(scope["path"].rsplit("/", 1)[0])
            if reflection is not None:
                if not await _unknown_grpc_method(scope, receive, send):
                    scope = _utf8_headers(scope)
                    await self._connect_closing_unread(reflection, scope, receive, send)
                return
        if scope["type"] == ScopeType.HTTP:
            if await _unknown_grpc_method(scope, receive, send):
                return
            if scope["path"] == "/example":
                # The page's own files are relative to /example/: served without the slash,
                # it would load none of them.
                await _redirect(send, "/example/", scope.get("query_string", b""))
                return
            if not all(valid_host(v) for n, v in scope["headers"] if n == b"host"):
                # HTTP/2's :authority (HTTP/1.1's Host is refused at the door, h1.py): the
                # framework would fail to build the request's URL from it, a 500.
                await _bad_host(send)
                return
            if scope["method"] == "HEAD":
                # HEAD wherever GET is served (RFC 9110, 9.1): the GET's status and fields,
                # its Content-Length included, without its body (9.3.2).
                scope = {**scope, "method": "GET"}
                send = _headless(send)
        await self.web(scope, receive, send)

    @staticmethod
    async def _connect_closing_unread(
        connect: ASGIApp, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """A response sent before the request body was read (an early refusal) closes the
        connection: the unread body would otherwise be taken for the next request (over
        HTTP/1.1 the close lingers, h1.py, so that a client still sending it reads the
        answer). A 415
        lists the content types this method accepts (the library's lists the unary Connect
        ones whatever the method), and an `unimplemented` for a coding the service does not
        decode lists those it does; gRPC without trailers (HTTP/1.1) is refused plainly.
        gRPC-Web's text mode is served as binary gRPC-Web, translated (grpc_web_text.py).
        A gRPC answer's retry hint goes as gRPC's pushback too (_with_pushback)."""
        trailers = "http.response.trailers" in (scope.get("extensions") or {})
        content_type = _content_type(scope)
        grpc = content_type.startswith(b"application/grpc") and not content_type.startswith(
            b"application/grpc-web"
        )
        if grpc and not trailers:
            await send(_GRPC_NEEDS_HTTP2)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        streaming = scope["path"] in _STREAMING_PATHS or scope["path"].startswith(REFLECTION_PREFIX)
        accepted = _ACCEPT_POST[streaming, trailers]
        refused_coding = _refused_coding(scope, content_type)
        normalize = False
        given: set[bytes] = set()
        repeated = b""
        for name, value in scope["headers"]:
            if name in SINGLE_VALUED:
                if name in given and not repeated:
                    repeated = name
                given.add(name)
            normalize = normalize or _normalized(name, value) != value
        if normalize:
            headers = [(n, _normalized(n, v)) for n, v in scope["headers"]]
            scope = {**scope, "headers": headers}  # type: ignore[assignment]
        body_done = False

        async def receive_tracking() -> ReceiveMessage:
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        hint = b""

        async def send_closing(message: Message) -> None:
            nonlocal hint
            kind: str = message["type"]  # Message leaves out http.response.trailers
            if grpc and kind == "http.response.trailers":
                given = cast("dict[str, Any]", message)
                trailers, hint = _with_pushback(list(given.get("headers", ())), hint)
                message = cast("Message", {**given, "headers": trailers})
            elif message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if grpc:  # a trailers-only answer's status is in its headers
                    headers, hint = _with_pushback(headers, hint)
                if message["status"] == 415:
                    headers = [h for h in headers if h[0].lower() != b"accept-post"]
                    headers.append((b"accept-post", accepted))
                if refused_coding is not None:
                    headers.append(refused_coding)
                if not body_done:
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        message = ""
        if repeated:
            # One value each (RFC 9110, 5.3 lets a recipient refuse a list in its place): read
            # as the first or the last, the call would mean one thing here and another to
            # the next server along.
            message = f"the {repeated.decode()} header is given more than once"
        elif streaming and content_type.startswith(b"application/connect+"):
            message = _stream_header_problem(scope)
        if not message and (charset := refused_charset(content_type)) is not None:
            # JSON in another charset, as connect-go answers it: 415 (with Accept-Post), the
            # body the Connect protocol's error.
            message = charset_message(content_type, charset)
            error = error_answer(ConnectError(Code.INVALID_ARGUMENT, message))
            await respond(send_closing, (415, *error[1:]))
            return
        if message:
            answer = refusal(
                scope["path"].encode(),
                content_type,
                message,
                status=400,
                plain=message,
                code=Code.INVALID_ARGUMENT,
            )
            await respond(send_closing, answer)
            return
        text = text_media(content_type)
        if text is not None:
            await serve_text(connect, scope, receive_tracking, send_closing, text)
        else:
            await connect(scope, receive_tracking, send_closing)

    @asynccontextmanager
    async def _lifespan(self, _: Litestar) -> AsyncIterator[None]:
        container = make_container(self.settings)
        service = await container.get(CouponService)
        (await container.get(Doorman)).loop_lag.start(asyncio.get_running_loop())
        self.readiness = await container.get(Readiness)
        self.dashboard = await container.get(Dashboard)
        self.connect = CouponServiceASGIApplication(
            service,
            read_max_bytes=MAX_REQUEST_BYTES,
            codecs=codecs(),
            compressions=compressions(),
        )
        self.issue_route = IssueRoute(service)
        self.fast_issue = FastIssue(self.issue_route, MAX_REQUEST_BYTES)
        # Everything built so far (modules, the container, pools) lives as long as the
        # process: move it out of the collector's sight, so that full collections during a
        # burst walk only what requests allocate (p99 of a 1,000-coupon page: 35 -> 15 ms).
        gc.collect()
        gc.freeze()
        # A request allocates dozens of objects that die with its answer: a young
        # generation of 10,000 instead of 700 collects a tenth as often and finds as
        # little alive (3 % of an issue's CPU, measured side by side; 50,000 no better).
        gc.set_threshold(10_000, 10, 10)
        log.info(
            "serving",
            extra={
                "backend": self.settings.backend,
                "admin_token": bool(self.settings.admin_token),
            },
        )
        try:
            yield
        finally:
            # The server has stopped taking requests and finished those in flight; closing
            # the container commits whatever the ledger still has queued, then closes pools.
            await container.close()
            self.connect = None
            self.issue_route = None
            self.fast_issue = None


# gRPC statuses whose answers carry the service's retry hint as gRPC's pushback:
# `unavailable`, and `resource_exhausted` should it ever carry one. A pushback on a status
# the client's policy does not retry changes nothing (gRFC A6).
_PUSHBACK_STATUSES = frozenset({b"14", b"8"})


def _with_pushback(
    fields: list[tuple[bytes, bytes]], hint: bytes
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A gRPC answer's headers or trailers, with `grpc-retry-pushback-ms` added when they
    end the call with a status of _PUSHBACK_STATUSES and a retry hint (`retry-after-ms`,
    here or in the headers before: `hint`) goes with it; and the hint known so far. A
    gRPC client's retry policy waits the pushback instead of its own backoff (gRFC A6);
    only a count of milliseconds is sent, since any other value tells it not to retry."""
    status = None
    for name, value in fields:
        lowered = name.lower()
        if lowered == b"retry-after-ms" and value.strip().isdigit():
            hint = value.strip()
        elif lowered == b"grpc-status":
            status = value.strip()
        elif lowered == b"grpc-retry-pushback-ms":
            return fields, hint
    if status in _PUSHBACK_STATUSES and hint:
        fields = [*fields, (b"grpc-retry-pushback-ms", hint)]
    return fields, hint


def _headless(send: Send) -> Send:
    """`send` for an answer to HEAD: every body left out, the fields as they are."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            message = {**message, "body": b""}
        await send(message)

    return sending


async def _redirect(send: Send, path: str, query: bytes) -> None:
    location = path.encode() + (b"?" + query if query else b"")
    headers = [(b"location", location), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 308, "headers": headers})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _bad_host(send: Send) -> None:
    body = b"the Host header must be a host and an optional port"
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _utf8_headers(scope: Scope) -> Scope:
    """The scope with its header values readable as UTF-8: connectrpc decodes every value so
    and fails the request on any other byte (a 500, and a traceback logged), though HTTP
    lets a value carry any byte beyond ASCII (obs-text, RFC 9110 §5.5). Such a value is read
    as Latin-1, as the service's log reads an X-Request-Id."""
    headers = scope["headers"]
    if all(value.isascii() for _, value in headers):
        return scope
    return {**scope, "headers": [(name, _utf8(value)) for name, value in headers]}  # type: ignore[return-value]


def _utf8(value: bytes) -> bytes:
    try:
        value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1").encode()
    return value


# HEAD on these (load balancers, uptime checkers) is served as GET without the body, as on
# every page (CouponApp.__call__).
@get("/healthz", media_type=MediaType.JSON, sync_to_thread=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", media_type=MediaType.JSON)
async def readyz(state: State) -> Response[dict[str, object]]:
    app = state.coupon
    assert isinstance(app, CouponApp)
    if app.readiness is None:
        return Response({"status": "starting"}, status_code=503)
    ready, checks = await app.readiness.check()
    return Response(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


@get("/metrics", sync_to_thread=False)
def metrics(state: State, request: Request[Any, Any, Any]) -> Response[bytes]:
    app = state.coupon
    assert isinstance(app, CouponApp)
    guard = app.metrics_guard
    if not guard.allows(request.headers.get("authorization", "")):
        # As Prometheus's scrape config sends it: `authorization: {credentials: <token>}`.
        return Response(
            b"/metrics needs the header 'Authorization: Bearer <COUPON_METRICS_TOKEN>'\n",
            status_code=401,
            headers={"content-type": "text/plain; charset=utf-8", "www-authenticate": "Bearer"},
        )
    get_metrics().flush()  # this worker's latest; the others' are at most a second old
    body, content_type = render(app.settings.metrics_dir)
    # As the client library gives it, charset included: given as the media type, Litestar
    # would add a second charset, which Prometheus 3 refuses to parse.
    return Response(body, headers={"content-type": content_type})


# prctl(2): the signal a process gets when the thread that started it ends.
_PR_SET_PDEATHSIG = 1


def stop_with_the_supervisor() -> None:
    """In a worker of `coupon serve --workers N`: a SIGTERM (a graceful stop, in-flight
    requests answered) when the process that supervises it dies, however it dies. Without
    it, a supervisor killed with SIGKILL left its workers serving the port with no one to
    replace them, and a restart found the port taken. Linux only; elsewhere nothing."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return  # the server's only process: nothing supervises it
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent.pid:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def leave_hangups_to_the_supervisor() -> None:
    """In a worker of `coupon serve --workers N`: SIGHUP is the supervisor's (it replaces
    the workers one at a time, each drained). A hang-up of the whole process group (a
    terminal or ssh session closed) reaches the workers too, and SIGHUP's default would end
    each at once, its requests in flight cut: a worker says so and serves on."""
    if multiprocessing.parent_process() is None or not hasattr(signal, "SIGHUP"):
        return  # the server's only process: SIGHUP stops it gracefully (cli.run_asgi)
    signal.signal(signal.SIGHUP, _hang_up_in_a_worker)


def _hang_up_in_a_worker(signum: int, frame: object) -> None:
    log.info(
        "SIGHUP to a worker: ignored, the supervisor restarts the workers one at a time",
        extra={"supervisor_pid": os.getppid()},
    )


async def _unknown_grpc_method(scope: Scope, receive: Receive, send: Send) -> bool:
    """A gRPC or gRPC-Web call of a method this port does not serve gets what gRPC servers
    answer, a trailers-only `unimplemented` (not a bare 404, which gRPC clients report as an
    HTTP error); its body is read first, so that a keep-alive connection stays in step."""
    path = scope["path"]
    if path in GRPC_METHODS or not _content_type(scope).startswith(b"application/grpc"):
        return False
    while (await receive()).get("more_body", False):
        pass
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", _grpc_media_type(_content_type(scope))),
                (b"grpc-status", b"12"),
                (b"grpc-message", ("unknown method " + quote(path, safe="/")).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return True


def create_app() -> CouponApp:
    """Factory for the ASGI server: settings from the environment of this process."""
    stop_with_the_supervisor()
    leave_hangups_to_the_supervisor()
    settings = load_settings()
    configure_logging(settings.log_level)
    return CouponApp(settings)
