"""The HTTP/1.1 front door: uvicorn's httptools protocol, with limits against hostile
clients and a lane that answers IssueCoupon's common request without an ASGI cycle.

Limits (each answered, then the connection closed; but the send time-out, which resets it):
* headers: at most `max_headers` fields and `max_header_bytes` bytes (request line
  included) -> `resource_exhausted` in the caller's protocol on the API's paths, 431
  elsewhere (http/refusal.py); counted as they arrive, so a header trickled forever holds
  no more than the limit in memory;
* a body declared (or sent chunked) beyond the service's request size ->
  `resource_exhausted` in the caller's protocol (413 outside the API), before the body is
  read;
* a request must arrive whole within `request_timeout` of its first byte -> 408: slow
  senders are closed, not held;
* an HTTP/1.1 request without exactly one Host field, an HTTP/1.0 one with more than one,
  a Host that is no authority (RFC 9112 §3.2; http/host.py), a Content-Length of more
  digits than any length (fast_issue.CONTENT_LENGTH_DIGITS) -> 400; a request line of
  HTTP/0.9 or HTTP/2.0, which llhttp reads ->
  505 (HTTP/2 with prior knowledge never reaches this protocol: sniff.py hands it over);
* answers the client does not read (the send time-out): while the transport is paused
  (its buffer over the high-water mark, a handler waiting in uvicorn's drain), a watch
  looks at what is still unsent, the transport's buffer and the kernel's send queue; when
  nothing of it has gone for `request_timeout`, the connection is reset (SO_LINGER 0, then
  abort: a close would leave the kernel holding bytes the client never takes) and the
  handlers waiting on it are told of a lost client, so they run to their end writing
  nothing more (an IssueCoupon that committed stays committed). Any byte taken restarts
  the clock: a slow reader that keeps reading is never cut off. The watch exists only
  while the transport is paused, so requests pay nothing for it;
* idle connections, new ones that have sent nothing included, are closed cleanly after
  `keepalive` seconds (longer than common client pools keep theirs, so clients close first
  and never race the server's close; no answer is written that a client could take for
  its next request's).
A refused request pipelined behind others waits for their answers (RFC 9112 §9.3.2: in
the order of the requests); nothing more is read meanwhile.

An answer from the ASGI app to an HTTP/1.0 request is its connection's last (uvicorn's
way); one that names no length goes unchunked, its end the close of the connection (RFC
9112 §6.1: chunked framing is HTTP/1.1's). One that closes the connection before the
request's body has all arrived (a refusal from the headers) closes it lingering, as the
refusals above do (see _Cycle).

Graceful shutdown (`shutdown`): an idle connection is closed, unless a request's bytes have
reached it (read in part, or still in the kernel): that request is read and answered with
`Connection: close` first. An answer in flight is the connection's last (uvicorn's way).

The IssueCoupon lane takes a POST to the IssueCoupon path with a binary or JSON body of a
declared length, uncompressed, without a deadline header or an Origin (CORS is the ASGI
app's), when nothing else is in flight on the connection. It hands the body to the
IssueRoute (entrypoints/fast_issue.py) and writes the answer in one write: a shed request or
a remembered refusal costs no task, no ASGI messages, no header objects. Such a request
that arrives whole in one read, alone in it (the usual case), is read by the lane itself,
without the parser's callback per field; any byte the parser would read differently sends
the request to the parser instead (see `_lane_at_once`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import socket
import struct
import termios
import time
from collections.abc import Callable, Sized
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from coupon.entrypoints.fast_issue import (
    ISSUE_PATH_BYTES,
    SINGLE_VALUED,
    Answer,
    IssueRoute,
    codec_for,
    content_length,
    other_protocol_version,
)
from coupon.entrypoints.http.host import valid_host
from coupon.entrypoints.http.refusal import (
    PLAIN,
    body_refusal,
    declared_size,
    enveloped,
    refusal,
    with_cors,
)
from coupon.entrypoints.logs import LogQuota
from coupon.entrypoints.metrics import get_metrics

if TYPE_CHECKING:
    from connectrpc.codec import Codec

    from coupon.application.issue import Pending
    from coupon.entrypoints.cors import Cors


# codec, content length, keep-alive, number of fields, X-Request-Id (b"": none)
LaneFields = tuple[tuple["Codec", bytes], int, bool, int, bytes]
# Headers that send a request to the full ASGI path.
_NOT_FOR_THE_LANE = frozenset(
    {
        b"transfer-encoding",
        b"expect",
        b"origin",
        b"connect-timeout-ms",
        b"grpc-timeout",
        b"upgrade",
    }
)
_ENCODINGS = frozenset({b"content-encoding", b"connect-content-encoding"})
# The caller's id for the request, which the service's log lines of it carry.
_REQUEST_ID = b"x-request-id"
# Exactly one in an HTTP/1.1 request, at most one in an HTTP/1.0 one (RFC 9112 §3.2).
_HOST = b"host"
# What the lane reads of a request it takes without the parser.
_LANE_REQUEST_LINE = b"POST " + ISSUE_PATH_BYTES + b" HTTP/1.1\r\n"
_PROTOCOL_VERSION = b"connect-protocol-version"
_LANE_FIELDS = frozenset(
    {b"content-type", b"content-length", b"connection", _PROTOCOL_VERSION, *_ENCODINGS}
)
# Bytes a field line may hold (RFC 9110: visible characters, space, tab, obs-text).
_FIELD_BYTES = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])
# RFC 9110 tchar, lower case (names are compared lowered).
_TOKEN_DELETE = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"


# What _lane_fields made of each header block seen lately (blocks of at most
# _LANE_BLOCK_MAX bytes; emptied when full, so a client varying its fields costs a read).
_LANE_BLOCKS: dict[bytes, LaneFields | None] = {}
_UNSEEN: Any = object()
_LANE_BLOCKS_MAX = 256
_LANE_BLOCK_MAX = 1024


# A malformed request, which a client can send at will, logged once a second at most.
_INVALID_REQUESTS = LogQuota()


def _is_token(name: bytes) -> bool:
    return not name.translate(None, _TOKEN_DELETE)


def _lane_fields(block: bytes) -> LaneFields | None:
    """The fields after the lane's request line (without the blank line that ends them):
    (codec, content length, keep-alive, number of fields, X-Request-Id) when the lane may
    take the request, read exactly as llhttp reads them; None when the parser must."""
    # Only visible characters, spaces, tabs and obs-text, lines ended by CRLF alone.
    if block.translate(None, _FIELD_BYTES) != b"\r\n" * block.count(b"\r\n"):
        return None
    lines = block.split(b"\r\n")
    content_type = None
    length = -1
    keep_alive = True
    request_id = b""
    hosts = 0
    versioned = encoded = False
    for line in lines:
        name, colon, value = line.partition(b":")
        name = name.lower()
        if name in _LANE_FIELDS:
            if name == b"content-type":
                if content_type is not None:
                    return None
                content_type = value.strip(b" \t")
            elif name == b"content-length":
                if length >= 0:
                    return None
                length = content_length(value.strip(b" \t"))
                if length < 0:
                    return None  # malformed: the parser's path refuses it
            elif name == b"connection":
                value = value.strip(b" \t").lower()
                if value == b"close":
                    keep_alive = False
                elif value != b"keep-alive":
                    return None
            elif name == _PROTOCOL_VERSION:
                if versioned or other_protocol_version(value):
                    return None  # twice: refused by the app (SINGLE_VALUED)
                versioned = True
            elif encoded or value.strip(b" \t").lower() != b"identity":  # an encoding
                return None
            else:
                encoded = True
        elif not colon or not name or not _is_token(name) or name in _NOT_FOR_THE_LANE:
            return None
        elif name == _REQUEST_ID and not request_id:
            request_id = value.strip(b" \t")
        elif name == _HOST:
            hosts += 1 if valid_host(value) else 2  # the parser's path refuses it
    if content_type is None or length < 0 or hosts != 1:  # Host: the parser refuses it
        return None
    codec = codec_for(content_type)
    if codec is None:
        return None
    return codec, length, keep_alive, len(lines), request_id


# A send time-out found already past (the loop was busy) is confirmed this much later, so
# that the loop has read what the peer sent and written what it could meanwhile: the
# server's own stall is not counted against the peer (HTTP/2's watches too).
OVERDUE_GRACE = 0.05


class Limits(Protocol):
    """What the protocol reads from the app's settings."""

    max_header_bytes: int
    max_headers: int
    request_timeout_seconds: float
    max_request_bytes: int


class _Defaults:
    max_header_bytes = 16_384
    max_headers = 100
    request_timeout_seconds = 10.0
    max_request_bytes = 64 * 1024


class _LaneCycle:
    """Stands for uvicorn's RequestResponseCycle while a lane request is in flight, so that
    a pipelined request behind it queues and a graceful shutdown waits for it."""

    __slots__ = ("keep_alive", "pending", "response_complete")

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.response_complete = False
        # In the server's tasks until answered (a shutdown that cancels it moves on).
        self.pending: Pending | None = None


class _Cycle(RequestResponseCycle):
    """uvicorn's cycle of a request the ASGI app answers (Http1Protocol makes uvicorn's its
    own as uvicorn makes it), but
    * an answer to an HTTP/1.0 request that names no length is sent as it is, its end told
      by the close of the connection (RFC 9112 §6.3), rather than chunked: chunked framing
      is HTTP/1.1's, which a server must not send to an HTTP/1.0 client (§6.1), and which
      such a client reads as part of the body. (uvicorn keeps no HTTP/1.0 connection
      alive: each answer is its connection's last.)
    * an answer that ends its connection before the request's body has all arrived (a
      refusal made from the headers: app.py closes the connection after it) closes it
      lingering, as the front door's own refusals do (`linger`): uvicorn closes at once,
      and the client's bytes arriving after that make the kernel reset the connection, so
      that a client still sending its body never reads the answer."""

    until_close = False  # the answer's end is the connection's
    linger: Callable[[], None]  # the protocol's lingering close

    @classmethod
    def adopt(cls, cycle: RequestResponseCycle, linger: Callable[[], None]) -> None:
        """Make uvicorn's cycle, just made, one of these (before its task first runs)."""
        cycle.__class__ = cls
        cycle.linger = linger  # type: ignore[attr-defined]

    async def send(self, message: Any) -> None:
        if self.until_close:
            if message["type"] == "http.response.body":
                # uvicorn checks an unchunked body against its Content-Length: here it is
                # as long as the part at hand.
                self.expected_content_length = len(message.get("body", b""))
        elif (
            message["type"] == "http.response.start"
            and not self.response_started
            and self.scope["http_version"] == "1.0"
            and _unframed(message, self.scope["method"])
        ):
            self.until_close = True
            self.chunked_encoding = False  # nor chunked by uvicorn
        if (
            message["type"] != "http.response.body"
            or message.get("more_body", False)
            or self.keep_alive
            or not self.more_body  # the request has all arrived
            or not self.response_started
            or self.response_complete
            or self.disconnected
        ):
            await super().send(message)
            return
        # The answer's end, and its connection's, the request's body still on its way: the
        # answer ends as uvicorn ends it, but for the close, which lingers.
        on_response = self.on_response
        self.keep_alive, self.on_response = True, _nothing
        try:
            await super().send(message)
        finally:
            self.keep_alive, self.on_response = False, on_response
        if self.response_complete:
            on_response()
            self.linger()


def _nothing() -> None:
    pass


def _unframed(start: Any, method: str) -> bool:
    """An answer's start (an ASGI message) for which uvicorn would choose its framing
    itself (chunked): one with a body, no Content-Length and no Transfer-Encoding."""
    if method == "HEAD" or start["status"] in (204, 304):
        return False
    return all(
        name.lower() not in (b"content-length", b"transfer-encoding")
        for name, _ in start.get("headers", ())
    )


class Http1Protocol(HttpToolsProtocol):
    # A refused request's connection: how long, and how much, is read and dropped at most.
    LINGER_SECONDS = 2.0
    LINGER_BYTES = 64 * 1024 * 1024

    # The date header uvicorn refreshes once a second, as bytes, per list it makes.
    _head_source: ClassVar[object] = None
    _head_bytes: ClassVar[bytes] = b""
    # Refusal answers as bytes: answer id -> (answer, the head it was made with, bytes).
    _refusals: ClassVar[dict[int, tuple[Answer, bytes, bytes]]] = {}

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._front = front_app(config.loaded_app)
        self._route: IssueRoute | None = getattr(self._front, "issue_route", None)
        self._cors: Cors | None = getattr(self._front, "cors", None)
        # Between requests: the parser holds no part of one (see _lane_at_once).
        self._fresh = True
        limits = limits_of(self._front)
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._max_body = limits.max_request_bytes
        self._request_timeout = limits.request_timeout_seconds
        # Per request.
        self._receiving_since = 0.0  # loop time of its first byte; 0: not receiving
        self._idle_since = 0.0  # loop time its last answer went out, while idle
        self._draining_until = 0.0  # refused and closing: read and drop until then
        # A refusal waiting for the answers of the requests before it (RFC 9112 §9.3.2).
        self._refused: Answer | None = None
        self._held: asyncio.TimerHandle | None = None  # not read from until this fires
        self._drained = 0
        # Shutting down with a request on its way in: it is answered, then closed.
        self._closing = False
        self._in_headers = False
        self._header_bytes = 0  # counted from the parsed request line and fields
        self._raw_header_bytes = 0  # counted from the bytes received while inside them
        self._header_count = 0
        self._hosts = 0  # Host fields
        self._bad_host = False  # one of them no authority
        self._too_large = False
        self._lane = False
        self._lane_ok = True
        self._content_type = b""
        self._content_length = -1
        self._request_id = b""
        self._body_size = 0
        # The first bytes of an enveloped body sent chunked, until its first message's
        # prefix is whole (None: not wanted, or read).
        self._prefix: bytes | None = None
        self._body = b""
        # A fresh parser is being told a request's framing (see _ignore_upgrade): its
        # head's callbacks are not the request's.
        self._framing_only = False
        self._began = False  # a request began in the chunk being read
        # The ASGI cycle of the request being read, once its head is complete.
        self._own: object = None
        # While the transport is paused (its buffer over the high-water mark): the watch
        # on its draining, the buffer's size when last looked at, and the loop time it
        # last shrank (see _watch_writes).
        self._write_watch: asyncio.TimerHandle | None = None
        self._running: RequestResponseCycle | None = None  # the ASGI cycle last started
        self._buffered = 0
        self._sent_at = 0.0
        self._overdue = False

    # --- connection -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _Flow(transport, self.pipeline)
        # Idle until its first byte (a pool may open a connection well before using it):
        # closed cleanly after the keep-alive time, as between requests.
        self._idle_since = self.loop.time()
        _Sweeper.watch(self)

    def shutdown(self) -> None:
        """A graceful shutdown. A request on its way in (its head or its body partly
        received, or its first bytes arrived and not yet read) is still read and answered,
        with `Connection: close`, rather than its connection cut: its client could not tell
        whether it was served. Otherwise as uvicorn does it: an idle connection is closed,
        an answer on its way is the last (`Connection: close`)."""
        cycle = self.cycle
        if (
            not self._draining_until
            and (cycle is None or cycle.response_complete)
            and (self._receiving_since or unread_bytes(self.transport))
        ):
            self.close_after_next()
            return
        super().shutdown()

    def close_after_next(self) -> None:
        """Shutting down with a request's bytes here: it is read (within the request
        time-out, else 408) and answered with `Connection: close`, then the connection is
        closed."""
        self._closing = True
        self._fresh = False  # the parser reads it, and its answer honours _closing
        self._idle_since = 0.0
        if not self._receiving_since:
            self._receiving_since = self.loop.time()
        if self._held is not None:
            self._held.cancel()
            self._held = None
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._held is not None:
            self._held.cancel()
            self._held = None
        self._unwatch_writes()
        cycle = self.cycle
        if isinstance(cycle, _LaneCycle):
            self.cycle = None  # type: ignore[assignment]
        super().connection_lost(exc)

    # --- the send time-out: a client that does not read its answers ---------------------

    def pause_writing(self) -> None:
        """The transport's buffer is over its high-water mark: whoever writes next waits
        for it to drain (uvicorn's FlowControl), and a watch starts on its draining."""
        super().pause_writing()
        if not self._draining_until:
            # Nor is more read meanwhile: answers to requests read now would only pile up
            # behind the ones waiting (the lane writes its answers without waiting).
            self.flow.pause_reading()
        if self._write_watch is None and not self.transport.is_closing():
            self._sent_at = self.loop.time()
            self._buffered = self._unsent()
            self._overdue = False
            self._write_watch = self.loop.call_later(self._watch_period(), self._watch_writes)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._unwatch_writes()
        if self._refused is None and not self.transport.is_closing():
            self.flow.resume_reading()  # unless requests wait their turn (_Flow)

    def _unwatch_writes(self) -> None:
        if self._write_watch is not None:
            self._write_watch.cancel()
            self._write_watch = None

    def _watch_period(self) -> float:
        return min(1.0, self._request_timeout / 4)

    def _unsent(self) -> int:
        return unsent_bytes(self.transport)

    def _watch_writes(self) -> None:
        """While the transport is paused: a buffer that shrank is progress; one that has
        not for the request time-out (found so on two looks, a moment apart, so that a loop
        that was late does not count against the client) resets the connection."""
        self._write_watch = None
        transport = self.transport
        if not self.flow.write_paused or transport.is_closing():
            return
        now = self.loop.time()
        buffered = self._unsent()
        if buffered < self._buffered:
            self._sent_at = now
        self._buffered = buffered
        if now - self._sent_at < self._request_timeout:
            self._overdue = False
            self._write_watch = self.loop.call_later(self._watch_period(), self._watch_writes)
            return
        if not self._overdue:
            self._overdue = True
            self._write_watch = self.loop.call_later(OVERDUE_GRACE, self._watch_writes)
            return
        self.logger.debug("HTTP/1.1 connection from %s: nothing written to it in time", self.client)
        get_metrics().connection_closes("stalled").inc()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Reset rather than closed: a close would leave the kernel holding the unsent
            # bytes (and the client its connection) until they drain, which they never do.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._idle_since = self._receiving_since = 0.0
        transport.abort()
        # The handler waiting in drain returns now, as from a lost client (it runs to its
        # end, sending nothing more: a coupon it issued stays issued); the requests queued
        # behind it are never started.
        for cycle in (self._running, self.cycle, *(queued for queued, _ in self.pipeline)):
            if isinstance(cycle, RequestResponseCycle) and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self.pipeline.clear()
        self.flow.resume_writing()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # Remembered: with requests pipelined behind it, `self.cycle` is the last queued.
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def data_received(self, data: bytes) -> None:
        if self._draining_until:
            self._drained += len(data)
            if self._drained > self.LINGER_BYTES:
                self.transport.close()
            return
        if (
            self._fresh
            and data.startswith(_LANE_REQUEST_LINE)
            and self._answered_all()
            and self._lane_at_once(data)
        ):
            return
        if not self._receiving_since:
            self._receiving_since = self.loop.time()
        self._began = False
        self._feed(data)
        if (
            self._in_headers
            and not self._began
            and not self._draining_until
            and not self.transport.is_closing()
        ):
            # Still inside the headers after this chunk: the parser holds them until they
            # end, so a header that never ends must be stopped here, by its raw size. (A
            # chunk in which the request began also holds the requests pipelined before
            # it: its bytes are not all this request's, so only the next chunks count.)
            self._raw_header_bytes += len(data)
            if self._raw_header_bytes > 2 * self._max_header_bytes:
                self._refuse_headers()

    def _feed(self, data: bytes) -> None:
        """uvicorn's feeding of the parser, but for a request that asks to upgrade."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            not_logged = _INVALID_REQUESTS.admit()
            if not_logged is not None:
                self.logger.warning(msg, extra={"same_not_logged": not_logged})
            self._close_with(_INVALID)
        except httptools.HttpParserUpgrade as upgrade:
            self._ignore_upgrade(data[upgrade.args[0] :])

    def _ignore_upgrade(self, rest: bytes) -> None:
        """Serve a request that asks to upgrade (`Upgrade: h2c`, as curl --http2 and Java's
        HttpClient send over http://) in HTTP/1.1, as RFC 9110 §7.8 lets a server that
        upgrades to nothing do, its body included. llhttp stops at such a request's head,
        ends the request there without its body, and would read the body as the next
        request. A fresh parser is told the request's framing (its Content-Length or
        chunked coding) and reads the body into the request, then what follows as the next
        request."""
        self.parser = httptools.HttpRequestParser(self)
        if self._draining_until or self.transport.is_closing():
            return
        chunked = any(
            name == b"transfer-encoding" and b"chunked" in value.lower()
            for name, value in self.headers
        )
        if chunked or self._content_length > 0:
            # Undo the end llhttp gave the request: its handler has not run yet.
            cycle = self.cycle
            cycle.more_body = True
            cycle.message_event.clear()
            self._fresh = False
            self._receiving_since = self.loop.time()
            framing = (
                b"transfer-encoding: chunked"
                if chunked
                else b"content-length: %d" % self._content_length
            )
            self._framing_only = True
            try:
                self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
            finally:
                self._framing_only = False
        if rest:
            self._feed(rest)

    def timed_out(self) -> None:
        """The request did not arrive whole in time: 408, then the connection is closed."""
        if self.transport.is_closing() or self._draining_until:
            return
        self._receiving_since = 0.0
        self._close_with((408, PLAIN, b"the request did not arrive in time", []))

    def receiving_since(self) -> float:
        return self._receiving_since

    @property
    def request_timeout(self) -> float:
        return self._request_timeout

    # --- parser callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._framing_only:
            return
        self._fresh = False
        self._began = True
        self._own = None
        # uvicorn builds the ASGI scope here; the lane needs none, so it is built only for
        # a request that goes to the ASGI app (see _scope).
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        if not self._receiving_since:
            self._receiving_since = self.loop.time()
        self._in_headers = True
        self._header_bytes = self._raw_header_bytes = 0
        self._header_count = 0
        self._hosts = 0
        self._bad_host = False
        self._too_large = False
        self._lane = False
        self._lane_ok = True
        self._content_type = b""
        self._content_length = -1
        self._body_size = 0
        self._prefix = None
        self._body = b""

    def on_url(self, url: bytes) -> None:
        if self._framing_only:
            return
        self.url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._max_header_bytes:
            self._too_large = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._draining_until or self._framing_only:
            return
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._header_count > self._max_headers or self._header_bytes > self._max_header_bytes:
            self._too_large = True
            # Still wanted: the refusal is written in the protocol the content type names,
            # with the CORS headers its origin is allowed (browsers send Origin last).
            lowered = name.lower()
            if not self._content_type and lowered == b"content-type":
                self._content_type = value
            elif lowered == b"origin" and all(n != b"origin" for n, _ in self.headers):
                self.headers.append((lowered, value))
            return
        name = name.lower()
        # llhttp drops the spaces before a value but keeps those after it, which are no part
        # of it either (RFC 9110, 5.5): a Host or an X-Request-Id read as it was written.
        if value[-1:] in (b" ", b"\t"):
            value = value.rstrip(b" \t")
        if name in SINGLE_VALUED and any(n == name for n, _ in self.headers):
            self._lane_ok = False  # refused by the app
        if name == b"content-type":
            self._content_type = value
        elif name == b"content-length":
            self._content_length = content_length(value)
            if self._content_length < 0:
                # Digits llhttp took (leading zeros without end, or a length below 2**64)
                # but too many to be a length: refused as llhttp refuses a longer one, 400.
                raise ValueError("Content-Length of too many digits")
        elif name == _HOST:
            self._hosts += 1
            if not valid_host(value):
                self._bad_host = True
        elif name == _REQUEST_ID:
            if not self._request_id:
                self._request_id = value
        elif name in _NOT_FOR_THE_LANE:
            self._lane_ok = False
            if name == b"expect" and value.lower() == b"100-continue":
                self.expect_100_continue = True
        elif (name in _ENCODINGS and value.strip().lower() != b"identity") or (
            name == _PROTOCOL_VERSION and other_protocol_version(value)
        ):
            self._lane_ok = False
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._draining_until or self._framing_only:
            return
        self._in_headers = False
        if self._too_large:
            self._refuse_headers()
            return
        # llhttp reads HTTP/0.9, 1.0, 1.1 and 2.0 request lines (and refuses the others).
        version = self.parser.get_http_version()
        if version != "1.1" or self._hosts != 1 or self._bad_host:
            refused = _unsupported(version, self._hosts, self._bad_host)
            if refused is not None:
                self._refuse_malformed(refused)
                return
        if self._content_length > self._max_body:
            self._refuse_body(self._content_length, declared=True)
            return
        if self._content_length < 0 and enveloped(self._content_type):
            self._prefix = b""  # sent chunked: its first message's prefix says its size
        route = self._route
        codec = codec_for(self._content_type) if self._lane_ok else None
        if (
            codec is not None
            and route is not None
            and self.url == ISSUE_PATH_BYTES
            and self._content_length >= 0
            and self._answered_all()
            and self.parser.get_method() == b"POST"
        ):
            self._lane = True
            self._lane_codec = codec
            return
        self.scope = self._scope()
        super().on_headers_complete()
        if type(self.cycle) is RequestResponseCycle:
            _Cycle.adopt(self.cycle, self._linger)
        self._own = self.cycle
        if self._closing and self.cycle is not None:
            self.cycle.keep_alive = False

    def _scope(self) -> Any:
        """The ASGI scope, as uvicorn's on_message_begin makes it."""
        return {
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }

    def on_body(self, body: bytes) -> None:
        if self._draining_until:
            return
        self._body_size += len(body)
        size = self._body_size
        if self._prefix is not None:
            self._prefix, declared = declared_size(self._prefix, body)
            size = max(size, declared)
        if size > self._max_body:
            self._refuse_body(size, declared=False)
            return
        if self._lane:
            self._body += body
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._draining_until:
            return
        self._fresh = True
        self._receiving_since = 0.0
        if not self._lane:
            super().on_message_complete()
            return
        self._lane = False
        body = self._body
        self._body = b""
        route = self._route
        assert route is not None  # the lane was taken
        # An HTTP/1.0 request's answer is its connection's last, as the app's answers are
        # (uvicorn's way): kept alive, it would need a Connection: keep-alive of its own.
        keep_alive = (
            self.parser.should_keep_alive()
            and not self._closing
            and self.parser.get_http_version() != "1.0"
        )
        self._lane_request(route, self._lane_codec, body, keep_alive, self._request_id)

    # --- the lane ---------------------------------------------------------------------

    def _answered_all(self) -> bool:
        """Nothing in flight or queued on this connection: the lane may answer next."""
        cycle = self.cycle
        return (cycle is None or cycle.response_complete) and not self.pipeline

    def _lane_at_once(self, data: bytes) -> bool:
        """The common IssueCoupon request, arrived whole in one read and alone in it, taken
        without the parser's per-field callbacks. False (nothing done): the parser takes
        it, as it takes anything this does not read exactly as the parser would."""
        end = data.find(b"\r\n\r\n")
        route = self._route
        if end < 0 or end + 4 > self._max_header_bytes or route is None:
            return False
        block = data[len(_LANE_REQUEST_LINE) : end]
        # A client sends the same fields request after request: each block is read once.
        fields = _LANE_BLOCKS.get(block, _UNSEEN)
        if fields is _UNSEEN:
            fields = _lane_fields(block)
            # (A block with a request id is another block each time: not kept.)
            if len(block) <= _LANE_BLOCK_MAX and not (fields and fields[4]):
                if len(_LANE_BLOCKS) >= _LANE_BLOCKS_MAX:
                    _LANE_BLOCKS.clear()
                _LANE_BLOCKS[block] = fields
        if not fields:
            return False
        codec, length, keep_alive, count, request_id = fields
        if count > self._max_headers or length > self._max_body or len(data) != end + 4 + length:
            return False
        self._unset_keepalive_if_required()
        self._receiving_since = 0.0
        self._lane_request(route, codec, data[end + 4 :], keep_alive, request_id)
        return True

    def _lane_request(
        self,
        route: IssueRoute,
        codec: tuple[Codec, bytes],
        body: bytes,
        keep_alive: bool,
        request_id: bytes,
    ) -> None:
        arrived = time.monotonic()
        answer = route.at_once(body, codec, arrived)
        if isinstance(answer, tuple):
            self._write(answer, keep_alive)
            self._lane_done()
            hold = route.hold_after(answer)
            if hold and keep_alive:
                self._hold(hold)
            return
        cycle = _LaneCycle(keep_alive)
        self.cycle = cycle  # type: ignore[assignment]
        # No task: the answer is written as the request's outcome settles. The request
        # stands in the server's tasks, which a graceful shutdown waits for (or cancels),
        # until it is answered.
        pending = route.answer_soon(
            answer, codec, arrived, partial(self._lane_answer, cycle), request_id
        )
        if not cycle.response_complete:
            cycle.pending = pending
            self.tasks.add(pending)  # type: ignore[arg-type]

    def _lane_answer(self, cycle: _LaneCycle, answer: Answer) -> None:
        cycle.response_complete = True
        if cycle.pending is not None:
            self.tasks.discard(cycle.pending)
            cycle.pending = None
        if self.transport.is_closing():
            return  # the client left; the coupon (if any) is committed all the same
        self._write(answer, cycle.keep_alive)
        self._lane_done()

    def _write(self, answer: Answer, keep_alive: bool, *, linger: bool = False) -> None:
        if answer[0] != 200 and keep_alive:
            # The same refusal again and again (turned away, sold out from memory): the
            # bytes are made once per answer and date.
            head = self._head()
            known = Http1Protocol._refusals.get(id(answer))
            if known is None or known[0] is not answer or known[1] is not head:
                if len(Http1Protocol._refusals) > 256:
                    Http1Protocol._refusals.clear()
                known = (answer, head, self._bytes(answer, keep_alive))
                Http1Protocol._refusals[id(answer)] = known
            self.transport.write(known[2])
            return
        self.transport.write(self._bytes(answer, keep_alive))
        if not keep_alive and not linger:
            self.transport.close()

    def _bytes(self, answer: Answer, keep_alive: bool) -> bytes:
        status, content_type, payload, extra = answer
        parts = [
            STATUS_LINE[status],
            self._head(),
            b"content-type: ",
            content_type,
            b"\r\ncontent-length: ",
            str(len(payload)).encode(),
            b"\r\n",
        ]
        for name, value in extra:
            parts += (name, b": ", value, b"\r\n")
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", payload)
        return b"".join(parts)

    def _lane_done(self) -> None:
        self.on_response_complete()

    def _hold(self, seconds: float) -> None:
        """Read nothing more from this connection for a while (see Doorman.hold_seconds):
        what its client sends meanwhile waits in the kernel."""
        if self._held is None and not self.transport.is_closing():
            self.transport.pause_reading()
            self._held = self.loop.call_later(seconds, self._unhold)

    def _unhold(self) -> None:
        self._held = None
        if not self.transport.is_closing() and not self.flow.read_paused:
            self.transport.resume_reading()

    # --- keep-alive: the sweeper closes idle connections (no timer per request) ------------

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            if self._refused is None:
                self.flow.resume_reading()  # if it was the last queued
        elif self._refused is not None:
            # Every request before the refused one is answered: its refusal goes now.
            answer, self._refused = self._refused, None
            self._draining_until = 0.0
            self.flow.resume_reading()  # for the lingering close
            self._close_with(answer)
        else:
            self.flow.resume_reading()
            self._idle_since = self.loop.time()

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = 0.0

    def idle_since(self) -> float:
        return self._idle_since

    def _head(self) -> bytes:
        """uvicorn's default headers (the date) as bytes, remade when uvicorn remakes them."""
        source = self.server_state.default_headers
        if source is not Http1Protocol._head_source:
            Http1Protocol._head_bytes = b"".join(
                name + b": " + value + b"\r\n" for name, value in source
            )
            Http1Protocol._head_source = source
        return Http1Protocol._head_bytes

    # --- refusals ---------------------------------------------------------------------

    def _refuse_headers(self) -> None:
        """In the protocol of the request's content type when it was read before the limit
        (the path is always known: the request line comes first)."""
        message = (
            f"request headers are limited to {self._max_headers} fields and "
            f"{self._max_header_bytes} bytes"
        )
        answer = refusal(self.url, self._content_type, message, status=431, plain=message)
        self._close_with(with_cors(answer, self.url, self.headers, self._cors))

    def _refuse_malformed(self, answer: Answer) -> None:
        """A request the parser read but HTTP/1.1 does not allow: refused as the parser's
        errors are (see _feed), logged once a second at most."""
        not_logged = _INVALID_REQUESTS.admit()
        if not_logged is not None:
            self.logger.warning(
                "Invalid HTTP request received.",
                extra={"same_not_logged": not_logged, "reason": answer[2].decode()},
            )
        self._close_with(answer)

    def _refuse_body(self, size: int, *, declared: bool) -> None:
        answer = body_refusal(self.url, self._content_type, size, self._max_body, declared=declared)
        self._close_with(with_cors(answer, self.url, self.headers, self._cors))

    def _close_with(self, answer: Answer) -> None:
        """Answer (unless an answer has begun) and close: the rest of this request will not
        be read, so the connection cannot carry another."""
        self._in_headers = False
        self._lane = False
        if self.transport.is_closing() or self._refused is not None:
            return
        if self._earlier_unanswered():
            # Answers go in the order of the requests (RFC 9112 §9.3.2): the refusal waits
            # for those of the requests before it, in flight or queued. Nothing more is
            # read; what the parser still holds is dropped.
            self._refused = answer
            self._receiving_since = 0.0
            self._draining_until = math.inf  # never due: the sweeper leaves it be
            self.flow.pause_reading()
            return
        if _answering(self.cycle):
            # A request in progress learns of it as a disconnect (connection_lost).
            self.transport.close()
            return
        self._write(answer, keep_alive=False, linger=True)
        cycle = self.cycle
        if isinstance(cycle, RequestResponseCycle) and not cycle.response_complete:
            # Its handler may have started without answering yet (its request's body was
            # being read): it learns of the refusal as a disconnect, and what it would
            # send could not be written after the end written below.
            cycle.disconnected = True
            cycle.message_event.set()
        self._linger()

    def _linger(self) -> None:
        """A lingering close, once an answer is written: end our side, and read (and drop)
        what the client is still sending for a moment (LINGER_SECONDS, LINGER_BYTES at
        most). Closing with its bytes unread would make the kernel reset the connection,
        and a client still sending its body would never read the answer."""
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._draining_until = self.loop.time() + self.LINGER_SECONDS
        self._drained = 0
        self._receiving_since = self._idle_since = 0.0
        self.flow.resume_reading()

    def _earlier_unanswered(self) -> bool:
        """Whether a request before the one being refused awaits its answer. A queued
        request (behind one in flight) is one; the refused request's own cycle, queued, is
        taken off the queue, as it will not run."""
        own = self._own
        queued = self.pipeline
        if own is not None and any(cycle is own for cycle, _ in queued):
            for entry in [e for e in queued if e[0] is own]:
                queued.remove(entry)
            return True
        cycle = self.cycle
        return bool(queued) or (
            cycle is not None and cycle is not own and not cycle.response_complete
        )

    def draining_until(self) -> float:
        return self._draining_until


_INVALID: Answer = (400, PLAIN, b"Invalid HTTP request received.", [])
_NO_HOST: Answer = (400, PLAIN, b"an HTTP/1.1 request needs one Host header", [])
_HOSTS: Answer = (400, PLAIN, b"a request may have one Host header, no more", [])
_BAD_HOST: Answer = (400, PLAIN, b"the Host header must be a host and an optional port", [])
_VERSION: Answer = (505, PLAIN, b"HTTP/1.1 and 1.0 here; HTTP/2 with prior knowledge or TLS", [])


class _Flow(FlowControl):
    """uvicorn's flow control, but reading stays paused while requests wait their turn
    behind the one in flight, and while writing is paused: a request read then would only
    wait in memory, or add its answer to those waiting to be sent. (uvicorn resumes reading
    whenever an answer ends or a handler asks for its body, so a client that pipelines
    faster than it is answered queues requests without bound.) A queued request's body is
    whole, but for the last one's: started, it is no longer queued, and reading resumes."""

    def __init__(self, transport: asyncio.Transport, pipeline: Sized) -> None:
        super().__init__(transport)
        self._pipeline = pipeline

    def resume_reading(self) -> None:
        # FlowControl's, inlined: once per answer.
        if self.read_paused and not self.write_paused and not self._pipeline:
            self.read_paused = False
            self._transport.resume_reading()


def _unsupported(version: str, hosts: int, bad_host: bool) -> Answer | None:
    """The refusal of a request line's version, or of its Host fields (RFC 9112 §3.2:
    one in HTTP/1.1, at most one in HTTP/1.0, an authority), or None when neither is
    wrong."""
    if not version.startswith("1."):
        return _VERSION
    if hosts > 1:
        return _HOSTS
    if hosts == 0 and version != "1.0":
        return _NO_HOST
    if bad_host:
        return _BAD_HOST
    return None


def unsent_bytes(transport: asyncio.WriteTransport) -> int:
    """The bytes written and not yet taken by the client: the transport's buffer and the
    kernel's send queue (the kernel tells the transport there is room only once a good
    part of its queue has gone, so the transport's buffer alone would stand still for a
    while under a client that reads steadily but slowly)."""
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            size += struct.unpack("i", queued)[0]
    return size


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """The bytes that have arrived on the transport's socket and are not read yet."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            unread = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
            size: int = struct.unpack("i", unread)[0]
            return size
    return 0


def front_app(app: object) -> object:
    """The service's own app, inside whatever middleware uvicorn wrapped it in."""
    for _ in range(4):
        if hasattr(app, "issue_route"):
            return app
        app = getattr(app, "app", app)
    return app


def limits_of(front: object) -> Limits:
    """The limits the service's app (`front_app`) sets, or the defaults."""
    limits: Limits | None = getattr(front, "http_limits", None)
    return limits or _Defaults()


def _answering(cycle: object) -> bool:
    """An answer is on its way on this connection (an ASGI response started, or the lane's
    request in flight): nothing else may be written before it."""
    if isinstance(cycle, _LaneCycle):
        return not cycle.response_complete
    return bool(getattr(cycle, "response_started", False)) and not getattr(
        cycle, "response_complete", True
    )


class _Sweeper:
    """Once a second, per process: close connections whose request is late (408) or that
    have been idle longer than the keep-alive time."""

    PERIOD = 1.0
    _by_state: ClassVar[dict[int, _Sweeper]] = {}

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
        self._state = state
        self._loop = loop
        loop.call_later(self.PERIOD, self._sweep)

    @classmethod
    def watch(cls, protocol: Http1Protocol) -> None:
        key = id(protocol.server_state)
        if key not in cls._by_state:
            cls._by_state[key] = cls(protocol.server_state, protocol.loop)

    def _sweep(self) -> None:
        now = self._loop.time()
        for connection in list(self._state.connections):
            if isinstance(connection, Http1Protocol):
                since = connection.receiving_since()
                if since and now - since > connection.request_timeout:
                    connection.timed_out()
                    continue
                idle = connection.idle_since()
                if idle and now - idle > connection.timeout_keep_alive:
                    connection.timeout_keep_alive_handler()
                    continue
                draining = connection.draining_until()
                if draining and now > draining:
                    connection.transport.close()
        self._loop.call_later(self.PERIOD, self._sweep)
