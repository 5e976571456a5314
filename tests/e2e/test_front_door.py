"""The HTTP/1.1 front door against hostile connections, over real sockets to a real server:
oversized or endless headers, bodies over the limit, senders that never finish, thousands
of them at once, clients that do not read their answers; and a keep-alive connection a
client leaves idle."""

from __future__ import annotations

import asyncio
import contextlib
import math
import resource
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coupon.gen.coupon.v1 import coupon_pb
from harness.client import connect_client, create_campaign, issue_retrying
from harness.raw_http import (
    ISSUE,
    closed_by_peer,
    issue_request,
    last_words,
    open_connection,
    read_response,
    rpc_error,
)
from harness.server import ServerProcess
from tests.clients.conftest import node_calls

pytestmark = pytest.mark.e2e
REQUEST_TIMEOUT = 2
KEEPALIVE = 3
HOSTILE_CONNECTIONS = 2000
EXPORT = "/coupon.v1.CouponService/ExportCoupons"
REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
MAX_BODY = 64 * 1024
TOO_MANY_HEADERS = "request headers are limited to 100 fields and 16384 bytes"
# Beyond the request timeout, for the server to answer and close a connection that never
# finishes its request (its sweep runs once a second): room for a busy machine.
ENDED_WITHIN = 20


@pytest.fixture(scope="module")
def server(server_env: dict[str, str]) -> Iterator[ServerProcess]:
    # Room for thousands of sockets, in this process and the server it starts.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20_000), hard))
    with ServerProcess(
        env={
            **server_env,
            "COUPON_REQUEST_TIMEOUT_SECONDS": str(REQUEST_TIMEOUT),
            "COUPON_KEEPALIVE_SECONDS": str(KEEPALIVE),
        }
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
async def campaign(server: ServerProcess) -> str:
    async with connect_client(server.url) as client:
        return (await create_campaign(client, total=1_000_000, name="front door")).id


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_a_huge_header_is_refused_and_the_connection_closed(
    server: ServerProcess,
) -> None:
    """Refused by its size as it arrives, before any content type: on the API's path, the
    Connect unary error."""
    reader, writer = await open_connection(server.url)
    writer.write(f"POST {ISSUE} HTTP/1.1\r\nHost: t\r\nX-Big: ".encode())
    try:
        for _ in range(160):  # 10 MB, in 64 KiB pieces, as a client would stream it
            writer.write(b"a" * 65_536)
            await writer.drain()
    except ConnectionError:
        pass  # the server answered and closed long before the end
    response = await read_response(reader)
    assert response.status == 429
    assert response.json() == {"code": "resource_exhausted", "message": TOO_MANY_HEADERS}
    assert await closed_by_peer(reader, 5)


async def test_ten_thousand_headers_are_refused_with_431(server: ServerProcess) -> None:
    reader, writer = await open_connection(server.url)
    head = "".join(f"X-H{i}: v\r\n" for i in range(10_000))
    writer.write(f"GET /healthz HTTP/1.1\r\nHost: t\r\n{head}\r\n".encode())
    response = await read_response(reader)
    assert response.status == 431
    assert response.headers["content-type"].startswith("text/plain")
    assert response.body.decode() == TOO_MANY_HEADERS
    assert await closed_by_peer(reader, 5)


# A content type of each protocol, and a path of the API it goes to.
API_REQUESTS = [
    pytest.param("application/json", ISSUE, id="connect-unary-json"),
    pytest.param("application/proto", ISSUE, id="connect-unary-proto"),
    pytest.param("application/connect+json", EXPORT, id="connect-stream-json"),
    pytest.param("application/connect+proto", EXPORT, id="connect-stream-proto"),
    pytest.param("application/grpc", ISSUE, id="grpc"),
    pytest.param("application/grpc+json", ISSUE, id="grpc-json"),
    pytest.param("application/grpc-web+proto", ISSUE, id="grpc-web-proto"),
    pytest.param("application/grpc-web-text", REFLECTION, id="grpc-web-text-reflection"),
    pytest.param("application/grpc-web-text+proto", ISSUE, id="grpc-web-text-proto"),
]


@pytest.mark.parametrize(("content_type", "path"), API_REQUESTS)
async def test_too_many_headers_on_the_api_are_resource_exhausted_in_the_callers_protocol(
    server: ServerProcess, content_type: str, path: str
) -> None:
    """Read as its client reads it (not HTTP 431, which gRPC, gRPC-Web and Connect streams
    read as `unknown`), though the content type comes after the limit was passed."""
    reader, writer = await open_connection(server.url)
    head = "".join(f"X-H{i}: v\r\n" for i in range(200))
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: t\r\n{head}Content-Type: {content_type}\r\n"
        f"Content-Length: 5\r\n\r\n".encode()
    )
    response = await asyncio.wait_for(read_response(reader), 5)
    code, message = rpc_error(response.status, response.headers, response.body, content_type)
    assert (code, message) == ("resource_exhausted", TOO_MANY_HEADERS)
    assert response.headers["connection"] == "close"
    assert await closed_by_peer(reader, 5)


@pytest.mark.parametrize(("content_type", "path"), API_REQUESTS)
async def test_a_body_over_the_limit_on_the_api_is_resource_exhausted_in_the_callers_protocol(
    server: ServerProcess, content_type: str, path: str
) -> None:
    """Not HTTP 429, which gRPC-Web and Connect streams read as `unavailable`: a retry of
    a request that can never succeed."""
    reader, writer = await open_connection(server.url)
    size = 50 * 1024 * 1024
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {size}\r\n\r\n".encode()
    )
    response = await asyncio.wait_for(read_response(reader), 5)  # no body sent at all
    code, message = rpc_error(response.status, response.headers, response.body, content_type)
    assert code == "resource_exhausted"
    assert message == f"request body of {size} bytes is over the limit of {MAX_BODY} bytes"
    assert response.headers["connection"] == "close"
    assert await closed_by_peer(reader, 5)


@pytest.mark.parametrize(
    ("content_type", "path"),
    # Enveloped bodies (gRPC-Web's text form is base64: no prefix to read as it comes).
    [
        p
        for p in API_REQUESTS
        if str(p.values[0]).startswith(("application/grpc", "application/connect+"))
        and not str(p.values[0]).startswith("application/grpc-web-text")
    ],
)
async def test_a_chunked_enveloped_body_over_the_limit_by_its_prefix_is_refused_at_once(
    server: ServerProcess, content_type: str, path: str
) -> None:
    """Sent chunked, with no length declared: its first message's prefix declares one,
    and the refusal comes as soon as it says the body is over, in the service's words. The
    request's handler, already started, writes nothing after the refusal (gRPC over
    HTTP/1.1 answers before reading the body: it was an error logged, a write after the
    connection's end)."""
    faults_before = server.log(tail=10_000_000).count("Exception in ASGI application")
    declared = 70_000
    prefix = b"\x00" + declared.to_bytes(4, "big")
    reader, writer = await open_connection(server.url)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
        + b"%x\r\n" % len(prefix)
        + prefix
        + b"\r\n"
    )
    response = await asyncio.wait_for(read_response(reader), 5)  # nothing more sent
    code, message = rpc_error(response.status, response.headers, response.body, content_type)
    assert code == "resource_exhausted"
    size = len(prefix) + declared  # at least: what follows the first message is not read
    assert message == f"request body of at least {size} bytes is over the limit of {MAX_BODY} bytes"
    assert await closed_by_peer(reader, 5)
    await asyncio.sleep(0.5)  # for the handler to have run
    log = server.log(tail=10_000_000)
    assert log.count("Exception in ASGI application") == faults_before, log[-3000:]


async def test_a_body_over_the_limit_outside_the_api_is_413(server: ServerProcess) -> None:
    reader, writer = await open_connection(server.url)
    writer.write(
        b"POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Type: application/grpc\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 413
    assert response.body.decode() == f"request body is limited to {MAX_BODY} bytes"
    assert await closed_by_peer(reader, 5)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("transport", ["connect", "grpcweb"])
def test_connect_node_over_http1_reads_resource_exhausted_for_requests_over_the_limits(
    server: ServerProcess, transport: str, binary: bool
) -> None:
    """connect-es's own reading of each refusal, unary and streaming (the Connect
    protocol's streams are application/connect+*; gRPC-Web's calls are all alike)."""
    padded = {"x-padding": "$x*20000"}
    calls = [
        {"rpc": "IssueCoupon", "request": {"campaignId": "c", "userId": "u"}, "headers": padded},
        {"rpc": "ExportCoupons", "request": {"campaignId": "c"}, "headers": padded},
        {"rpc": "IssueCoupon", "request": {"campaignId": "c", "userId": "$x*70000"}},
        {"rpc": "ExportCoupons", "request": {"campaignId": "$x*70000"}},
    ]
    results = node_calls(server.url, transport, calls, binary=binary, http_version="1.1")
    for result in results:
        assert result["error"]["code"] == "resource_exhausted", result
    for result in results[:2]:
        assert result["error"]["message"] == TOO_MANY_HEADERS
    for result in results[2:]:
        assert result["error"]["message"].endswith(f"is over the limit of {MAX_BODY} bytes")
    if transport == "grpcweb":
        assert {r["metadata"]["grpc-status"] for r in results} == {"8"}


async def test_a_declared_body_over_the_limit_is_answered_before_it_is_sent(
    server: ServerProcess,
) -> None:
    reader, writer = await open_connection(server.url)
    writer.write(
        f"POST {ISSUE} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {50 * 1024 * 1024}\r\n\r\n".encode()
    )
    response = await asyncio.wait_for(read_response(reader), 5)  # no body sent at all
    assert response.status == 429
    error = response.json()
    assert error["code"] == "resource_exhausted"
    assert "over the limit" in str(error["message"])


async def test_a_body_over_the_limit_being_sent_gets_the_answer_not_a_reset(
    server: ServerProcess,
) -> None:
    reader, writer = await open_connection(server.url)
    size = 50 * 1024 * 1024
    writer.write(
        f"POST {ISSUE} HTTP/1.1\r\nHost: t\r\nContent-Type: application/proto\r\n"
        f"Content-Length: {size}\r\n\r\n".encode()
    )

    async def send_body() -> None:
        chunk = b"\x00" * 65_536
        try:
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass

    sending = asyncio.ensure_future(send_body())
    response = await asyncio.wait_for(read_response(reader), 10)
    assert response.status == 429 and response.json()["code"] == "resource_exhausted"
    await sending


async def test_a_sender_that_never_finishes_its_request_is_answered_408_and_closed(
    server: ServerProcess,
) -> None:
    reader, writer = await open_connection(server.url)
    started = time.monotonic()
    answer = asyncio.ensure_future(read_response(reader))
    writer.write(b"POST /coupon.v1.CouponService/IssueCoupon HTTP/1.1\r\nHost: t\r\n")
    for _ in range(REQUEST_TIMEOUT * 4):  # a byte every half second: never the end
        await asyncio.sleep(0.5)
        if reader.at_eof() or writer.is_closing():
            break
        try:
            writer.write(b"X")
            await writer.drain()
        except ConnectionError:
            break
    response = await answer
    assert response.status == 408
    assert time.monotonic() - started < REQUEST_TIMEOUT + 2


async def test_a_connection_that_sends_nothing_is_closed_cleanly_once_idle(
    server: ServerProcess,
) -> None:
    """No answer to a request never begun (a client would read it as its next request's):
    nothing written, a clean close once idle, as between requests (that it stays usable
    past the request timeout is the next test's)."""
    reader, writer = await open_connection(server.url)
    assert await closed_by_peer(reader, KEEPALIVE + 2)
    writer.close()


async def test_a_connection_opened_ahead_of_its_first_request_serves_it(
    server: ServerProcess, campaign: str
) -> None:
    """A client's pool opens connections before it needs them: one first used after the
    request timeout (within the keep-alive time) gets its request's answer."""
    reader, writer = await open_connection(server.url)
    await asyncio.sleep(REQUEST_TIMEOUT + 0.5)
    writer.write(issue_request(campaign, "opened-ahead"))
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 200, response
    writer.close()


@pytest.mark.parametrize("first", [b"P", b"PRI * HTTP/2.0\r\n"])
async def test_a_request_begun_and_left_unfinished_is_answered_408(
    server: ServerProcess, first: bytes
) -> None:
    """Bytes that could still become HTTP/1.1 or HTTP/2's preface, and then nothing: a
    request begun, answered 408 and closed as any request that does not arrive whole."""
    reader, writer = await open_connection(server.url)
    writer.write(first)
    response = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT + 2)
    assert response.status == 408
    assert await closed_by_peer(reader, 3)
    writer.close()


async def test_thousands_of_endless_headers_keep_memory_flat_and_clients_served(
    server: ServerProcess, campaign: str
) -> None:
    """Each connection trickles an endless header; the server holds at most its limit of
    each, closes them when their time is up, and answers ordinary clients meanwhile."""
    before = rss_mib(server.process.pid)
    writers: list[asyncio.StreamWriter] = []
    ends: list[asyncio.Future[bytes | None]] = []
    for _ in range(HOSTILE_CONNECTIONS):
        reader, writer = await open_connection(server.url)
        writer.write(b"POST /healthz HTTP/1.1\r\nHost: t\r\nX-Endless: ")
        writers.append(writer)
        # Read from the start, as a client does: what the server says before it closes is
        # had at once, and its answer is not lost to a reset if we wrote after its close.
        ends.append(asyncio.ensure_future(last_words(reader, REQUEST_TIMEOUT + ENDED_WITHIN)))

    async def trickle() -> None:
        # Opening them all may take longer than the request timeout on a busy machine: the
        # first are answered by then, and a client stops sending once it has the answer.
        for _ in range(REQUEST_TIMEOUT * 2):
            for writer, end in zip(writers, ends, strict=True):
                if not end.done() and not writer.is_closing():
                    with contextlib.suppress(ConnectionError):
                        writer.write(b"z" * 1024)
            await asyncio.sleep(0.5)

    trickling = asyncio.ensure_future(trickle())
    async with connect_client(server.url) as client:
        served = [await issue_retrying(client, campaign, f"meanwhile-{i}") for i in range(20)]
    during = rss_mib(server.process.pid)
    await trickling
    assert all(r.coupon is not None for r in served)
    assert during - before < 100, (before, during)
    # Each was answered (408 for running out of time, 431 for growing past the limit), then
    # closed cleanly.
    answers = await asyncio.gather(*ends)
    assert {end[:12] for end in answers if end is not None} <= {b"HTTP/1.1 408", b"HTTP/1.1 431"}
    assert None not in answers
    for writer in writers:
        writer.close()


async def test_an_idle_keep_alive_connection_is_reused_or_closed_cleanly(
    server: ServerProcess, campaign: str
) -> None:
    reader, writer = await open_connection(server.url)
    writer.write(issue_request(campaign, "idle-1"))
    assert (await read_response(reader)).status == 200
    await asyncio.sleep(KEEPALIVE - 1)  # idle, but less than the server keeps it
    writer.write(issue_request(campaign, "idle-2"))
    assert (await read_response(reader)).status == 200
    # Beyond the keep-alive time the server ends it with a clean close, never a reset.
    assert await closed_by_peer(reader, KEEPALIVE + 2)


UPGRADE_H2C = (
    "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
)


def upgrading(request: bytes) -> bytes:
    """The request as curl --http2 and Java's HttpClient send it over http://: asking to
    upgrade to h2c, which this server does not do."""
    line, _, rest = request.partition(b"\r\n")
    return line + b"\r\n" + UPGRADE_H2C.encode() + rest


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_request_asking_to_upgrade_is_served_in_http1_with_its_body(
    server: ServerProcess, campaign: str, chunked: bool
) -> None:
    request = upgrading(issue_request(campaign, f"upgrade-{chunked}"))
    if chunked:
        head, _, body = request.partition(b"\r\n\r\n")
        head = head.replace(b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked")
        request = head + b"\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    reader, writer = await open_connection(server.url)
    head, _, body = request.partition(b"\r\n\r\n")
    writer.write(head + b"\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)  # the body in a later packet than the head
    writer.write(body)
    first = await read_response(reader)
    writer.write(issue_request(campaign, f"upgrade-{chunked}"))  # the same connection
    again = await read_response(reader)
    writer.close()

    assert first.status == 200, first.body
    assert first.json()["coupon"]["userId"] == f"upgrade-{chunked}"  # type: ignore[index]
    assert again.status == 200 and again.json()["alreadyIssued"] is True


async def test_a_body_after_an_upgrade_head_is_never_read_as_a_request_of_its_own(
    server: ServerProcess, campaign: str
) -> None:
    """The body of a request asking to upgrade is its body, even when it is itself a whole
    request: read as the next request, it would pass any rule a proxy in front applies to
    the first request's path."""
    inner = issue_request(campaign, "smuggled")
    head = (
        f"POST /coupon.v1.CouponService/ListUserCoupons HTTP/1.1\r\nHost: t\r\n{UPGRADE_H2C}"
        f"Content-Type: application/json\r\nContent-Length: {len(inner)}\r\n\r\n"
    )
    reader, writer = await open_connection(server.url)
    writer.write(head.encode())
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.write(inner)
    answer = await read_response(reader)
    writer.write(
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    pipelined = [await read_response(reader), await read_response(reader)]
    writer.close()

    assert answer.status == 400
    assert "not valid JSON" in str(answer.json()["message"])
    assert [r.status for r in pipelined] == [200, 200]
    async with connect_client(server.url) as client:
        listed = await client.list_user_coupons(
            coupon_pb.ListUserCouponsRequest(user_id="smuggled")
        )
    assert not listed.coupons, listed


async def test_a_flood_of_malformed_requests_is_answered_400_and_logged_once_a_second(
    server: ServerProcess,
) -> None:
    before = server.log(tail=10_000_000).count("Invalid HTTP request received.")
    started = time.monotonic()
    for _ in range(50):
        reader, writer = await open_connection(server.url)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
        assert (await read_response(reader)).status == 400
        writer.close()
    await asyncio.sleep(0.2)
    seconds = time.monotonic() - started
    logged = server.log(tail=10_000_000).count("Invalid HTTP request received.") - before
    assert 1 <= logged <= 1 + math.ceil(seconds), (logged, seconds)  # one a second at most


async def test_pipelined_requests_ahead_of_an_unfinished_head_do_not_count_against_it(
    server: ServerProcess,
) -> None:
    """A read that ends inside a request's head also holds the requests pipelined before
    it (RFC 9112 9.3.2): their bytes are not that head's, and must not make it too large."""
    one = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    many = one * 1_000  # 34 KB, over twice the header limit, in one write
    reader, writer = await open_connection(server.url)
    writer.write(many + one[:-10])
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.write(one[-10:])
    statuses = [(await read_response(reader)).status for _ in range(1_001)]
    writer.close()
    assert statuses == [200] * 1_001


# name -> (the request, the answer's status); a refused request's connection is closed.
HOST_CASES = {
    "HTTP/1.1 without Host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    "HTTP/1.1 with two Hosts": (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "HTTP/1.1 with an empty Host": (b"GET /healthz HTTP/1.1\r\nHost:\r\n\r\n", 200),
    "HTTP/1.0 without Host": (b"GET /healthz HTTP/1.0\r\n\r\n", 200),
    "HTTP/1.0 with two Hosts": (b"GET /healthz HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    # Not an authority (RFC 9112 §3.2): the framework would fail to build a URL from it.
    "a port past 65535": (b"GET /nonexistent HTTP/1.1\r\nHost: a:99999\r\n\r\n", 400),
    "a URL for a Host": (b"GET /healthz HTTP/1.1\r\nHost: http://a/\r\n\r\n", 400),
    "a port of letters": (b"GET /dashboard/nope HTTP/1.1\r\nHost: a:b\r\n\r\n", 400),
    "two hosts in one": (b"GET /healthz HTTP/1.1\r\nHost: a, b\r\n\r\n", 400),
    "HTTP/1.0 with a bad Host": (b"GET /healthz HTTP/1.0\r\nHost: a b\r\n\r\n", 400),
    "an IP literal": (b"GET /healthz HTTP/1.1\r\nHost: [::1]:8000\r\n\r\n", 200),
}


@pytest.mark.parametrize(("request_bytes", "status"), HOST_CASES.values(), ids=HOST_CASES)
async def test_host_is_one_field_in_http_1_1_and_at_most_one_in_http_1_0(
    server: ServerProcess, request_bytes: bytes, status: int
) -> None:
    """RFC 9112 §3.2: 400 to an HTTP/1.1 request without Host, and to any with more than
    one; the connection is then closed, as for any malformed request."""
    reader, writer = await open_connection(server.url)
    writer.write(request_bytes)
    response = await read_response(reader)
    writer.close()
    assert response.status == status, response.body
    if status == 400:
        assert response.headers["connection"] == "close"
        assert b"Host" in response.body
        assert await closed_by_peer(reader, 5)


@pytest.mark.parametrize("split", [False, True], ids=["in one write", "in two writes"])
@pytest.mark.parametrize("hosts", [0, 2])
async def test_an_issue_request_without_one_host_is_refused_and_issues_nothing(
    server: ServerProcess, campaign: str, split: bool, hosts: int
) -> None:
    """IssueCoupon's lane reads the fields itself when the request arrives in one write:
    it refuses what the parser refuses."""
    user = f"hosts-{hosts}-{split}"
    request = issue_request(campaign, user)
    request = request.replace(b"Host: test\r\n", b"Host: test\r\n" * hosts)
    reader, writer = await open_connection(server.url)
    if split:
        writer.write(request[:20])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(request[20:])
    else:
        writer.write(request)
    response = await read_response(reader)
    writer.close()
    assert response.status == 400, response.body
    assert await closed_by_peer(reader, 5)
    async with connect_client(server.url) as client:
        listed = await client.list_user_coupons(coupon_pb.ListUserCouponsRequest(user_id=user))
    assert not listed.coupons


@pytest.mark.parametrize(
    ("version", "status"),
    [("HTTP/1.1", 200), ("HTTP/1.0", 200), ("HTTP/2.0", 505), ("HTTP/0.9", 505)],
)
async def test_a_request_line_of_another_major_version_is_answered_505(
    server: ServerProcess, version: str, status: int
) -> None:
    """llhttp reads HTTP/0.9 and HTTP/2.0 request lines: neither is HTTP/1 (HTTP/2 with prior
    knowledge begins with its preface, which the server tells apart before this)."""
    reader, writer = await open_connection(server.url)
    writer.write(f"GET /healthz {version}\r\nHost: t\r\n\r\n".encode())
    response = await read_response(reader)
    writer.close()
    assert response.status == status, response.body
    if status == 505:
        assert response.headers["connection"] == "close"
        assert await closed_by_peer(reader, 5)


ODD_PATHS = [
    "/example/%00",
    "/example/%00/",
    "/example/a%00.html",
    "/example/" + "a" * 300,
    "/example/index.html/x",
    "/example/%2e%2e/%2e%2e/etc/passwd",
    "/example/../../etc/passwd",
    "/example/%ff%fe",
    "/example/%c0%ae%c0%ae/x",
    "/example/a%2fb",
    "/%00",
    "/dashboard/%00",
]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_odd_paths_are_not_found_never_a_fault_of_the_server(
    server: ServerProcess, method: str
) -> None:
    """A NUL byte, a name too long for the file system, a file taken for a directory,
    escapes out of the example page's directory, invalid UTF-8: 404 (or 400), never 500,
    and nothing logged as an error; the example page's own files still served."""
    errors_before = server.log(tail=10_000_000).count('"level": "error"')
    statuses: dict[str, int] = {}
    for path in ODD_PATHS:
        reader, writer = await open_connection(server.url)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        status_line = await reader.readline()
        writer.close()
        statuses[path] = int(status_line.split()[1])
    assert all(status in (400, 404) for status in statuses.values()), statuses
    for path in ("/example/", "/example/app.js"):
        reader, writer = await open_connection(server.url)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert (await read_response(reader)).status == 200, path
        writer.close()
    await asyncio.sleep(0.2)
    log = server.log(tail=10_000_000)
    assert log.count('"level": "error"') == errors_before, log[-3000:]


async def test_a_header_value_beyond_utf_8_is_served_not_a_fault(server: ServerProcess) -> None:
    """HTTP lets a field value carry any byte beyond ASCII (obs-text): an X-Request-Id in
    Latin-1 is read so, and the request answered, not failed as `unknown` with a traceback
    logged."""
    errors_before = server.log(tail=10_000_000).count('"level": "error"')
    body = b'{"userId": "latin-1 caller"}'
    reader, writer = await open_connection(server.url)
    writer.write(
        b"POST /coupon.v1.CouponService/ListUserCoupons HTTP/1.1\r\nHost: t\r\n"
        b"X-Request-Id: caf\xe9\x85\r\nUser-Agent: na\xefve/1.0\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    response = await read_response(reader)
    writer.close()
    assert response.status == 200, response.body
    assert response.json() == {}
    await asyncio.sleep(0.2)
    log = server.log(tail=10_000_000)
    assert log.count('"level": "error"') == errors_before, log[-3000:]


# name -> a request the server refuses (its status), pipelined behind valid ones.
REFUSED_BEHIND = {
    "no Host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    "HTTP/2.0 request line": (b"GET /healthz HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    "unparsable": (b"GET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n", 400),
    "a body over the limit": (
        b"POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n",
        413,
    ),
}


@pytest.mark.parametrize("lane", [False, True], ids=["ASGI first", "IssueCoupon first"])
@pytest.mark.parametrize(("refused", "status"), REFUSED_BEHIND.values(), ids=REFUSED_BEHIND)
async def test_requests_pipelined_before_a_refused_one_are_answered_first(
    server: ServerProcess, campaign: str, lane: bool, refused: bytes, status: int
) -> None:
    """RFC 9112 §9.3.2: answers go in the order of the requests. The requests before a
    refused one, in flight or queued, are answered, then the refusal, then the close;
    before, the refusal was written at once and the earlier answers were lost (an
    IssueCoupon's coupon committed without an answer)."""
    user = f"before-{status}-{lane}-{refused[:12].hex()}"
    first = issue_request(campaign, user) if lane else b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    second = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    reader, writer = await open_connection(server.url)
    writer.write(first + second + refused)
    answers = [await read_response(reader) for _ in range(3)]
    writer.close()
    assert [a.status for a in answers] == [200, 200, status], [a.body for a in answers]
    assert answers[2].headers["connection"] == "close"
    assert await closed_by_peer(reader, 5)
    if lane:
        assert answers[0].json()["coupon"]["userId"] == user


async def test_an_issue_request_whose_host_is_no_authority_is_refused_and_issues_nothing(
    server: ServerProcess, campaign: str
) -> None:
    """The lane, which reads the fields itself, refuses what the parser refuses."""
    user = "bad-host-lane"
    request = issue_request(campaign, user).replace(b"Host: test\r\n", b"Host: a:b\r\n")
    reader, writer = await open_connection(server.url)
    writer.write(request)
    response = await read_response(reader)
    writer.close()
    assert response.status == 400 and b"Host" in response.body, response.body
    async with connect_client(server.url) as client:
        held = await client.list_user_coupons(coupon_pb.ListUserCouponsRequest(user_id=user))
    assert not held.coupons


@pytest.mark.parametrize("path", ["/healthz", "/nonexistent", "/dashboard/nope", "/example/"])
@pytest.mark.parametrize("authority", ["a:99999", "http://a/", "a:b"])
def test_an_http2_authority_that_is_no_host_gets_400_not_a_server_error(
    server: ServerProcess, path: str, authority: str
) -> None:
    with httpx.Client(http1=False, http2=True) as client:
        answer = client.get(f"{server.url}{path}", headers={"host": authority})
    assert answer.http_version == "HTTP/2"
    assert answer.status_code == 400, answer.text
    assert "Host" in answer.text
    assert "Traceback" not in server.log(tail=200_000)


SCRIPT = b"GET /dashboard/dashboard.js HTTP/1.1\r\nHost: t\r\n\r\n"


def tcp_state(sock: socket.socket) -> int:
    """The socket's TCP state, from TCP_INFO (1: established)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def small_window_socket() -> socket.socket:
    """A client socket whose receive buffer is small: what it does not read soon fills the
    server's buffers rather than its own."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    return sock


async def script_size(server: ServerProcess) -> int:
    reader, writer = await open_connection(server.url)
    writer.write(SCRIPT)
    response = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert response.status == 200
    return len(response.body)


async def serves_meanwhile(server: ServerProcess, campaign: str, seconds: float) -> None:
    """Calls on another connection are answered while one is stuck."""
    until = time.monotonic() + seconds
    reader, writer = await open_connection(server.url)
    try:
        while time.monotonic() < until:
            writer.write(issue_request(campaign, f"meanwhile-{uuid.uuid4().hex}"))
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response.status == 200, response
            await asyncio.sleep(0.2)
    finally:
        writer.close()


async def send_and_never_read(
    server: ServerProcess, campaign: str, requests: bytes, slack: float = 0
) -> None:
    """Sends `requests` on a connection with a small receive window and reads nothing:
    the server must reset it within a few request time-outs (plus `slack` seconds), and
    serve other clients meanwhile and after."""
    loop = asyncio.get_running_loop()
    sock = small_window_socket()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        sending = asyncio.ensure_future(loop.sock_sendall(sock, requests))
        # Never read from here on.
        await serves_meanwhile(server, campaign, REQUEST_TIMEOUT + 1)
        deadline = time.monotonic() + 4 * REQUEST_TIMEOUT + 20 + slack
        while tcp_state(sock) == 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert tcp_state(sock) != 1, "the server still holds the connection"
        with contextlib.suppress(OSError):
            await asyncio.wait_for(sending, 5)
    finally:
        sock.close()
    await serves_meanwhile(server, campaign, 0.5)


async def test_a_client_that_never_reads_its_answers_is_reset(
    server: ServerProcess, campaign: str
) -> None:
    """A client that pipelines requests for large answers and never reads its socket fills
    the server's buffers: the connection is reset once the server has written nothing to it
    for COUPON_REQUEST_TIMEOUT_SECONDS, rather than held with its answers and its handler,
    and other clients are served meanwhile and after. The coupon its first request was
    issued stays issued: the retry gets it back."""
    # About 27 MB of answers: more than the kernel buffers on the way (the server's send
    # buffer grows to net.ipv4.tcp_wmem's maximum), so that the server's own fills.
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    if wmem_max > 16 * 1024 * 1024:
        pytest.skip(f"TCP send buffers of up to {wmem_max} bytes would take it all")
    count = 27_000_000 // await script_size(server) + 1
    user = f"never-reads-{uuid.uuid4().hex}"
    stalled = server.metric("coupon_connections_closed_total", reason="stalled")
    await send_and_never_read(server, campaign, issue_request(campaign, user) + SCRIPT * count)
    assert server.metric("coupon_connections_closed_total", reason="stalled") == stalled + 1
    reader, writer = await open_connection(server.url)
    writer.write(issue_request(campaign, user))
    retry = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert retry.status == 200, retry
    assert retry.json().get("alreadyIssued") is True, retry.json()
    assert "Traceback" not in server.log()


async def test_a_slow_reader_that_keeps_reading_gets_every_answer(
    server: ServerProcess,
) -> None:
    """The send time-out counts from the last time the client drained anything, not from
    the answer's start: a client reading a little at a time, each step within the
    time-out, gets everything, though it takes several time-outs in all."""
    size = await script_size(server)
    count = 6_000_000 // size + 1
    loop = asyncio.get_running_loop()
    sock = small_window_socket()
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    # A small stream buffer: the reader takes from the socket only what it reads.
    reader, writer = await asyncio.open_connection(sock=sock, limit=16_384)
    try:
        started = time.monotonic()
        writer.write(SCRIPT * count)
        for i in range(count):
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response.status == 200 and len(response.body) == size
            if i % 25 == 24:  # about 250 KB, then half the time-out: a wide margin
                await asyncio.sleep(REQUEST_TIMEOUT / 2)
        elapsed = time.monotonic() - started
    finally:
        writer.close()
    assert elapsed > 2 * REQUEST_TIMEOUT


async def test_a_client_that_pipelines_issues_and_never_reads_is_reset(
    server: ServerProcess, campaign: str
) -> None:
    """IssueCoupon's lane writes each answer as its request is read: a client that
    pipelines them by the thousand and never reads fills the server's buffers all the same,
    and is reset once nothing has been written to it for COUPON_REQUEST_TIMEOUT_SECONDS."""
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    if wmem_max > 16 * 1024 * 1024:
        pytest.skip(f"TCP send buffers of up to {wmem_max} bytes would take it all")
    user = f"pipelines-{uuid.uuid4().hex}"
    reader, writer = await open_connection(server.url)
    writer.write(issue_request(campaign, user))
    answer = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert answer.status == 200, answer
    # The same user again and again: each answer the coupon issued, `alreadyIssued`.
    count = 3 * wmem_max // len(answer.body) + 1
    await send_and_never_read(server, campaign, issue_request(campaign, user) * count, 10)
    assert "Traceback" not in server.log()


async def test_a_client_that_pipelines_issues_and_never_reads_is_read_no_further(
    server: ServerProcess, campaign: str
) -> None:
    """While its answers wait to be sent, nothing more is read from such a client: what it
    sends stays in the kernels' buffers, and the server does not answer (and hold in its
    memory) request after request that it cannot send."""
    user = f"stopped-{uuid.uuid4().hex}"
    request = issue_request(campaign, user)
    reader, writer = await open_connection(server.url)
    writer.write(request)
    answer = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert answer.status == 200, answer
    total = 60_000_000
    requests = request * (total // len(request) + 1)
    sock = small_window_socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65_536)
    loop = asyncio.get_running_loop()
    sent = 0
    try:
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        view = memoryview(requests)
        progress_at = time.monotonic()
        # Sends until the server stops taking bytes for a second (or resets the connection).
        while sent < len(requests) and time.monotonic() - progress_at < 1:
            try:
                n = sock.send(view[sent : sent + 65_536])
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            except OSError:
                break
            sent += n
            progress_at = time.monotonic()
    finally:
        sock.close()
    answered = sent // len(request)
    # What the server could not send: its own buffer's high-water mark, the kernel's send
    # and receive buffers; the client's requests beyond them are not read.
    assert sent < total // 3, f"{answered} requests of {len(requests) // len(request)} read"
    await serves_meanwhile(server, campaign, 0.5)


@pytest.mark.parametrize(
    ("path", "location"), [("/example", "/example/"), ("/example?x=1", "/example/?x=1")]
)
def test_the_example_page_without_its_slash_redirects_to_it(
    server: ServerProcess, path: str, location: str
) -> None:
    """Its files are relative to /example/: served at /example, the page loaded none."""
    answer = httpx.get(f"{server.url}{path}", follow_redirects=False)
    assert answer.status_code == 308 and answer.headers["location"] == location
    page = httpx.get(f"{server.url}{path}", follow_redirects=True)
    assert page.status_code == 200 and page.url.path == "/example/"
    assert 'src="app.js"' in page.text or "app.js" in page.text
