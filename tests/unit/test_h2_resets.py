"""What a peer's RST_STREAM does to the stream's task, where a real server cannot be made
to show it: a handler that has read its whole request runs to its end (as over HTTP/1.1:
an IssueCoupon past admission keeps its guarantees), one still waiting for its request is
cancelled, and handlers left running by resets are bounded per connection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import Event, StreamReset
from uvicorn.config import Config
from uvicorn.server import ServerState

from coupon.entrypoints.http import h2 as h2_module
from coupon.entrypoints.http.h2 import MAX_CONCURRENT_STREAMS, H2Protocol

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"localhost"),
    (b":path", b"/coupon.v1.CouponService/IssueCoupon"),
    (b"content-type", b"application/grpc"),
]


class Transport:
    """Enough of an asyncio transport for the protocol: what it writes is kept."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name)

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


class Handler:
    """Reads the whole request, then works until `release` (as an IssueCoupon past
    admission waits on the ledger), then answers."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.admitted: list[int] = []
        self.finished: list[int] = []
        self.cancelled: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        number = int(dict(scope["headers"]).get(b"x-n", b"0"))
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                if not message.get("more_body", False):
                    break
            self.admitted.append(number)
            await self.release.wait()
            self.finished.append(number)
        except asyncio.CancelledError:
            self.cancelled.append(number)
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


class Peer:
    def __init__(self, handler: Handler) -> None:
        config = Config(app=handler, lifespan="off", log_config=None)
        config.load()
        self.protocol = H2Protocol(config, ServerState(), {}, asyncio.get_running_loop())
        self.transport = Transport()
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.events: list[Event] = []
        self.exchange()

    def exchange(self) -> None:
        self.protocol.data_received(self.client.data_to_send())
        self.events += self.client.receive_data(bytes(self.transport.written))
        self.transport.written.clear()
        self.protocol.data_received(self.client.data_to_send())

    def start(self, number: int, *, whole: bool = True) -> int:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, [*REQUEST, (b"x-n", str(number).encode())])
        self.client.send_data(stream_id, b"\x00" * 5, end_stream=whole)
        return stream_id

    def resets(self) -> dict[int, int]:
        return {e.stream_id: e.error_code for e in self.events if isinstance(e, StreamReset)}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_reset_cancels_a_handler_only_before_it_has_the_whole_request() -> None:
    handler = Handler()
    peer = Peer(handler)
    whole = peer.start(1)
    partial = peer.start(2, whole=False)
    peer.exchange()
    await settle()
    assert handler.admitted == [1]  # 2 waits for the rest of its body
    peer.client.reset_stream(whole)
    peer.client.reset_stream(partial)
    peer.exchange()
    await settle()
    assert handler.cancelled == [2]
    assert set(peer.protocol.streams) == {whole}  # still at work, not cancelled
    handler.release.set()
    await settle()
    assert handler.finished == [1]
    assert not peer.protocol.streams
    peer.protocol.connection_lost(None)


async def test_handlers_left_running_by_resets_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As many as MAX_CONCURRENT_STREAMS, reset ones included: a stream beyond is refused
    (REFUSED_STREAM) and reaches no handler; once they finish, streams are served again.
    (The reset budget, which would close the connection first, is set aside here.)"""
    monkeypatch.setattr(h2_module, "RESET_BUDGET", 10_000)
    handler = Handler()
    peer = Peer(handler)
    streams = [peer.start(n) for n in range(MAX_CONCURRENT_STREAMS)]
    peer.exchange()
    await settle()
    assert len(handler.admitted) == MAX_CONCURRENT_STREAMS
    for stream_id in streams:
        peer.client.reset_stream(stream_id)
    refused = peer.start(1000)
    peer.exchange()
    await settle()
    assert peer.resets() == {refused: ErrorCodes.REFUSED_STREAM}
    assert 1000 not in handler.admitted
    assert not handler.cancelled and not peer.transport.closed

    handler.release.set()
    await settle()
    assert not peer.protocol.streams
    served = peer.start(1001)
    peer.exchange()
    await settle()
    assert handler.admitted[-1] == 1001
    assert served in peer.protocol.streams or handler.finished[-1] == 1001
    peer.protocol.connection_lost(None)
