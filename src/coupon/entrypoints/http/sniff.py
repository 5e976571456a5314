"""One port for HTTP/1.1 and HTTP/2: the protocol class uvicorn runs for each connection.

uvicorn stays the HTTP/1.1 server (its httptools protocol is the hot path of Connect over
HTTP/1.1); this class looks at a connection once, before its first request, and hands it
to HTTP/1.1 or to HTTP/2 (`h2.py`, for gRPC and any HTTP/2 client). Over TLS, ALPN has
already decided; in cleartext, an HTTP/2 client with prior knowledge (h2c) starts with the
connection preface, and nothing that HTTP/1.1 sends does.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, cast

from uvicorn.config import Config
from uvicorn.server import ServerState

from coupon.entrypoints.http.budget import ConnectionBudget
from coupon.entrypoints.http.h1 import Http1Protocol, front_app, limits_of, unread_bytes
from coupon.entrypoints.http.h2 import H2Protocol

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# The HTTP/1.1 protocol class, constructed like uvicorn's own (config, server_state,
# app_state, _loop): uvicorn's httptools protocol with limits and IssueCoupon's lane.
HTTP1_PROTOCOL: type[asyncio.Protocol] = Http1Protocol


class AutoProtocol(asyncio.Protocol):
    """Decides HTTP/1.1 or HTTP/2 for one connection, then steps aside: after the first
    bytes the chosen protocol owns the transport, so requests never pass through here."""

    # uvicorn offers these through ALPN when it builds the TLS context.
    alpn_protocols: ClassVar[list[str]] = ["h2", "http/1.1"]
    # The worker's connection budget, found once (one server per worker process).
    budget: ClassVar[ConnectionBudget | None] = None

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
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.idle: asyncio.TimerHandle | None = None
        # Shut down with a request's first bytes here or arrived: the protocol chosen for
        # them answers that request, then closes.
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        # Every connection starts here: past the worker's budget, idle ones make room for
        # it, or it is closed at once (budget.py). One comparison otherwise.
        budget = self.budget
        if budget is None or budget.state is not self.server_state:
            budget = AutoProtocol.budget = ConnectionBudget(self.server_state)
        if len(self.server_state.connections) >= budget.size and not budget.make_room(self.loop):
            transport.close()
            return
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            alpn = ssl_object.selected_alpn_protocol()
            if alpn is not None:
                self._switch(H2Protocol if alpn == "h2" else HTTP1_PROTOCOL, b"")
                return
        # Until the first bytes arrive the connection is ours: graceful shutdown closes it.
        # A connection that has sent nothing is idle, as one between requests is: a client's
        # pool may open it long before its first request, so it is closed cleanly (no
        # answer that the client would read as its next request's) after the keep-alive
        # time. Once its first byte is here, its request must arrive whole in time (408).
        self.server_state.connections.add(self)  # type: ignore[arg-type]
        self.idle = self.loop.call_later(self.config.timeout_keep_alive, self._idle_close)

    def silent_since(self) -> float:
        """The loop time it was made, while it has sent nothing and is not closing (then
        it may be closed with nothing written); 0 otherwise."""
        idle = self.idle
        if idle is None or self.buffer or self.closing:
            return 0.0
        return idle.when() - self.config.timeout_keep_alive

    def close_idle(self) -> None:
        self._idle_close()

    def _idle_close(self) -> None:
        self.idle = None
        self._release()
        if self.transport is not None:
            self.transport.close()

    def _late(self) -> None:
        self.idle = None
        self._release()
        protocol = self._switch(HTTP1_PROTOCOL, b"")
        if isinstance(protocol, Http1Protocol):
            protocol.timed_out()
        elif self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        first = not self.buffer
        self.buffer += data
        if len(self.buffer) < len(PREFACE) and PREFACE.startswith(self.buffer):
            # A prefix of the preface (or of "POST", "PUT", "PATCH"): wait, now for the
            # rest of a request begun.
            if first and self.idle is not None:
                self.idle.cancel()
                limits = limits_of(front_app(self.config.loaded_app))
                self.idle = self.loop.call_later(limits.request_timeout_seconds, self._late)
            return
        self._release()
        http2 = self.buffer.startswith(PREFACE)
        self._switch(H2Protocol if http2 else HTTP1_PROTOCOL, self.buffer)

    def eof_received(self) -> bool | None:
        # The peer stopped sending mid-preface: HTTP/1.1 answers what it can of the bytes.
        if self.buffer and self.transport is not None:
            self._release()
            protocol = self._switch(HTTP1_PROTOCOL, self.buffer)
            return protocol.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()

    def shutdown(self) -> None:
        """An idle connection is closed; one whose first bytes have arrived (read, or still
        in the kernel) is handed over as they come, and its request answered, then closed."""
        transport = self.transport
        if transport is None:
            return
        if not self.buffer and not unread_bytes(transport):
            transport.close()
            return
        self.closing = True
        if not self.buffer:
            # Bounded as a request begun: the rest must come within the request time-out.
            if self.idle is not None:
                self.idle.cancel()
            limits = limits_of(front_app(self.config.loaded_app))
            self.idle = self.loop.call_later(limits.request_timeout_seconds, self._late)

    def _release(self) -> None:
        self.server_state.connections.discard(self)
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None

    def _switch(self, protocol_class: type[asyncio.Protocol], replay: bytes) -> asyncio.Protocol:
        assert self.transport is not None
        protocol = protocol_class(  # type: ignore[call-arg]
            config=self.config,
            server_state=self.server_state,
            app_state=self.app_state,
            _loop=self.loop,
        )
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if self.closing and isinstance(protocol, Http1Protocol):
            protocol.close_after_next()
        if replay:
            protocol.data_received(replay)
        self.buffer = b""
        if self.closing and isinstance(protocol, H2Protocol):
            protocol.shutdown()  # a GOAWAY: the streams already opened are answered
        return protocol
