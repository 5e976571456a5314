"""The load tool's HTTP/1.1 client against a real socket server of the test's own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from coupon_loadtest.http import GaveUp, HttpPool, Reply

# One answer per request: status line and headers (without Content-Length), body.
Answer = Callable[[bytes], Awaitable[tuple[bytes, bytes] | None]]


class Server:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                self.requests.append(body)
                answer = await self.answer(body)
                if answer is None:  # hang up without answering
                    writer.close()
                    return
                start, payload = answer
                if b"transfer-encoding" in start.lower():
                    # Chunked: the head, then the body's pieces, each on its own write.
                    writer.write(start + b"\r\n")
                    for piece in payload.split(b"|"):
                        await writer.drain()
                        writer.write(piece)
                else:
                    writer.write(start + b"content-length: %d\r\n\r\n" % len(payload) + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(answer: Answer) -> AsyncIterator[Server]:
    server = Server(answer)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


def pool_for(server: Server, *, connections: int = 4, timeout_s: float = 5.0) -> HttpPool:
    return HttpPool(f"http://127.0.0.1:{server.port}", connections=connections, timeout_s=timeout_s)


async def ok(_: bytes) -> tuple[bytes, bytes]:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/proto\r\n", b"coupon"


async def test_replies_come_back_with_status_body_and_retry_hint() -> None:
    async def shed(body: bytes) -> tuple[bytes, bytes]:
        return (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After-Ms: 250\r\nRetry-After: 1\r\n",
            b'{"code":"unavailable","message":"busy: ' + body + b'"}',
        )

    async with serving(shed) as server:
        pool = pool_for(server)
        head = pool.request_head("/coupon.v1.CouponService/IssueCoupon")
        try:
            reply = await pool.post(head, b"alice")
        finally:
            await pool.aclose()

    assert reply == Reply(503, b'{"code":"unavailable","message":"busy: alice"}', 250)
    assert server.requests == [b"alice"]


async def test_a_chunked_answer_is_read_whole_and_the_connection_kept() -> None:
    async def chunked(_: bytes) -> tuple[bytes, bytes]:
        return (
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n",
            b'10\r\n{"code": "not_fo|\r\n1b\r\nund", "message": "no such"}\r\n|0\r\n\r\n',
        )

    async with serving(chunked) as server:
        pool = pool_for(server)
        head = pool.request_head("/x")
        try:
            replies = [await pool.post(head, b"x") for _ in range(2)]
        finally:
            await pool.aclose()

    assert replies == [Reply(404, b'{"code": "not_found", "message": "no such"}')] * 2
    assert server.connections == 1


async def test_requests_one_after_another_share_one_connection() -> None:
    async with serving(ok) as server:
        pool = pool_for(server)
        head = pool.request_head("/x")
        try:
            replies = [await pool.post(head, b"%d" % i) for i in range(5)]
        finally:
            await pool.aclose()

    assert [r.status for r in replies] == [200] * 5
    assert all(r.retry_after_ms is None for r in replies)
    assert server.connections == 1


async def test_a_server_that_says_close_gets_a_new_connection_next_time() -> None:
    async def closing(_: bytes) -> tuple[bytes, bytes]:
        return b"HTTP/1.1 200 OK\r\nconnection: close\r\n", b"bye"

    async with serving(closing) as server:
        pool = pool_for(server)
        head = pool.request_head("/x")
        try:
            for _ in range(3):
                assert (await pool.post(head, b"x")).body == b"bye"
        finally:
            await pool.aclose()

    assert server.connections == 3


async def test_no_answer_within_the_time_out_is_a_time_out() -> None:
    async def silent(_: bytes) -> tuple[bytes, bytes]:
        await asyncio.sleep(5)
        return b"HTTP/1.1 200 OK\r\n", b""

    async with serving(silent) as server:
        pool = pool_for(server, timeout_s=0.2)
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                await pool.post(pool.request_head("/x"), b"x")
        finally:
            await pool.aclose()

    assert time.monotonic() - started < 4


async def test_a_hang_up_mid_request_is_a_connection_error() -> None:
    async def hang_up(_: bytes) -> None:
        return None

    async with serving(hang_up) as server:
        pool = pool_for(server)
        try:
            with pytest.raises(ConnectionError):
                await pool.post(pool.request_head("/x"), b"x")
        finally:
            await pool.aclose()


async def test_no_server_is_a_connection_error() -> None:
    async with serving(ok) as server:
        port = server.port
    pool = HttpPool(f"http://127.0.0.1:{port}", connections=1, timeout_s=1)
    try:
        with pytest.raises(ConnectionError):
            await pool.post(pool.request_head("/x"), b"x")
    finally:
        await pool.aclose()


async def test_requests_beyond_the_connections_wait_in_line_and_give_up_at_their_deadline() -> None:
    release = asyncio.Event()

    async def slow(_: bytes) -> tuple[bytes, bytes]:
        await release.wait()
        return b"HTTP/1.1 200 OK\r\n", b"done"

    async with serving(slow) as server:
        pool = pool_for(server, connections=1)
        head = pool.request_head("/x")
        results: dict[str, Reply | BaseException] = {}
        sent_at: dict[str, int] = {}

        def keep(name: str) -> Callable[[Reply | BaseException, int], None]:
            def done(result: Reply | BaseException, sent_ns: int) -> None:
                results[name] = result
                sent_at[name] = sent_ns

            return done

        now = time.monotonic_ns()
        try:
            pool.submit(head, b"first", keep("first"))
            pool.submit(head, b"patient", keep("patient"))
            pool.submit(head, b"impatient", keep("impatient"), deadline_ns=now + 100_000_000)
            await asyncio.sleep(0.3)  # past the impatient one's deadline, nothing answered
            release.set()
            while len(results) < 3:
                await asyncio.sleep(0.01)
        finally:
            await pool.aclose()

    assert isinstance(results["impatient"], GaveUp)
    assert sent_at["impatient"] == 0
    assert results["first"] == Reply(200, b"done") == results["patient"]
    assert server.requests == [b"first", b"patient"]  # the impatient one never went out
    assert sent_at["patient"] > sent_at["first"] > 0
    assert pool.waits >= 2
