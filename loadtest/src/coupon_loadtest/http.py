"""A lean HTTP/1.1 client for the hot loop: keep-alive connections, one request at a time
on each, responses parsed straight from the socket's bytes, answers delivered by callback.

A general-purpose client spends most of a small request's CPU on what a load generator
does not need (header objects, redirects, cookies, a task, a future and a timer per
request). This one writes prebuilt bytes, reads back the status, the body and the one
header the tool acts on (`retry-after-ms`), and calls the caller back; time-outs are found
by one sweep over the busy connections, not a timer each. A request submitted while all
`connections` are busy waits in line for the first one free (that wait is the caller's to
count: the tools measure from the intended send time), and is dropped unsent if its
deadline passes first.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    retry_after_ms: int | None = None  # the server's retry hint, when it gave one


class ProtocolError(Exception):
    """A response this client cannot read (no Content-Length, malformed status line)."""


class GaveUp(Exception):
    """The request's deadline passed while it waited for a connection; nothing was sent."""


# Called once per request with the reply (or the exception that ended it) and when it was
# written to the socket (time.monotonic_ns(); 0 when it never was).
Callback = Callable[[Reply | BaseException, int], None]

_SWEEP_S = 0.05
# Requests in line past their deadline are dropped when their turn comes; a slower sweep
# also drops them while no connection frees up at all.
_LINE_SWEEP_NS = 1_000_000_000


class _Connection(asyncio.Protocol):
    def __init__(self, pool: HttpPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.callback: Callback | None = None
        self.sent_ns = 0
        self._buffer = bytearray()
        self._head_end = -1
        self._need = -1
        self._status = 0
        self._retry: int | None = None
        self._close = False
        self._chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._pool.connected(self)

    def send(self, data: bytes, callback: Callback) -> None:
        assert self.transport is not None
        self.callback = callback
        self.sent_ns = time.monotonic_ns()
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._need < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            raw = bytes(buffer[:end])
            # Answers repeat their heads (the date changes once a second): each is read once.
            known = _HEADS.get(raw)
            if known is None:
                try:
                    known = _parse_head(raw.lower())
                except (ValueError, ProtocolError) as exc:
                    self.fail(ProtocolError(f"unreadable response: {exc}"))
                    return
                if len(raw) <= _HEAD_BYTES_MAX:
                    if len(_HEADS) >= _HEADS_MAX:
                        _HEADS.clear()
                    _HEADS[raw] = known
            self._status, self._retry, self._close, self._chunked, length = known
            self._head_end = end + 4
            self._need = self._head_end + length
        if self._chunked:
            try:
                found = _dechunk(buffer, self._head_end)
            except ValueError as exc:
                self.fail(ProtocolError(f"unreadable chunked body: {exc}"))
                return
            if found is None:
                return
            body, self._need = found
        elif len(buffer) < self._need:
            return
        else:
            body = bytes(buffer[self._head_end : self._need])
        reply = Reply(self._status, body, self._retry)
        del buffer[: self._need]
        self._need = -1
        callback, self.callback = self.callback, None
        sent_ns = self.sent_ns  # before the next request in line goes out on this connection
        if self._close:
            self._pool.forget(self)
            if self.transport is not None:
                self.transport.close()
        else:
            self._pool.release(self)
        if callback is not None:
            callback(reply, sent_ns)

    def fail(self, exc: BaseException) -> None:
        """End the request in flight with `exc` and drop the connection."""
        callback, self.callback = self.callback, None
        if self.transport is not None:
            self.transport.abort()
        if callback is not None:
            callback(exc, self.sent_ns)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._pool.forget(self)
        callback, self.callback = self.callback, None
        if callback is not None:
            reason = exc or "closed by the server"
            callback(ConnectionError(f"connection lost: {reason}"), self.sent_ns)


# status, retry hint, whether the server closes, whether the body is chunked, its length
Head = tuple[int, int | None, bool, bool, int]
_HEADS: dict[bytes, Head] = {}
_HEADS_MAX = 64
_HEAD_BYTES_MAX = 1024


def _parse_head(head: bytes) -> Head:
    """A response's head, lower-cased, without the blank line; the length is 0 for a
    chunked body, whose end the chunks tell."""
    if not head.startswith(b"http/1.") or len(head) < 12:
        raise ProtocolError(repr(head[:40]))
    status = int(head[9:12])
    retry = _header_int(head, b"\r\nretry-after-ms:", -1)
    close = b"\r\nconnection: close" in head
    # The service's hot path always sends a length; the generic Connect application
    # (errors, other RPCs) streams its answers in chunks.
    chunked = b"\r\ntransfer-encoding: chunked" in head
    length = 0 if chunked else _header_int(head, b"\r\ncontent-length:", None)
    return status, retry if retry >= 0 else None, close, chunked, length


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked body that starts at `start`: its bytes and where the response ends, or
    None while it is incomplete."""
    body = bytearray()
    at = start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(bytes(buffer[at:line_end]).split(b";", 1)[0].strip(), 16)
        at = line_end + 2
        if size == 0:
            if buffer[at : at + 2] == b"\r\n":
                return bytes(body), at + 2
            trailers_end = buffer.find(b"\r\n\r\n", at)
            return None if trailers_end < 0 else (bytes(body), trailers_end + 4)
        if len(buffer) < at + size + 2:
            return None
        body += buffer[at : at + size]
        at += size + 2


def _header_int(head: bytes, name: bytes, default: int | None) -> int:
    at = head.find(name)
    if at < 0:
        if default is None:
            raise ProtocolError(f"no {name[2:-1].decode()} header")
        return default
    start = at + len(name)
    end = head.find(b"\r\n", start)
    return int(head[start : end if end >= 0 else len(head)].strip())


class HttpPool:
    """POSTs to one origin over at most `connections` keep-alive connections."""

    def __init__(
        self,
        url: str,
        *,
        connections: int,
        timeout_s: float,
        headers: dict[str, str] | None = None,
        ca_file: str | None = None,
    ) -> None:
        """`ca_file`: the PEM file of the CAs to trust over https:// instead of the
        system's."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        https = parts.scheme == "https"
        self._ssl = ssl.create_default_context(cafile=ca_file) if https else None
        self._prefix = parts.path.rstrip("/")
        self._cap = connections
        self._timeout_ns = round(timeout_s * 1e9)
        host = parts.netloc.rpartition("@")[2]
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head_tail = f" HTTP/1.1\r\nhost: {host}\r\n{extra}content-length: ".encode()
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._opening = 0
        # Requests waiting for a connection: (bytes, callback, deadline in monotonic ns).
        self._waiting: deque[tuple[bytes, Callback, int | None]] = deque()
        self.waits = 0  # requests that found every connection busy
        self._closed = False
        self._sweeper: asyncio.Task[None] | None = None

    def request_head(self, path: str) -> bytes:
        """The bytes before a body's length, for `submit` and `post`."""
        return b"POST " + (self._prefix + path).encode() + self._head_tail

    def submit(
        self, head: bytes, body: bytes, callback: Callback, *, deadline_ns: int | None = None
    ) -> None:
        """Send `head` (from `request_head`) and `body` on a free connection, or when one
        frees up; `callback` gets the reply, or TimeoutError (no answer within the
        time-out), ConnectionError or ProtocolError (the connection failed), or GaveUp
        (still waiting at `deadline_ns`, monotonic; never sent)."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        data = b"".join((head, str(len(body)).encode(), b"\r\n\r\n", body))
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                conn.send(data, callback)
                return
        self.waits += 1
        self._waiting.append((data, callback, deadline_ns))
        self._open_if_room()

    async def post(self, head: bytes, body: bytes) -> Reply:
        """`submit`, awaited: the reply, or the exception it ended with."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

        def done(result: Reply | BaseException, _: int) -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        self.submit(head, body, done)
        return await future

    def _open_if_room(self) -> None:
        if self._closed or not self._waiting or len(self._open) + self._opening >= self._cap:
            return
        self._opening += 1
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: _Connection(self),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
            )
        except OSError as exc:
            self._opening -= 1
            # The request first in line takes the failure: a real client's press would fail
            # the same way when the server refuses connections.
            if self._waiting:
                _, callback, _ = self._waiting.popleft()
                callback(ConnectionError(f"cannot connect: {exc}"), 0)
            self._open_if_room()

    def connected(self, conn: _Connection) -> None:
        self._opening -= 1
        self._open.add(conn)
        self.release(conn)

    def release(self, conn: _Connection) -> None:
        """A connection is free: the next request in line goes out on it."""
        if self._closed or conn.transport is None:
            return
        now = time.monotonic_ns()
        while self._waiting:
            data, callback, deadline = self._waiting.popleft()
            if deadline is not None and now > deadline:
                callback(GaveUp(), 0)
                continue
            conn.send(data, callback)
            return
        self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        self._open_if_room()

    async def _sweep(self) -> None:
        """Time-outs of requests in flight, and deadlines of requests in line."""
        line_swept = time.monotonic_ns()
        while not self._closed:
            await asyncio.sleep(_SWEEP_S)
            now = time.monotonic_ns()
            for conn in list(self._open):
                if conn.callback is not None and now - conn.sent_ns > self._timeout_ns:
                    conn.fail(TimeoutError("no answer in time"))
            if now - line_swept < _LINE_SWEEP_NS:
                continue
            line_swept = now
            if any(d is not None and now > d for _, _, d in self._waiting):
                keep: deque[tuple[bytes, Callback, int | None]] = deque()
                for item in self._waiting:
                    if item[2] is not None and now > item[2]:
                        item[1](GaveUp(), 0)
                    else:
                        keep.append(item)
                self._waiting = keep

    def drop_waiting(self, exc: BaseException) -> None:
        """End every request still in line with `exc`, unsent."""
        while self._waiting:
            _, callback, _ = self._waiting.popleft()
            callback(exc, 0)

    @property
    def in_flight(self) -> int:
        return sum(1 for conn in self._open if conn.callback is not None)

    async def aclose(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._open):
            if conn.transport is not None:
                conn.transport.close()
        self._open.clear()
        self._idle.clear()
        while self._waiting:
            _, callback, _ = self._waiting.popleft()
            callback(ConnectionError("client closed"), 0)
