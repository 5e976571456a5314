"""A Content-Length of more digits than any length (Python's int() refuses a string of over
4,300 digits, llhttp takes leading zeros without end) is a malformed request, answered 400
over HTTP/1.1 on the IssueCoupon lane and off it, the server serving on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from harness.raw_http import issue_request, open_connection, read_response
from harness.server import ServerProcess

pytestmark = pytest.mark.e2e
SERVICE = "/coupon.v1.CouponService/"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("long-content-length")
    with ServerProcess(env={}, in_memory=True, log_dir=log_dir) as proc:
        yield proc


def request(rpc: str, length: bytes) -> bytes:
    return (
        (
            f"POST {SERVICE}{rpc} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            "Content-Length: "
        ).encode()
        + length
        + b"\r\n\r\n{}"
    )


@pytest.mark.parametrize("rpc", ["IssueCoupon", "GetCampaign"])
@pytest.mark.parametrize(
    "length",
    [b"9" * 5000, b"0" * 5000 + b"2", b"1" * 19],
    ids=["5000-nines", "5000-zeros-then-2", "19-digits"],
)
async def test_a_content_length_of_too_many_digits_is_answered_400(
    server: ServerProcess, rpc: str, length: bytes
) -> None:
    logged = server.log_path.stat().st_size
    reader, writer = await open_connection(server.url)
    try:
        writer.write(request(rpc, length))
        answer = await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
    assert answer.status == 400, answer
    assert b"Traceback" not in server.log_path.read_bytes()[logged:]
    # The server serves on.
    reader, writer = await open_connection(server.url)
    try:
        writer.write(issue_request("no-such-campaign", "ana"))
        answer = await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
    assert answer.status in (400, 404), answer
