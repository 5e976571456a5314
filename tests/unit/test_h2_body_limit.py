"""The HTTP/2 protocol's body limit where a real server cannot be made to show it: an app
that has begun its response when the body it is reading passes the limit."""

from __future__ import annotations

import asyncio
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ResponseReceived, StreamReset
from uvicorn.config import Config
from uvicorn.server import ServerState

from coupon.entrypoints.http.h2 import H2Protocol

FRAME = 16 * 1024
MAX_BODY = 64 * 1024


class Transport:
    """Enough of an asyncio transport for the protocol: what it writes is kept."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def answers_then_reads(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Starts its response (headers and a first message), then reads the body to its end."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/grpc")],
            "trailers": True,
        }
    )
    await send({"type": "http.response.body", "body": b"\x00\x00\x00\x00\x00", "more_body": True})
    while (await receive())["type"] == "http.request":
        pass


async def test_a_body_passing_the_limit_after_the_response_began_resets_the_stream() -> None:
    """Too late for an answer: RST_STREAM ENHANCE_YOUR_CALM (gRPC and Connect clients read
    it as `resource_exhausted`); the app reads no more of the body (a disconnect)."""
    config = Config(app=answers_then_reads, lifespan="off", log_config=None)
    config.load()
    protocol = H2Protocol(config, ServerState(), {}, asyncio.get_running_loop())
    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    protocol.data_received(client.data_to_send())
    client.receive_data(bytes(transport.written))
    transport.written.clear()
    stream_id = client.get_next_available_stream_id()
    client.send_headers(
        stream_id,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"localhost"),
            (b":path", b"/coupon.v1.CouponService/IssueCoupon"),
            (b"content-type", b"application/grpc"),
        ],
    )
    client.send_data(stream_id, b"\x00" * 5)  # a prefix declaring an empty message
    protocol.data_received(client.data_to_send())
    events: list[object] = []
    sent = 5
    while not any(isinstance(e, StreamReset) for e in events):
        # The body passing the limit a frame at a time, the window coming back as the app
        # reads it.
        assert sent < 2 * MAX_BODY, "never reset"
        client.send_data(stream_id, b"\x00" * FRAME)
        sent += FRAME
        protocol.data_received(client.data_to_send())
        await asyncio.sleep(0.01)
        events += client.receive_data(bytes(transport.written))
        transport.written.clear()
    assert any(isinstance(e, ResponseReceived) for e in events)
    assert sent == 5 + 4 * FRAME  # the frame that passed the limit
    [reset] = [e for e in events if isinstance(e, StreamReset)]
    assert (reset.stream_id, reset.error_code) == (stream_id, ErrorCodes.ENHANCE_YOUR_CALM)
    assert not protocol.streams  # the app saw the disconnect and returned
    protocol.connection_lost(None)
