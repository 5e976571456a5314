"""A gRPC client at the frame level, on the `h2` library (client side), for the HTTP/2
cases a stock client never shows: small windows, resets, GOAWAY, many streams at once."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from connectrpc.codec import proto_binary_codec
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from hyperframe.frame import DataFrame, Frame, HeadersFrame

T = TypeVar("T")
CODEC = proto_binary_codec()
SERVICE = "/coupon.v1.CouponService/"


def grpc_frame(message: object) -> bytes:
    payload = CODEC.encode(message)
    return struct.pack(">?I", False, len(payload)) + payload


def grpc_message(body: bytes, kind: type[T]) -> T:
    compressed, length = struct.unpack(">?I", body[:5])
    assert not compressed and len(body) == 5 + length, "one uncompressed message"
    return CODEC.decode(body[5:], kind)


@dataclass
class Response:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code

    @property
    def grpc_status(self) -> bytes | None:
        """From the trailers, or from the headers of a trailers-only response."""
        return self.trailers.get(b"grpc-status", self.headers.get(b"grpc-status"))


def grpc_headers(rpc: str, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """A gRPC request's header list for `rpc`, then `extra`."""
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"localhost"),
        (b":path", (SERVICE + rpc).encode()),
        (b"content-type", b"application/grpc+proto"),
        *extra,
    ]


class H2Client:
    def __init__(
        self,
        port: int,
        *,
        window: int = 65_535,
        tls: ssl.SSLContext | None = None,
        auto_acknowledge: bool = True,
        dribble: int = 0,
    ) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock: socket.socket = (
            tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        )
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        # h2 refuses a server that sends past this window: the test of its flow control.
        self.conn.local_settings = Settings(
            client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.conn.initiate_connection()
        self.auto_acknowledge = auto_acknowledge
        self.responses: dict[int, Response] = {}
        self.goaway: ConnectionTerminated | None = None
        if dribble:
            # The preface in pieces, each its own segment: the server must wait for all.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = self.conn.data_to_send()
            for i in range(0, len(data), dribble):
                self.sock.sendall(data[i : i + dribble])
                time.sleep(0.02)
        self.flush()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def start(self, rpc: str, body: bytes = b"", *, end: bool = True) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, grpc_headers(rpc, (b"te", b"trailers")))
        self.responses[stream_id] = Response()
        if body or end:
            self.conn.send_data(stream_id, body, end_stream=end)
        self.flush()
        return stream_id

    def request(self, path: bytes, content_type: bytes, body: bytes) -> int:
        """A whole POST to `path` of `content_type` (any bytes: the case under test), as
        gRPC sends it (te: trailers)."""
        stream_id = self.conn.get_next_available_stream_id()
        self.responses[stream_id] = Response()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"localhost"),
            (b":path", path),
            (b"content-type", content_type),
            (b"te", b"trailers"),
        ]
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, body, end_stream=True)
        self.flush()
        return stream_id

    def send(self, stream_id: int, body: bytes, *, end: bool = True) -> None:
        self.conn.send_data(stream_id, body, end_stream=end)
        self.flush()

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id)
        self.flush()

    def acknowledge(self, stream_id: int, size: int) -> None:
        self.conn.acknowledge_received_data(size, stream_id)
        self.flush()

    def read(self) -> list[Event]:
        data = self.sock.recv(65_536)
        if not data:
            raise ConnectionError("the server closed the connection")
        events = self.conn.receive_data(data)
        for event in events:
            self._record(event)
        self.flush()
        return events

    def _record(self, event: Event) -> None:
        if isinstance(event, ConnectionTerminated):
            self.goaway = event
            return
        stream_id = getattr(event, "stream_id", 0)
        response = self.responses.get(stream_id)
        if response is None:
            return
        if isinstance(event, ResponseReceived):
            response.headers = dict(event.headers or [])
        elif isinstance(event, DataReceived):
            response.body += event.data or b""
            if self.auto_acknowledge and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        elif isinstance(event, TrailersReceived):
            response.trailers = dict(event.headers or [])
        elif isinstance(event, StreamEnded):
            response.ended = True
        elif isinstance(event, StreamReset):
            response.reset = event.error_code

    def wait(self, *stream_ids: int) -> list[Response]:
        """Read until every given stream has ended or been reset."""
        while not all(
            self.responses[s].ended or self.responses[s].reset is not None for s in stream_ids
        ):
            self.read()
        return [self.responses[s] for s in stream_ids]

    def raw_frames(self) -> Iterator[Frame]:
        """Frames as they arrive, past h2's state machine: after a GOAWAY, h2 (client side)
        refuses to send or read anything more, though a server still answers the streams
        the GOAWAY kept. Header blocks go through h2's HPACK decoder, in order."""
        frames = FrameBuffer(server=False)
        frames.max_frame_size = self.conn.max_inbound_frame_size
        while True:
            data = self.sock.recv(65_536)
            if not data:
                return
            frames.add_data(data)
            yield from frames

    def raw_data(self, stream_id: int, body: bytes, *, end: bool = True) -> None:
        frame = DataFrame(stream_id, body)
        if end:
            frame.flags.add("END_STREAM")
        self.sock.sendall(frame.serialize())

    def raw_headers(self, stream_id: int, rpc: str) -> None:
        self.sock.sendall(headers_frame(self, stream_id, rpc).serialize())

    def decode(self, frame: HeadersFrame) -> dict[bytes, bytes]:
        return {bytes(k): bytes(v) for k, v in self.conn.decoder.decode(frame.data, raw=True)}

    def call(self, rpc: str, request: object, kind: type[T]) -> T:
        [response] = self.wait(self.start(rpc, grpc_frame(request)))
        assert response.grpc_status == b"0", response
        return grpc_message(response.body, kind)


def headers_frame(client: H2Client, stream_id: int, rpc: str) -> HeadersFrame:
    """A request's HEADERS frame (END_HEADERS, not END_STREAM), encoded by the client's
    HPACK encoder, for sending past h2's state machine."""
    block = client.conn.encoder.encode(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"localhost"),
            (b":path", (SERVICE + rpc).encode()),
            (b"content-type", b"application/grpc+proto"),
            (b"te", b"trailers"),
        ]
    )
    frame = HeadersFrame(stream_id, block)
    frame.flags.add("END_HEADERS")
    return frame
