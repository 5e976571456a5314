"""HTTP/2 for the ASGI app, on the `h2` state machine: what gRPC clients need.

One connection carries many streams; each stream is one ASGI `http` request run in its own
task. The `http.response.trailers` extension is offered, because gRPC sends its status in
trailers. Flow control runs both ways: a request body is acknowledged to the peer only as
the app reads it (so a slow reader holds the peer back instead of buffering), and a
response waits for the peer's stream and connection windows, and for the transport's
buffer to drain. A peer's RST_STREAM or a lost connection is `http.disconnect`.

A stream's task is cancelled when its peer resets it (or the connection is lost) before the
app has read the whole request: until then no handler has begun any work. Once the app has
the whole request, the task runs to its end, as over HTTP/1.1 (uvicorn tells a handler of a
lost client by `http.disconnect`, never by cancelling it): an IssueCoupon past admission
keeps its guarantees. The work a peer can leave running this way is bounded ("rapid reset",
CVE-2023-44487): at most MAX_CONCURRENT_STREAMS streams of a connection are unanswered at
once, reset ones included (a new stream beyond is refused, REFUSED_STREAM), and a
connection whose peer has reset (or had refused) more than RESET_BUDGET streams before
their answers, and more of them than it had answered, is closed with a GOAWAY
(ENHANCE_YOUR_CALM). So is one that floods frames that ask nothing of the app (PING,
SETTINGS, WINDOW_UPDATE, ...: IDLE_FRAMES, counted frame by frame as h2 reads them), and
h2 is given at most READ_CHUNK of a connection's bytes a turn of the loop: one connection
cannot hold a worker's others up for long.

Time limits: a request must arrive whole within the service's request time-out of its
HEADERS, or its stream is reset (CANCEL) and its task cancelled. A response must not stand
still for as long either (the send time-out): one whose next byte the peer's windows keep
back for the request time-out (its stream's window, or the connection's while no other
stream's bytes go out either) is abandoned. Its stream is reset with CANCEL (keeping a
window shut breaks no rule, RFC 9113, 6.9, so FLOW_CONTROL_ERROR would be wrong: the
answer is just no longer worth holding), its task runs to its end sending nothing more,
and its buffers go with it. A connection whose transport has drained nothing for that long
(paused: the peer does not read its socket) is closed: a GOAWAY (ENHANCE_YOUR_CALM) is
queued, then the connection reset (TCP RST: a close would wait for buffers the peer never
drains, so the GOAWAY reaches it only if there was room). Progress restarts either clock:
a byte of the response sent, or what is unsent shrinking while the transport is paused
(its buffer and the kernel's send queue: h1.unsent_bytes). A connection left with no
stream goes back to its idle timer.

A malformed request (RFC 9113, 8.1.1: a field name or value HTTP/2 forbids, a
connection-specific field, a pseudo-header missing, repeated, unknown or misplaced, a
content-length not digits, of too many, or not what the body is, or such a trailer
section) is a stream error: RST_STREAM PROTOCOL_ERROR on its stream alone. h2's own
checks of inbound header lists and of content-length are off, since they end the whole
connection for it: the header list is checked in the one pass that builds the request's
scope, the body against its content-length as it arrives. Spaces and tabs around a value
are dropped, not refused, as over HTTP/1.1 (RFC 9110, 5.5).

Header compression costs less than h2's own (_Encoder, _Decoder): a response's header
list is encoded without the dynamic table, so the same list is the same block, computed
once per process; a request's block that changed nothing in the table is decoded once and
reused while the table stays as it was. With h2's checks of the app's own outbound headers
off and a response's HEADERS and first DATA in one write, a stream costs the server about
a third less CPU (docs/performance.md).

A header list or a request body over the service's limits is refused on its own stream,
as HTTP/1.1 refuses it (http/refusal.py), the connection and its other streams going on.
A body is refused at its headers when its content-length says it is over the limit; else
(gRPC's usual case) when the prefix of its first enveloped message (gRPC, gRPC-Web, a
Connect stream) says so, or as soon as what has arrived of it is over: none of the excess
reaches the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import time
from collections import deque
from functools import partial
from typing import Any, cast
from urllib.parse import unquote

from connectrpc.codec import Codec
from h2.config import H2Configuration
from h2.connection import AllowedStreamIDs, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import (
    DenialOfServiceError,
    FlowControlError,
    ProtocolError,
    StreamClosedError,
)
from h2.settings import SettingCodes, Settings
from h2.stream import H2Stream
from hpack.hpack import Decoder, Encoder, encode_integer
from hpack.struct import HeaderTuple
from hpack.table import HeaderTable
from hyperframe.frame import (
    DataFrame,
    ExtensionFrame,
    Frame,
    GoAwayFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from uvicorn.config import Config
from uvicorn.server import ServerState

from coupon.application.issue import Pending
from coupon.entrypoints.cors import Cors
from coupon.entrypoints.fast_issue import (
    ISSUE_PATH,
    Answer,
    FastIssue,
    IssueRoute,
    content_length,
)
from coupon.entrypoints.http.h1 import OVERDUE_GRACE, front_app, limits_of, unsent_bytes
from coupon.entrypoints.http.refusal import (
    body_refusal,
    declared_size,
    enveloped,
    refusal,
    with_cors,
)
from coupon.entrypoints.metrics import get_metrics

log = logging.getLogger("uvicorn.error")

# Limits a peer is told in SETTINGS; h2 refuses a peer that goes past them.
MAX_CONCURRENT_STREAMS = 100
# Streams a peer may reset before their answers (or have refused, over
# MAX_CONCURRENT_STREAMS unanswered) before the connection is closed, when they also
# outnumber the streams it had answered.
RESET_BUDGET = 100
# After that GOAWAY: how long, and how much, is read and dropped before the close, so that
# the peer, still sending, reads the GOAWAY before a TCP reset would discard it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024
# A request refused before its body ended (over the body limit, or its header list over
# MAX_HEADER_LIST_SIZE): what the peer still sends of it is read and dropped, its window
# given back, up to DRAIN_BYTES and for DRAIN_SECONDS, then its stream is reset (NO_ERROR).
# Reset at once, the answer is lost to some clients (curl 7.x drops a response whose
# stream is reset before its upload ended, though RFC 9113, 8.1 allows the reset).
DRAIN_BYTES = 1024 * 1024
DRAIN_SECONDS = 1.0
MAX_HEADER_LIST_SIZE = 16 * 1024
# Frames that ask nothing of the app (PING, SETTINGS, PRIORITY, WINDOW_UPDATE, RST_STREAM,
# a DATA frame of less than SMALL_DATA bytes that ends nothing, a frame of an unknown type)
# cost a worker as much as a request's, and a read may hold thousands. (A request's body
# is one message: a client sends it in a frame or a few, never byte by byte.) A connection
# may send IDLE_FRAMES of them at once, IDLE_FRAME_RATE a second after that, and
# IDLE_FRAMES_EARNED more for each HEADERS or DATA frame the server sends it (a client's
# window updates and its pings for bandwidth follow what it receives), up to
# IDLE_FRAMES_HELD in hand; one more ends the connection with a GOAWAY (ENHANCE_YOUR_CALM),
# as nghttp2 and Go end such floods.
IDLE_FRAMES = 1000
IDLE_FRAME_RATE = 100.0
IDLE_FRAMES_EARNED = 4
IDLE_FRAMES_HELD = 10_000
SMALL_DATA = 256
# What h2 is given of a read in one turn of the loop: the rest waits for the next turns,
# the connection's reading paused meanwhile, so that one connection's read (uvloop reads up
# to 256 KiB) cannot hold the worker from its other connections for long.
READ_CHUNK = 64 * 1024
# A header list over MAX_HEADER_LIST_SIZE is refused on its own stream (`resource_exhausted`
# in the caller's protocol on the API's paths, 431 elsewhere: http/refusal.py), the
# connection and its other streams going on: its block must still be decoded whole, or the
# HPACK table the peer's later blocks refer to would be out of step. Only a list over
# this, which no client keeping to the advertised limit sends, ends the connection.
HEADER_LIST_HARD_LIMIT = 64 * 1024
MAX_FRAME_SIZE = 16 * 1024  # the protocol's minimum: larger frames buy nothing here
# Header blocks kept per connection for reuse (_Decoder), and encodings of response
# header lists kept per process (_Encoder).
DECODED_BLOCKS = 8
DECODED_BLOCK_BYTES = 512
ENCODED_LISTS = 1024
# Per stream, what a peer may send before the app reads it; the connection as a whole
# may have this much unread across its streams.
STREAM_WINDOW = 64 * 1024
CONNECTION_WINDOW = 1024 * 1024

# Connection-specific headers do not exist in HTTP/2 (RFC 9113, 8.2.2): an ASGI app
# written for HTTP/1.1 may still set them, and h2 would refuse to send them.
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)

# Malformed in a header list (RFC 9113, 8.2.1): in a field name, a character outside
# visible ASCII, an upper-case letter, or a colon (but a pseudo-header's first); in a
# value, NUL, CR or LF. Such a request is refused on its own stream (RST_STREAM
# PROTOCOL_ERROR), the connection and its other streams going on: h2's own checks, which
# would end the whole connection for it, are off.
_BAD_NAME = re.compile(rb"[^\x21-\x39\x3b-\x40\x5b-\x7e]")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_WHITESPACE = b" \t"

Headers = list[tuple[bytes, bytes]]
_ENCODED: dict[tuple[Any, ...], bytes] = {}
_TOO_LARGE = f"request headers are limited to {MAX_HEADER_LIST_SIZE} bytes"


class _Table(HeaderTable):
    """A decoder's HPACK table that counts its changes: a header block decoded against one
    state of the table means the same while that state lasts (_Decoder.decode)."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, value: int) -> None:
        self.generation += 1
        HeaderTable.maxsize.fset(self, value)  # type: ignore[attr-defined]


class _Decoder(Decoder):
    """HPACK decoding that accepts header lists up to HEADER_LIST_HARD_LIMIT whatever h2
    sets (it sets the advertised limit once the peer acknowledges the settings).

    A client sends the same header block again and again (the same RPC, its fields in the
    table already): a block that changed nothing in the table when it was decoded decodes
    to the same list while the table stays as it was, so the last few such blocks are kept
    (DECODED_BLOCKS, each at most DECODED_BLOCK_BYTES) with the table's generation, and
    reused; anything that changes the table (an entry added, a size update) makes them
    stale."""

    def __init__(self) -> None:
        super().__init__()
        self.header_table = self._table = _Table()
        self._decoded: dict[tuple[bytes, bool], tuple[int, int, list[HeaderTuple]]] = {}

    @property
    def max_header_list_size(self) -> int:
        return HEADER_LIST_HARD_LIMIT

    @max_header_list_size.setter
    def max_header_list_size(self, value: int) -> None:
        pass

    def decode(self, data: bytes, raw: bool = False) -> list[HeaderTuple]:
        table = self._table
        generation = table.generation
        if type(data) is not bytes or len(data) > DECODED_BLOCK_BYTES:
            return list(super().decode(data, raw))
        key = (data, raw)
        known = self._decoded.get(key)
        if known is not None and known[0] == generation and known[1] == self.max_allowed_table_size:
            return list(known[2])
        headers = list(super().decode(data, raw))
        if table.generation == generation:
            if len(self._decoded) >= DECODED_BLOCKS:
                self._decoded.clear()
            self._decoded[key] = (generation, self.max_allowed_table_size, headers)
            return list(headers)
        return headers


class _Encoder(Encoder):
    """HPACK encoding that never adds to the dynamic table: each field is sent indexed when
    the static table holds it whole, else as a literal without indexing (its name indexed
    when the static table has the name), its strings not Huffman-coded. A block then
    depends on its header list alone, so the encoding of a list is kept (ENCODED_LISTS, for
    the whole process) and reused: a response's few fields cost a dictionary look-up.
    A peer's change of its table size is still signalled first, as RFC 7541, 4.2 asks."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        fields = tuple(headers)
        prefix = b""
        if self.table_size_changes:
            prefix = self._size_updates()
        block = _ENCODED.get(fields)
        if block is None:
            block = _encode_block(fields)
            if all(type(field) is tuple for field in fields):
                if len(_ENCODED) >= ENCODED_LISTS:
                    _ENCODED.clear()
                _ENCODED[fields] = block
        return prefix + block if prefix else block

    def _size_updates(self) -> bytes:
        """The table size updates a block must begin with after the peer changed its
        SETTINGS_HEADER_TABLE_SIZE (RFC 7541, 4.2): the smallest size since the last
        block, then the current one if larger. (Read from the changes queued, not hpack's
        `resized` flag, which a repeated setting clears with the changes still unsent.)"""
        smallest, final = min(self.table_size_changes), self.table_size_changes[-1]
        self.table_size_changes = []
        self.header_table.resized = False
        out = bytearray()
        for size in (smallest, final) if final != smallest else (final,):
            update = encode_integer(size, 5)
            update[0] |= 0x20
            out += update
        return bytes(out)


def _encode_block(fields: tuple[Any, ...]) -> bytes:
    out = bytearray()
    static = HeaderTable.STATIC_TABLE_MAPPING
    for field in fields:
        name, value = _as_bytes(field[0]), _as_bytes(field[1])
        sensitive = (isinstance(field, HeaderTuple) and not field.indexable) or (
            len(field) > 2 and bool(field[2])
        )
        entry = static.get(name)
        if entry is not None and not sensitive:
            index = entry[1].get(value)
            if index is not None:
                head = encode_integer(index, 7)
                head[0] |= 0x80
                out += head
                continue
        # Literal without indexing (0000), or never indexed (0001) for a sensitive field.
        head = encode_integer(entry[0], 4) if entry is not None else bytearray(b"\x00")
        if sensitive:
            head[0] |= 0x10
        out += head
        if entry is None:
            out += encode_integer(len(name), 7)
            out += name
        out += encode_integer(len(value), 7)
        out += value
    return bytes(out)


def _as_bytes(text: bytes | str) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


class _Connection(H2Connection):
    """h2's connection, but a request's content-length is checked here (_scope, _data), as
    a stream error: h2 would end the whole connection for a malformed one, or for a body
    that does not match it (RFC 9113, 8.1.1); and the frames that ask nothing of the app
    are counted against the peer's allowance (IDLE_FRAMES), checked frame by frame, so that
    a flood ends within the read that carries it."""

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config)
        self.idle_frames = float(IDLE_FRAMES)  # the allowance left
        self.idle_counted_at = time.monotonic()

    def _receive_frame(self, frame: Frame) -> list[Event]:
        if type(frame) in _IDLE_FRAMES or (
            isinstance(frame, DataFrame)
            and len(frame.data) < SMALL_DATA
            and "END_STREAM" not in frame.flags
        ):
            self.idle_frames -= 1
            if self.idle_frames < 0 and not self._idle_refilled():
                # h2 queues the GOAWAY with this error's code, ENHANCE_YOUR_CALM.
                raise DenialOfServiceError("too many frames that ask nothing")
        return super()._receive_frame(frame)

    def _idle_refilled(self) -> bool:
        """The allowance grown by the time since it was last counted (IDLE_FRAME_RATE, up to
        IDLE_FRAMES): whether there is any left."""
        now = time.monotonic()
        grown = (now - self.idle_counted_at) * IDLE_FRAME_RATE
        self.idle_counted_at = now
        if grown > 0 and self.idle_frames < IDLE_FRAMES:
            self.idle_frames = min(float(IDLE_FRAMES), self.idle_frames + grown)
        return self.idle_frames >= 0

    def _earn(self) -> None:
        if self.idle_frames < IDLE_FRAMES_HELD:
            self.idle_frames += IDLE_FRAMES_EARNED

    def send_headers(self, *args: Any, **kwargs: Any) -> None:
        self._earn()
        super().send_headers(*args, **kwargs)

    def send_data(self, *args: Any, **kwargs: Any) -> None:
        self._earn()
        super().send_data(*args, **kwargs)

    def _begin_new_stream(self, stream_id: int, allowed_ids: AllowedStreamIDs) -> H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream._initialize_content_length = _no_content_length  # type: ignore[method-assign]
        stream._track_content_length = _no_body_length  # type: ignore[method-assign]
        return stream


class _Settings(Settings):
    """The server's own settings, as advertised; but h2's check of a new stream against
    SETTINGS_MAX_CONCURRENT_STREAMS finds no limit. h2 would end the whole connection for
    the stream over it (PROTOCOL_ERROR, the other streams unanswered), where RFC 9113,
    5.1.2 makes it a stream error; and a client may open more before it has read the
    setting. The limit is kept when the request is seen (H2Protocol._request): the stream
    over it is refused, REFUSED_STREAM, the others answered."""

    @property
    def max_concurrent_streams(self) -> int:
        return 2**31

    @max_concurrent_streams.setter
    def max_concurrent_streams(self, value: int) -> None:
        self[SettingCodes.MAX_CONCURRENT_STREAMS] = value


_IDLE_FRAMES = frozenset(
    {
        ExtensionFrame,
        PingFrame,
        PriorityFrame,
        RstStreamFrame,
        SettingsFrame,
        WindowUpdateFrame,
    }
)


def _no_content_length(headers: object) -> None:
    pass


def _no_body_length(length: int, end_stream: bool) -> None:
    pass


class _Stream:
    """One request and its response, as the stream's ASGI task sees them."""

    __slots__ = (
        "body",
        "changed",
        "closed",
        "declared",
        "end_delivered",
        "ended",
        "headers_sent",
        "lane",
        "overdue",
        "pending",
        "prefix",
        "received",
        "request",
        "request_id",
        "response_complete",
        "response_headers",
        "response_status",
        "sent_at",
        "stopped",
        "stream_id",
        "task",
        "timer",
        "trailers_expected",
    )

    def __init__(
        self, stream_id: int, request: Headers, prefix: bytes | None, declared: int
    ) -> None:
        self.stream_id = stream_id
        self.request = request  # the header list, for a refusal's answer
        self.declared = declared  # its content-length (-1: none), which its body must match
        # Request body chunks not yet read by the app, with their flow-controlled size.
        self.body: deque[tuple[bytes, int]] = deque()
        self.received = 0  # bytes of request body received, against the limit
        # The first bytes of an enveloped body of no declared length, until they make the
        # prefix that gives the first message's length (None: not wanted, or read).
        self.prefix = prefix
        self.ended = False  # the peer sent END_STREAM
        self.end_delivered = False  # the app has read the end of the body
        self.closed = False  # reset by the peer, or the connection is gone
        # Set whenever the task may have something new to look at: body, window, reset.
        self.changed = asyncio.Event()
        self.response_status = 0
        self.response_headers: Headers = []
        self.headers_sent = False
        self.trailers_expected = False
        self.response_complete = False
        self.task: asyncio.Task[None] | None = None
        self.stopped = False  # its task cancelled: it runs no more of the app
        # The request time-out, until the request has arrived whole.
        self.timer: asyncio.TimerHandle | None = None
        # Loop time the response last moved: a byte of it sent, or a send begun.
        self.sent_at = 0.0
        self.overdue = False  # its send time-out found past, to be confirmed
        # IssueCoupon's common request, answered without a task (H2Protocol._lane_*): its
        # codec, its X-Request-Id, and its outcome while it settles.
        self.lane: tuple[Codec, bytes] | None = None
        self.request_id = b""
        self.pending: Pending | None = None

    def wake(self) -> None:
        self.changed.set()


class H2Protocol(asyncio.Protocol):
    """An HTTP/2 server connection (h2c with prior knowledge, or `h2` by ALPN on TLS)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.app_state = app_state
        front = front_app(self.app)
        limits = limits_of(front)
        self.cors: Cors | None = getattr(front, "cors", None)
        self.route: IssueRoute | None = getattr(front, "issue_route", None)
        self.fast: FastIssue | None = getattr(front, "fast_issue", None)
        self.max_body = limits.max_request_bytes
        self.request_timeout = limits.request_timeout_seconds
        # Outbound header lists are the app's, written lower-case and without
        # connection-specific fields (_send): h2's normalising and checking of them cost a
        # tenth of a stream's time and would change nothing.
        self.conn = _Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=False,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.writable = asyncio.Event()
        self.writable.set()
        # After a graceful GOAWAY: streams above this id are refused, open ones finish.
        self.last_stream_id: int | None = None
        self.idle: asyncio.TimerHandle | None = None
        # Streams the peer reset before their answers (or had refused), and streams answered.
        self.resets = 0
        self.answered = 0
        # Streams refused before their bodies ended: bytes dropped so far (DRAIN_BYTES).
        self.draining: dict[int, int] = {}
        self.lingering = -1  # bytes dropped since that GOAWAY; -1: not closing so
        # What has been read but not yet given to h2 (READ_CHUNK a turn).
        self.backlog = bytearray()
        # Loop time a response's DATA last went out on the connection, or its paused
        # transport last drained some.
        self.sent_at = 0.0
        # While the transport is paused: its buffer's size when last looked at, and the
        # check that closes the connection once it has not shrunk for the request time-out.
        self.buffered = 0
        self.watch: asyncio.TimerHandle | None = None
        self.overdue = False  # that time found past, to be confirmed

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.server_state.connections.add(self)  # type: ignore[arg-type]
        self.server = _address(transport.get_extra_info("sockname"))
        self.client = _address(transport.get_extra_info("peername"))
        self.scheme = "https" if transport.get_extra_info("sslcontext") else "http"
        self.conn.local_settings = _Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # Before any block is decoded: the advertised limit is checked per stream (_request).
        self.conn.decoder = _Decoder()
        self.conn.encoder = _Encoder()
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65_535)
        self._flush()
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.lingering >= 0:
            self.lingering += len(data)
            if self.lingering > LINGER_BYTES and self.transport is not None:
                self.transport.close()
            return
        if self.backlog:
            self.backlog += data  # behind what waits already
            return
        if len(data) > READ_CHUNK and self.transport is not None:
            # READ_CHUNK now, the rest on the next turns (_read_backlog), reading paused.
            self.backlog += memoryview(data)[READ_CHUNK:]
            self.transport.pause_reading()
            self.loop.call_soon(self._read_backlog)
            data = data[:READ_CHUNK]
        self._take_in(data)

    def _read_backlog(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.lingering >= 0:
            self.backlog.clear()
            if transport is not None and self.lingering >= 0:
                transport.resume_reading()  # read and dropped while the close lingers
            return
        data = bytes(self.backlog[:READ_CHUNK])
        del self.backlog[:READ_CHUNK]
        if self.backlog:
            self.loop.call_soon(self._read_backlog)
        else:
            transport.resume_reading()
        self._take_in(data)

    def _take_in(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except DenialOfServiceError as exc:
            # A flood of frames that ask nothing (_Connection): h2 has queued the GOAWAY
            # (ENHANCE_YOUR_CALM); sent, then the close lingers, as the peer is still
            # sending: an abrupt close would reset the connection before it read why.
            log.warning("HTTP/2 connection from %s closed: %s", self.client, exc)
            get_metrics().connection_closes("abuse").inc()
            self._flush()
            self._linger()
            return
        except ProtocolError as exc:
            # h2 has queued the GOAWAY with the reason (frame too large, too many
            # streams, header list too long, ...): send it and hang up.
            log.debug("HTTP/2 protocol error from %s: %s", self.client, exc)
            self._flush()
            self._abort()
            return
        for event in events:
            if self.lingering >= 0 or self.transport is None or self.transport.is_closing():
                break  # closed by one of them (ENHANCE_YOUR_CALM): the rest go unread
            self._handle(event)
        self._flush()

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost ends every stream

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._disarm_idle()
        self._unwatch()
        self.writable.set()
        for stream in list(self.streams.values()):
            stream.closed = True
            self._stop(stream)
            stream.wake()

    def pause_writing(self) -> None:
        self.writable.clear()
        if self.watch is None and self.transport is not None:
            self.sent_at = self.loop.time()
            self.buffered = unsent_bytes(self.transport)
            self.watch = self.loop.call_later(self._watch_period(), self._watch_writes)

    def resume_writing(self) -> None:
        self.writable.set()
        self._unwatch()
        self.overdue = False
        self.sent_at = self.loop.time()
        for stream in self.streams.values():
            stream.wake()

    def shutdown(self) -> None:
        """Graceful: tell the peer which streams will still be answered (GOAWAY with the
        last stream id), finish those, then close."""
        if (
            self.transport is None
            or self.transport.is_closing()
            or self.last_stream_id is not None
            or self.lingering >= 0
        ):
            return
        self.last_stream_id = self.conn.highest_inbound_stream_id
        # Written beside h2 rather than through close_connection(), which would stop h2
        # from sending anything more on the streams still running.
        goaway = GoAwayFrame(stream_id=0)
        goaway.last_stream_id = self.last_stream_id
        goaway.error_code = ErrorCodes.NO_ERROR
        self._flush()
        frame = goaway.serialize()
        self.transport.write(frame)
        if self.watch is not None:
            self.buffered += len(frame)
        self._close_if_done()

    # --- h2 events ----------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        if isinstance(event, RequestReceived):
            self._request(event)
        elif isinstance(event, DataReceived):
            self._data(event)
        elif isinstance(event, StreamEnded):
            self.draining.pop(event.stream_id, None)
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._ended(stream)
        elif isinstance(event, TrailersReceived):
            # Request trailers carry nothing the app reads: the body has ended, unless they
            # are malformed; then so is the request, refused on its stream alone.
            stream = self.streams.get(event.stream_id)
            if stream is None:
                pass
            elif _malformed_trailers(event.headers or []) or (
                0 <= stream.declared != stream.received
            ):
                self._malformed(stream)
            elif event.stream_ended is not None:
                self._ended(stream)
        elif isinstance(event, StreamReset):
            self.draining.pop(event.stream_id, None)
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._release_body(stream)
                unanswered = not stream.closed and not stream.response_complete
                stream.closed = True
                self._stop(stream)
                stream.wake()
                if unanswered:
                    self._count_reset()
        elif isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                for stream in self.streams.values():
                    stream.wake()
            elif (stream := self.streams.get(event.stream_id)) is not None:
                stream.wake()
        elif isinstance(event, RemoteSettingsChanged):
            if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                for stream in self.streams.values():
                    stream.wake()
        elif isinstance(event, ConnectionTerminated):
            # The peer is going away; h2 sends nothing after a GOAWAY, so neither can we.
            self._abort()

    def _request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if self.last_stream_id is not None and stream_id > self.last_stream_id:
            self._reset_id(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        request = event.headers or []
        scope, size, length, content_type = self._scope(request)
        if size > MAX_HEADER_LIST_SIZE:
            self._refuse_headers(stream_id, request, event.stream_ended is not None)
            return
        if scope is None or (event.stream_ended is not None and length > 0):
            # Malformed, or of no body but a content-length that says otherwise.
            self._reset_id(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        if length > self.max_body:
            # Said over the limit by its content-length: refused before any of it is read.
            answer = self._body_refusal(request, length, declared=True)
            self._answer_refusal(stream_id, answer, event.stream_ended is not None)
            return
        if len(self.streams) >= MAX_CONCURRENT_STREAMS and self._unanswered() >= (
            MAX_CONCURRENT_STREAMS
        ):
            # The stream over the limit (h2 does not count them: _Settings), or one more
            # while reset streams' tasks still run: a stream error, the others going on.
            self._reset_id(stream_id, ErrorCodes.REFUSED_STREAM)
            self._count_reset()
            return
        self._disarm_idle()
        prefix = b"" if length < 0 and enveloped(content_type) else None
        stream = _Stream(stream_id, request, prefix, length)
        if event.stream_ended is not None:
            stream.ended = True
        else:
            stream.timer = self.loop.call_later(self.request_timeout, self._late, stream)
        self.streams[stream_id] = stream
        if self._lane_takes(stream, scope):
            if stream.ended:
                self._lane_begin(stream)
            return
        task = stream.task = self.loop.create_task(self._run(stream, scope))
        self.server_state.tasks.add(task)
        task.add_done_callback(self.server_state.tasks.discard)
        # Here rather than in _run: a task cancelled before it began runs none of it.
        task.add_done_callback(lambda _: self._finish(stream))

    # --- IssueCoupon's lane -------------------------------------------------------------

    def _lane_takes(self, stream: _Stream, scope: dict[str, Any]) -> bool:
        """IssueCoupon's common request (FastIssue.accepts), not from a browser's page the
        CORS rules would have to answer, is answered here, as the HTTP/1.1 protocol answers
        it: no task, no ASGI messages, the answer written as its outcome settles. The same
        route answers it either way (the app's FastIssue takes the rest that qualify)."""
        fast = self.fast
        if fast is None or self.route is None or scope["path"] != ISSUE_PATH:
            return False
        request_id = b""
        for name, value in stream.request:
            if name == b"origin" and self.cors is not None:
                return False
            if name == b"x-request-id" and not request_id:
                request_id = value.strip(_WHITESPACE)  # the first, as over HTTP/1.1
        codec = fast.accepts(cast(Any, scope))
        if codec is None:
            return False
        stream.lane = codec
        stream.request_id = request_id
        return True

    def _lane_begin(self, stream: _Stream) -> None:
        """The whole request is here: from now on it runs to its answer, whatever the peer
        does (as a task that has read its request would)."""
        route, codec = self.route, stream.lane
        assert route is not None and codec is not None
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        stream.end_delivered = True
        body = self._take_body(stream)
        arrived = time.monotonic()
        answer = route.at_once(body, codec, arrived)
        if isinstance(answer, tuple):
            self._lane_answer(stream, answer)
            return
        pending = route.answer_soon(
            answer, codec, arrived, partial(self._lane_answer, stream), stream.request_id
        )
        if not stream.response_complete and self.streams.get(stream.stream_id) is stream:
            # Until it is answered it stands in the server's tasks, which a graceful
            # shutdown waits for (or cancels).
            stream.pending = pending
            self.server_state.tasks.add(pending)  # type: ignore[arg-type]

    def _lane_answer(self, stream: _Stream, answer: Answer) -> None:
        if stream.pending is not None:
            self.server_state.tasks.discard(stream.pending)
            stream.pending = None
        status, content_type, payload, extra = answer
        stream.response_status = status
        stream.response_headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(payload)).encode()),
            *extra,
        ]
        if stream.closed:
            self._finish(stream)  # the peer left; the coupon (if any) is committed all the same
            return
        try:
            # An answer made at once is written while h2 still hands over the events of the
            # read that ended the request: a RST_STREAM or GOAWAY later in the same read has
            # already closed the stream (or the connection) in h2, before its event is seen.
            window = self.conn.local_flow_control_window(stream.stream_id)
            if (
                self.writable.is_set()
                and len(payload) <= window
                and len(payload) <= self.conn.max_outbound_frame_size
            ):
                self._send_headers(stream, end_stream=False, flush=False)
                self.conn.send_data(stream.stream_id, payload, end_stream=True)
                self.sent_at = stream.sent_at = self.loop.time()
                self._complete(stream)
                self._finish(stream)  # flushes: HEADERS and DATA in one write
                return
        except ProtocolError:  # closed meanwhile: the peer no longer wants the answer
            self._reset(stream, ErrorCodes.CANCEL)
            self._finish(stream)
            return
        # The windows or the transport hold it back: sent as any response is, by a task.
        task = stream.task = self.loop.create_task(self._lane_send(stream, payload))
        self.server_state.tasks.add(task)
        task.add_done_callback(self.server_state.tasks.discard)
        task.add_done_callback(lambda _: self._finish(stream))

    async def _lane_send(self, stream: _Stream, payload: bytes) -> None:
        if stream.closed:
            return
        try:
            self._send_headers(stream, end_stream=False, flush=False)
        except ProtocolError:
            stream.closed = True
            return
        await self._send_data(stream, payload, True)
        self._complete(stream)

    def _unanswered(self) -> int:
        """Streams whose tasks still run the app and have not answered, reset ones
        included."""
        return sum(1 for s in self.streams.values() if not (s.response_complete or s.stopped))

    def _count_reset(self) -> None:
        """One more stream the peer reset before its answer (or had refused): past the
        budget, and outnumbering the answered ones, the connection is closed."""
        self.resets += 1
        if self.resets > RESET_BUDGET and self.resets > self.answered:
            log.warning(
                "HTTP/2 connection from %s closed: %d streams reset before their answers",
                self.client,
                self.resets,
            )
            get_metrics().connection_closes("abuse").inc()
            with contextlib.suppress(ProtocolError):
                self.conn.close_connection(
                    error_code=ErrorCodes.ENHANCE_YOUR_CALM,
                    last_stream_id=self.conn.highest_inbound_stream_id,
                )
            self._flush()
            self._linger()

    def _linger(self) -> None:
        """Close after a GOAWAY while the peer may still be sending: our side ended at once,
        what arrives read and dropped for a moment (LINGER_SECONDS), then the connection
        closed."""
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self._abort()
            return
        self._disarm_idle()
        transport.write_eof()
        self.lingering = 0
        self.loop.call_later(LINGER_SECONDS, transport.close)
        for stream in list(self.streams.values()):
            stream.closed = True
            self._stop(stream)
            stream.wake()

    def _stop(self, stream: _Stream) -> None:
        """Cancel a closed stream's task, unless the app has read the whole request (then
        it may be doing the request's work, which runs to its end, as over HTTP/1.1)."""
        if stream.task is not None and not stream.end_delivered and not stream.stopped:
            stream.stopped = True
            stream.task.cancel()
        elif stream.lane is not None and not stream.end_delivered and not stream.stopped:
            # Taken by the lane, not yet begun: nothing runs for it.
            stream.stopped = True
            self._finish(stream)

    def _late(self, stream: _Stream) -> None:
        """The request time-out: a request not arrived whole is reset, its task stopped."""
        stream.timer = None
        if stream.ended or stream.closed or self.streams.get(stream.stream_id) is not stream:
            return
        log.debug("HTTP/2 stream %d from %s: request time-out", stream.stream_id, self.client)
        self._reset(stream, ErrorCodes.CANCEL)
        self._stop(stream)
        stream.wake()

    def _data(self, event: DataReceived) -> None:
        if self.draining and event.stream_id in self.draining:
            self._drain(event)
            return
        stream = self.streams.get(event.stream_id)
        size = event.flow_controlled_length or 0
        if stream is None or stream.closed or stream.end_delivered:
            # Nobody will read it: give the window straight back.
            self._acknowledge(event.stream_id, size)
            return
        data = event.data or b""
        received = stream.received = stream.received + len(data)
        if stream.declared >= 0 and (
            received > stream.declared
            or (event.stream_ended is not None and received != stream.declared)
        ):
            # Not the body its content-length says: malformed (RFC 9113, 8.1.1).
            self._acknowledge(event.stream_id, size)
            self._malformed(stream)
            return
        if stream.prefix is not None:
            stream.prefix, declared = declared_size(stream.prefix, data)
            received = max(received, declared)
        if received > self.max_body:
            self._acknowledge(event.stream_id, size)
            self._refuse_body(stream, received, event.stream_ended is not None)
            return
        stream.body.append((data, size))
        if event.stream_ended is not None:
            self._ended(stream)
        else:
            stream.wake()

    def _ended(self, stream: _Stream) -> None:
        """The peer has sent the whole request."""
        stream.ended = True
        if stream.lane is not None and not stream.end_delivered and not stream.closed:
            self._lane_begin(stream)
        else:
            stream.wake()

    def _malformed(self, stream: _Stream) -> None:
        """A request found malformed after its headers (its body, its trailers): its stream
        is reset, its task stopped unless it has read the whole request."""
        if not stream.closed and not stream.response_complete:
            self._reset(stream, ErrorCodes.PROTOCOL_ERROR)
            self._stop(stream)
            stream.wake()

    def _refuse_body(self, stream: _Stream, size: int, ended: bool) -> None:
        """A body of no content-length, over the limit by its first message's prefix or by
        what has arrived of it (`size` bytes): answered as one whose content-length is over
        it, unless the app has begun its response; then the stream is reset, with the code
        HTTP/2 clients read as `resource_exhausted`. Either way the app reads no more of it
        (`http.disconnect`) and anything it still sends goes nowhere."""
        if stream.headers_sent:
            self._reset(stream, ErrorCodes.ENHANCE_YOUR_CALM)
        else:
            stream.closed = True
            stream.response_complete = True
            self._release_body(stream)
            answer = self._body_refusal(stream.request, size, declared=False)
            self._answer_refusal(stream.stream_id, answer, ended)
        stream.wake()

    def _body_refusal(self, request: Headers, size: int, *, declared: bool) -> Answer:
        path, content_type = _path_and_content_type(request)
        answer = body_refusal(path, content_type, size, self.max_body, declared=declared)
        return with_cors(answer, path, request, self.cors)

    def _refuse_headers(self, stream_id: int, request: Headers, ended: bool) -> None:
        """Refused on this stream alone, as HTTP/1.1 answers it (in the caller's protocol on
        the API's paths); a body not yet sent need not be (RST_STREAM NO_ERROR after the
        answer, RFC 9113, 8.1)."""
        path, content_type = _path_and_content_type(request)
        answer = refusal(path, content_type, _TOO_LARGE, status=431, plain=_TOO_LARGE)
        self._answer_refusal(stream_id, with_cors(answer, path, request, self.cors), ended)

    def _answer_refusal(self, stream_id: int, answer: Answer, ended: bool) -> None:
        """A refusal's answer, written here rather than by the app; then, unless the peer has
        ended its side, RST_STREAM NO_ERROR: the rest of its body need not be sent."""
        status, media, payload, extra = answer
        headers = [(b":status", str(status).encode()), (b"content-type", media), *extra]
        with contextlib.suppress(ProtocolError, StreamClosedError, FlowControlError):
            if not payload or self.conn.local_flow_control_window(stream_id) < len(payload):
                # A gRPC trailers-only answer (or no room for the body): one HEADERS frame.
                self.conn.send_headers(stream_id, headers, end_stream=True)
            else:
                headers.append((b"content-length", str(len(payload)).encode()))
                self.conn.send_headers(stream_id, headers)
                self.conn.send_data(stream_id, payload, end_stream=True)
            if not ended:
                # The rest of its body is dropped as it comes, for a moment, then the
                # stream is reset (NO_ERROR) if it has not ended.
                self.draining[stream_id] = 0
                self.loop.call_later(DRAIN_SECONDS, self._drained, stream_id)

    def _drain(self, event: DataReceived) -> None:
        stream_id = event.stream_id
        size = event.flow_controlled_length or 0
        self._acknowledge(stream_id, size)
        if event.stream_ended is not None:
            del self.draining[stream_id]
            return
        self.draining[stream_id] += size
        if self.draining[stream_id] > DRAIN_BYTES:
            self._drained(stream_id)

    def _drained(self, stream_id: int) -> None:
        """The peer is still sending a refused request's body: its stream is reset."""
        if self.draining.pop(stream_id, None) is None or self.transport is None:
            return
        self._reset_id(stream_id, ErrorCodes.NO_ERROR)
        self._flush()

    def _scope(self, headers: Headers) -> tuple[dict[str, Any] | None, int, int, bytes]:
        """The request's ASGI scope (None: nothing the app serves, or a malformed request,
        RFC 9113, 8.1.1), the header list's size as SETTINGS_MAX_HEADER_LIST_SIZE counts
        it, its content-length (-1: none) and its content type. Spaces and tabs around a
        value are not part of it (RFC 9110, 5.5): they are dropped, as over HTTP/1.1."""
        method = path = scheme = authority = content_type = b""
        host: bytes | None = None
        regular: Headers = []
        size = 32 * len(headers)
        length = -1
        malformed = False
        for name, field in headers:
            size += len(name) + len(field)
            value = field
            if field and (field[0] in _WHITESPACE or field[-1] in _WHITESPACE):
                value = field.strip(b" \t")
            if _BAD_VALUE.search(value) is not None:
                malformed = True
            if name[:1] != b":":
                regular.append((name, value))
                if not name or _BAD_NAME.search(name) is not None or name in _HOP_BY_HOP:
                    malformed = True
                elif name == b"content-length":
                    # Digits only (RFC 9110, 8.6), not too many; repeated, the same each time.
                    declared = content_length(value)
                    if declared < 0 or 0 <= length != declared:
                        malformed = True
                    else:
                        length = declared
                elif name == b"content-type" and not content_type:
                    content_type = value
                elif name == b"te" and value.lower() != b"trailers":
                    malformed = True
                elif name == b"host":
                    malformed = malformed or host is not None
                    host = value
            elif regular:
                malformed = True  # a pseudo-header after a regular field
            elif name == b":method":
                malformed = malformed or bool(method)
                method = value
            elif name == b":path":
                malformed = malformed or bool(path)
                path = value
            elif name == b":scheme":
                malformed = malformed or bool(scheme)
                scheme = value
            elif name == b":authority":
                malformed = malformed or bool(authority)
                authority = value
            else:
                malformed = True  # :status, :protocol (no CONNECT here), or unknown
        if (
            malformed
            or not method
            or not scheme
            or not path.startswith(b"/")
            or (authority and host is not None and host != authority)
        ):
            return None, size, length, content_type  # CONNECT or malformed: not served
        if authority and host is None:
            regular.insert(0, (b"host", authority))
        raw_path, _, query = path.partition(b"?")
        decoded = raw_path.decode("ascii", "replace")
        if "%" in decoded:
            decoded = unquote(decoded)
        root_path = self.config.root_path
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": self.config.asgi_version, "spec_version": "2.3"},
            "http_version": "2",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": method.decode("ascii", "replace"),
            "root_path": root_path,
            "path": root_path + decoded,
            "raw_path": root_path.encode("ascii") + raw_path,
            "query_string": query,
            "headers": regular,
            "state": self.app_state.copy(),
            "extensions": {"http.response.trailers": {}},
        }
        return scope, size, length, content_type

    # --- one stream's ASGI task ---------------------------------------------------------

    async def _run(self, stream: _Stream, scope: dict[str, Any]) -> None:
        async def receive() -> dict[str, Any]:
            return await self._receive(stream)

        async def send(message: dict[str, Any]) -> None:
            await self._send(stream, message)

        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("Exception in ASGI application")
            if not stream.closed:
                if stream.headers_sent:
                    self._reset_id(stream.stream_id, ErrorCodes.INTERNAL_ERROR)
                else:
                    self.conn.send_headers(
                        stream.stream_id, [(b":status", b"500")], end_stream=True
                    )
                stream.response_complete = True
        finally:
            if not stream.response_complete and not stream.closed:
                # The app returned without finishing its response.
                self._reset(stream, ErrorCodes.INTERNAL_ERROR)

    async def _receive(self, stream: _Stream) -> dict[str, Any]:
        while True:
            if stream.closed:
                return {"type": "http.disconnect"}
            if stream.body:
                body = self._take_body(stream)
                self._flush()
                more = not stream.ended
                stream.end_delivered = not more
                return {"type": "http.request", "body": body, "more_body": more}
            if stream.ended and not stream.end_delivered:
                stream.end_delivered = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if stream.response_complete:
                return {"type": "http.disconnect"}
            stream.changed.clear()
            await stream.changed.wait()

    async def _send(self, stream: _Stream, message: dict[str, Any]) -> None:
        kind = message["type"]
        if stream.closed:
            return  # the peer is gone: the app finishes, nothing more goes out
        if kind == "http.response.start":
            if stream.response_status:
                raise RuntimeError("http.response.start sent twice")
            stream.response_status = int(message["status"])
            stream.response_headers = _outbound(message.get("headers", ()))
            stream.trailers_expected = bool(message.get("trailers", False))
        elif kind == "http.response.body":
            if not stream.response_status or stream.response_complete:
                raise RuntimeError("http.response.body outside a response")
            body: bytes = message.get("body", b"")
            more = bool(message.get("more_body", False))
            end = not more and not stream.trailers_expected
            if not stream.headers_sent and not body and not more and stream.trailers_expected:
                # No message before the status (a gRPC error): the headers wait for the
                # trailers, to go out with them as one HEADERS frame (trailers-only).
                return
            if not stream.headers_sent:
                # A response without a body (a gRPC trailers-only error) is one HEADERS
                # frame that ends the stream. Else the HEADERS go out with the first DATA,
                # in one write (_send_data flushes before it waits, and after it sends).
                self._send_headers(stream, end_stream=end and not body, flush=False)
                if end and not body:
                    self._flush()
                    self._complete(stream)
                    return
            if body or end:
                await self._send_data(stream, body, end)
            if end:
                self._complete(stream)
        elif kind == "http.response.trailers":
            if not stream.trailers_expected or stream.response_complete:
                raise RuntimeError("http.response.trailers without trailers announced")
            last = not message.get("more_trailers", False)
            if not stream.headers_sent and not last:
                self._send_headers(stream, end_stream=False)
            if last:
                trailers = _outbound(message.get("headers", ()))
                while not self.writable.is_set() and not stream.closed:
                    # Bounded by the connection's watch (_watch_writes).
                    await self._wait(stream, None)
                if not stream.closed:
                    if stream.headers_sent:
                        self.conn.send_headers(stream.stream_id, trailers, end_stream=True)
                    else:
                        # No DATA went out: the response is trailers-only, its headers and
                        # trailers one HEADERS frame that ends the stream. gRPC clients
                        # commit a call once they see a response's headers, so a status
                        # sent after separate headers was never retried (gRFC A6). A field
                        # given alike in both (a hint the app put in each) goes once.
                        headers = [(b":status", str(stream.response_status).encode())]
                        headers += stream.response_headers
                        headers += [field for field in trailers if field not in headers]
                        self.conn.send_headers(stream.stream_id, headers, end_stream=True)
                        stream.headers_sent = True
                    self._flush()
                self._complete(stream)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def _send_headers(self, stream: _Stream, end_stream: bool, flush: bool = True) -> None:
        headers = [(b":status", str(stream.response_status).encode()), *stream.response_headers]
        self.conn.send_headers(stream.stream_id, headers, end_stream=end_stream)
        stream.headers_sent = True
        if flush:
            self._flush()

    async def _send_data(self, stream: _Stream, body: bytes, end: bool) -> None:
        """Sends `body` as the windows allow, each wait re-checked on waking (a wake-up
        that comes early, late or twice changes nothing). Abandons the response (the send
        time-out) once the windows have kept its next byte back for the request time-out
        since it last moved."""
        view = memoryview(body)
        stream.sent_at = self.loop.time()
        while True:
            if stream.closed:
                return
            if not self.writable.is_set():
                self._flush()  # what is queued (this response's HEADERS) goes first
                # Bounded by the connection's watch (_watch_writes).
                await self._wait(stream, None)
                continue
            try:
                window = self.conn.local_flow_control_window(stream.stream_id)
            except StreamClosedError:
                return
            if view and window <= 0:
                self._flush()
                since = stream.sent_at
                if self.conn.outbound_flow_control_window <= 0:
                    # The connection's window, shared: stuck only if no stream moves.
                    since = max(since, self.sent_at)
                if not await self._wait(stream, since + self.request_timeout):
                    self._send_timed_out(stream)
                    return
                continue
            size = min(len(view), window, self.conn.max_outbound_frame_size)
            last = size == len(view)
            try:
                self.conn.send_data(
                    stream.stream_id, view[:size].tobytes(), end_stream=end and last
                )
            except (FlowControlError, StreamClosedError):
                return
            self._flush()
            stream.sent_at = self.sent_at = self.loop.time()
            view = view[size:]
            if last:
                return

    async def _wait(self, stream: _Stream, deadline: float | None) -> bool:
        """Until something the stream's task looks at may have changed, or `deadline`
        (loop time) passes; False once it has (found past on two looks, OVERDUE_GRACE
        apart). The caller re-checks what it waits for: the event is only a hint, the
        deadline only a bound."""
        timer = None
        if deadline is not None:
            delay = deadline - self.loop.time()
            if delay > 0:
                stream.overdue = False
            elif stream.overdue:
                return False
            else:
                stream.overdue = True
                delay = OVERDUE_GRACE
            timer = self.loop.call_later(delay, stream.wake)
        # Cleared and waited on at once: no wake-up can fall between the caller's check
        # and the wait (Event.wait registers its waiter before it yields).
        stream.changed.clear()
        try:
            await stream.changed.wait()
        finally:
            if timer is not None:
                timer.cancel()
        return True

    def _send_timed_out(self, stream: _Stream) -> None:
        """The send time-out: the response is abandoned, its stream reset; its task, back
        from its send, finishes without sending more."""
        log.debug("HTTP/2 stream %d from %s: send time-out", stream.stream_id, self.client)
        self._reset(stream, ErrorCodes.CANCEL)
        stream.wake()

    def _watch_period(self) -> float:
        return min(1.0, self.request_timeout / 4)

    def _watch_writes(self) -> None:
        """While the transport is paused: a buffer that shrank is progress; one that has not
        for the request time-out closes the connection."""
        self.watch = None
        transport = self.transport
        if self.writable.is_set() or transport is None or transport.is_closing():
            return
        now = self.loop.time()
        # The transport's buffer and the kernel's send queue: a client that reads steadily
        # but slowly drains the second long before the kernel makes room in the first.
        buffered = unsent_bytes(transport)
        if buffered < self.buffered:
            self.sent_at = now
        self.buffered = buffered
        if now - self.sent_at < self.request_timeout:
            self.overdue = False
            self.watch = self.loop.call_later(self._watch_period(), self._watch_writes)
            return
        if not self.overdue:
            self.overdue = True
            self.watch = self.loop.call_later(OVERDUE_GRACE, self._watch_writes)
            return
        log.debug("HTTP/2 connection from %s: nothing written to it in time", self.client)
        get_metrics().connection_closes("stalled").inc()
        self._disarm_idle()
        with contextlib.suppress(ProtocolError):
            self.conn.close_connection(
                error_code=ErrorCodes.ENHANCE_YOUR_CALM,
                last_stream_id=self.conn.highest_inbound_stream_id,
            )
        self._flush()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Reset rather than closed: a close would leave the kernel holding the unsent
            # bytes (and the peer its connection) until they drain, which they never do.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        for stream in list(self.streams.values()):
            stream.closed = True
            self._stop(stream)
            stream.wake()

    def _unwatch(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None

    def _complete(self, stream: _Stream) -> None:
        if not stream.response_complete and not stream.closed:
            self.answered += 1
        stream.response_complete = True
        if not stream.ended:
            # Answered before the request ended (an early refusal): the peer may stop
            # sending the rest (RFC 9113, 8.1).
            self._reset(stream, ErrorCodes.NO_ERROR)
        stream.wake()

    def _finish(self, stream: _Stream) -> None:
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        self._release_body(stream)
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self._flush()
        if not self.streams:
            self._arm_idle()
        self._close_if_done()

    # --- helpers ------------------------------------------------------------------------

    def _reset(self, stream: _Stream, code: ErrorCodes) -> None:
        stream.closed = True
        self._reset_id(stream.stream_id, code)
        self._release_body(stream)
        self._flush()

    def _reset_id(self, stream_id: int, code: ErrorCodes) -> None:
        """RST_STREAM, unless the stream is closed already: h2 reads a whole read's frames
        before its events are seen, so the peer's own RST_STREAM (or GOAWAY) later in the
        same read has closed it in h2 by then. Nothing is left to say on it either way."""
        with contextlib.suppress(ProtocolError, StreamClosedError):
            self.conn.reset_stream(stream_id, code)

    def _take_body(self, stream: _Stream) -> bytes:
        """The request body that has arrived and not been read, read now: its window goes
        back to the peer (sent with the next flush)."""
        chunks = list(stream.body)
        stream.body.clear()
        self._acknowledge(stream.stream_id, sum(size for _, size in chunks))
        return chunks[0][0] if len(chunks) == 1 else b"".join(c for c, _ in chunks)

    def _release_body(self, stream: _Stream) -> None:
        """Unread body of a stream nobody will read: its bytes free the connection window."""
        if stream.body:
            self._acknowledge(stream.stream_id, sum(size for _, size in stream.body))
            stream.body.clear()

    def _acknowledge(self, stream_id: int, size: int) -> None:
        if size:
            # A closed connection has no window to give back.
            with contextlib.suppress(ProtocolError):
                self.conn.acknowledge_received_data(size, stream_id)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if (
            data
            and self.transport is not None
            and not self.transport.is_closing()
            and self.lingering < 0
        ):
            self.transport.write(data)
            if self.watch is not None:
                self.buffered += len(data)  # so that only a drain counts as progress

    def _close_if_done(self) -> None:
        if (
            self.last_stream_id is not None
            and not self.streams
            and self.transport is not None
            and self.lingering < 0
        ):
            self.conn.close_connection(last_stream_id=self.last_stream_id)
            self._flush()
            self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.close()
        for stream in list(self.streams.values()):
            stream.closed = True
            self._stop(stream)
            stream.wake()

    def _arm_idle(self) -> None:
        self._disarm_idle()
        if self.transport is not None and not self.transport.is_closing() and self.lingering < 0:
            self.idle = self.loop.call_later(self.config.timeout_keep_alive, self._idle_close)

    def _disarm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None

    def idle_since(self) -> float:
        """The loop time its last stream ended (or it began) while no stream is open and it
        is not closing; 0 otherwise. Such a connection may be closed with a GOAWAY at any
        time: the peer learns that no stream of its was taken."""
        idle = self.idle
        if idle is None or self.streams or self.last_stream_id is not None or self.backlog:
            return 0.0
        return idle.when() - self.config.timeout_keep_alive

    def _idle_close(self) -> None:
        """No stream for a while: say goodbye properly, so the client reconnects quietly."""
        self.idle = None
        if not self.streams:
            self.shutdown()


def _path_and_content_type(request: Headers) -> tuple[bytes, bytes]:
    path = content_type = b""
    for name, value in request:
        if name == b":path":
            path = value.strip(b" \t")
        elif name == b"content-type" and not content_type:
            content_type = value.strip(b" \t")
    return path, content_type


def _outbound(headers: Any) -> Headers:
    """An app's header list as HTTP/2 sends it (h2's own normalising is off): names in lower
    case, no connection-specific field, no space or tab around a value (RFC 9113, 8.2.1 makes
    such a field malformed; a value the app built from the request, as an unknown method's
    path, may end in one)."""
    return [
        (lowered, value.strip(_WHITESPACE))
        for name, value in headers
        if (lowered := name.lower()) not in _HOP_BY_HOP
    ]


def _malformed_trailers(trailers: Headers) -> bool:
    """A trailer section that makes its request malformed (RFC 9113, 8.1 and 8.2): a
    pseudo-header, or a field h2's own checks would have refused in a header list."""
    for name, value in trailers:
        if (
            not name
            or name[:1] == b":"
            or _BAD_NAME.search(name) is not None
            or name in _HOP_BY_HOP
            or _BAD_VALUE.search(value) is not None
            or (name == b"te" and value.strip(b" \t").lower() != b"trailers")
        ):
            return True
    return False


def _address(value: object) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return None
