"""How the HTTP/1.x front door ends its answers, over raw sockets to a real server:
an answer of no declared length reaches an HTTP/1.0 client unchunked, its end the close of
the connection (RFC 9112 §6.1, §6.3), while HTTP/1.1 keeps its chunked framing and its
keep-alive; a refusal made from the headers, which closes the connection, reaches a
client still sending its body (the close lingers: no reset)."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from coupon.gen.coupon.v1 import coupon_pb
from harness.client import connect_client, create_campaign
from harness.raw_http import open_connection, read_response
from harness.server import ServerProcess
from tests.clients.conftest import node_calls

pytestmark = pytest.mark.e2e
SERVICE = "/coupon.v1.CouponService/"
USERS = ("ana", "ben", "cho")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("framing")
    with ServerProcess(env={}, in_memory=True, log_dir=log_dir) as proc:
        yield proc


@pytest.fixture(scope="module")
async def campaign(server: ServerProcess) -> str:
    """A campaign with a coupon for each of USERS."""
    async with connect_client(server.url) as client:
        campaign_id = (await create_campaign(client, total=10, name="framing")).id
        for user in USERS:
            await client.issue_coupon(
                coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id=user)
            )
    return campaign_id


def post(rpc: str, content_type: str, body: bytes, version: str, *fields: str) -> bytes:
    head = [f"POST {SERVICE}{rpc} {version}", "Host: test", f"Content-Type: {content_type}"]
    head += [*fields, f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def export_request(campaign_id: str) -> bytes:
    """ExportCoupons' request in the Connect protocol's JSON stream: one message."""
    message = json.dumps({"campaignId": campaign_id}).encode()
    return struct.pack(">BI", 0, len(message)) + message


def stream_messages(body: bytes) -> list[tuple[int, dict[str, object]]]:
    """A Connect stream's messages, (flags, JSON); the body must hold them exactly."""
    messages = []
    while body:
        flags, length = struct.unpack(">BI", body[:5])
        assert len(body) >= 5 + length, body
        messages.append((flags, json.loads(body[5 : 5 + length])))
        body = body[5 + length :]
    return messages


async def answer_to_close(request: bytes, url: str) -> tuple[bytes, dict[str, str], bytes]:
    """The status line, the fields (names lowered) and everything after them until the
    server closes the connection, as an HTTP/1.0 client reads an answer of no length."""
    reader, writer = await open_connection(url)
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = {
        name.strip().lower().decode(): value.strip().decode()
        for name, _, value in (line.partition(b":") for line in lines)
    }
    return status, fields, body


KEEP_ALIVE = pytest.mark.parametrize(
    "fields", [(), ("Connection: keep-alive",)], ids=["plain", "keep-alive"]
)


@KEEP_ALIVE
async def test_a_unary_answer_to_http_1_0_is_unchunked_and_ends_with_the_connection(
    server: ServerProcess, campaign: str, fields: tuple[str, ...]
) -> None:
    body = json.dumps({"userId": "ana"}).encode()
    request = post("ListUserCoupons", "application/json", body, "HTTP/1.0", *fields)
    status, headers, payload = await answer_to_close(request, server.url)
    assert status.split()[1] == b"200"
    assert "transfer-encoding" not in headers
    assert headers["connection"] == "close"
    coupons = json.loads(payload)["coupons"]
    assert [c["campaignId"] for c in coupons] == [campaign]


@KEEP_ALIVE
async def test_an_issue_answered_to_http_1_0_ends_with_the_connection(
    server: ServerProcess, campaign: str, fields: tuple[str, ...]
) -> None:
    """IssueCoupon's answer (the lane's) ends its connection as the app's answers do: kept
    alive, it would have needed a Connection: keep-alive an HTTP/1.0 client looks for."""
    body = json.dumps({"campaignId": campaign, "userId": "ana"}).encode()
    request = post("IssueCoupon", "application/json", body, "HTTP/1.0", *fields)
    status, headers, payload = await answer_to_close(request, server.url)
    assert status.split()[1] == b"200"
    assert headers["connection"] == "close"
    assert json.loads(payload)["alreadyIssued"] is True


@KEEP_ALIVE
async def test_an_error_answer_to_http_1_0_is_unchunked(
    server: ServerProcess, fields: tuple[str, ...]
) -> None:
    body = json.dumps({"campaignId": "x"}).encode()
    request = post("GetCampaign", "application/json", body, "HTTP/1.0", *fields)
    status, headers, payload = await answer_to_close(request, server.url)
    assert status.split()[1] == b"400"
    assert "transfer-encoding" not in headers
    assert json.loads(payload)["code"] == "invalid_argument"


@KEEP_ALIVE
async def test_a_stream_to_http_1_0_is_unchunked_and_ends_with_the_connection(
    server: ServerProcess, campaign: str, fields: tuple[str, ...]
) -> None:
    request = post(
        "ExportCoupons", "application/connect+json", export_request(campaign), "HTTP/1.0", *fields
    )
    status, headers, payload = await answer_to_close(request, server.url)
    assert status.split()[1] == b"200"
    assert "transfer-encoding" not in headers
    assert headers["connection"] == "close"
    *data, (end_flags, end) = stream_messages(payload)
    assert end_flags == 0x02 and "error" not in end
    users = [c["userId"] for flags, m in data for c in m["coupons"]]  # type: ignore[attr-defined]
    assert sorted(users) == sorted(USERS)


async def test_http_1_1_keeps_its_framing_and_its_connection(
    server: ServerProcess, campaign: str
) -> None:
    """The same requests over HTTP/1.1: chunked, and on one connection one after another."""
    reader, writer = await open_connection(server.url)
    try:
        writer.write(
            post("ExportCoupons", "application/connect+json", export_request(campaign), "HTTP/1.1")
        )
        stream = await asyncio.wait_for(read_response(reader), 10)
        body = json.dumps({"userId": "ana"}).encode()
        writer.write(post("ListUserCoupons", "application/json", body, "HTTP/1.1"))
        unary = await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
    assert stream.headers["transfer-encoding"] == "chunked"
    assert "connection" not in stream.headers
    assert stream_messages(stream.body)[-1][0] == 0x02
    assert unary.status == 200
    assert [c["campaignId"] for c in unary.json()["coupons"]] == [campaign]  # type: ignore[union-attr]


# Requests refused from their headers alone, before their body is read: the fields after
# the request line, the answer's HTTP status.
EARLY_REFUSALS = {
    "timeout header not a number": (
        ["Content-Type: application/json", "Connect-Timeout-Ms: x"],
        400,
    ),
    "another protocol version": (
        ["Content-Type: application/json", "Connect-Protocol-Version: 2"],
        400,
    ),
    "single-valued header twice": (
        ["Content-Type: application/json", "Connect-Timeout-Ms: 900", "Connect-Timeout-Ms: 800"],
        400,
    ),
    "content type not served": (["Content-Type: text/plain"], 415),
    "grpc over http/1.1": (["Content-Type: application/grpc", "TE: trailers"], 200),
}


@pytest.mark.parametrize("case", EARLY_REFUSALS)
def test_a_refusal_from_the_headers_reaches_a_client_still_sending_its_body(
    server: ServerProcess, case: str
) -> None:
    """As Node's http module (and so connect-node) sends a request: the headers, then the
    body a moment later. The answer comes first, and the connection is closed after it; the
    body's bytes arriving after the answer are read and dropped, so the client reads the
    whole answer and a clean end, not a reset that throws the answer away (connect-node:
    `write EPIPE` in place of the service's refusal)."""
    fields, status = EARLY_REFUSALS[case]
    body = json.dumps({"userId": "u" * 4000}).encode()
    head = [f"POST {SERVICE}ListUserCoupons HTTP/1.1", "Host: test", *fields]
    head.append(f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        readable, _, _ = select.select([sock], [], [], 10)
        assert readable, "no answer to the headers"
        time.sleep(0.2)  # the answer is whole, and the server done with it
        # The body, slowly, the answer left unread meanwhile. A reset shows as a broken pipe
        # here, or as ConnectionResetError below: the kernel drops the unread answer.
        for start in range(0, len(body), 1000):
            sock.sendall(body[start : start + 1000])
            time.sleep(0.05)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head_part, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *lines = head_part.split(b"\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in lines)
    }
    assert int(status_line.split()[1]) == status, answer
    assert headers[b"connection"] == b"close"
    if b"transfer-encoding" not in headers:
        assert len(payload) == int(headers[b"content-length"]), answer
    else:
        assert payload.endswith(b"0\r\n\r\n"), answer


def test_connect_node_reads_a_refusal_from_the_headers_not_a_broken_pipe(
    server: ServerProcess,
) -> None:
    """connect-node's own case, which lost about a third of such answers to the reset
    (`internal`, `write EPIPE`): every one is read."""
    call = {
        "rpc": "GetCampaign",
        "request": {"campaignId": "0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50"},
        "headers": {"connect-timeout-ms": "x"},
    }
    results = node_calls(server.url, "connect", [call] * 20, binary=False, http_version="1.1")
    errors = [result.get("error") for result in results]
    expected = {"code": "invalid_argument", "message": "Invalid timeout header: 'x'"}
    assert errors == [expected] * 20
