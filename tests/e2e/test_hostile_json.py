"""JSON nested past any message of this API, sent to a real server process over every
protocol that carries JSON: refused as invalid_argument before a parser reads it, and the
server stays up (the native JSON parser would crash the process at a depth of ~14,000).
And bodies the parser refuses whole, which are answered in the service's words: a lone
surrogate, a byte order mark, gzip that expands past the body limit."""

from __future__ import annotations

import gzip
import json
import struct
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from harness.client import admin
from harness.server import ServerProcess
from tests.clients.h2client import H2Client, Response, grpc_headers

pytestmark = pytest.mark.e2e

TOKEN = "hostile-json-admin-token"
AUTH = admin(TOKEN)
SERVICE = "/coupon.v1.CouponService/"
UNARY = ("IssueCoupon", "CreateCampaign", "GetCampaign", "ListCampaigns", "EndCampaign")
UNARY += ("ListUserCoupons",)
DEEP = b"[" * 20_000 + b"]" * 20_000
TOO_DEEP = "request body: JSON nested more than 64 levels deep"


def nested(depth: int) -> bytes:
    """An object holding `depth` levels in all: {"userId": [[…]]}."""
    return b'{"userId": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def envelope(body: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(body)) + body


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"COUPON_ADMIN_TOKEN": TOKEN}
    log_dir = tmp_path_factory.mktemp("hostile-json")
    with ServerProcess(env=env, in_memory=True, log_dir=log_dir) as proc:
        yield proc


@pytest.fixture
def alive(server: ServerProcess) -> Iterator[None]:
    """After the test, the same processes serve, and answer."""
    before = server.worker_pids()
    yield
    assert server.process.poll() is None, server.log()
    assert server.worker_pids() == before, server.log()
    assert httpx.get(server.url + "/healthz").status_code == 200


def grpc_json(client: H2Client, rpc: str, body: bytes) -> Response:
    """A gRPC call of `rpc` with a JSON body, over HTTP/2."""
    stream_id = client.conn.get_next_available_stream_id()
    headers = [*grpc_headers(rpc), (b"te", b"trailers")]
    headers = [(k, b"application/grpc+json" if k == b"content-type" else v) for k, v in headers]
    client.conn.send_headers(
        stream_id, [*headers, *((k.encode(), v.encode()) for k, v in AUTH.items())]
    )
    client.responses[stream_id] = Response()
    step = client.conn.max_outbound_frame_size
    for at in range(0, len(body), step):
        last = at + step >= len(body)
        client.conn.send_data(stream_id, body[at : at + step], end_stream=last)
        client.flush()
    [response] = client.wait(stream_id)
    return response


def connect_error(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 400, response.text
    error: dict[str, str] = response.json()
    return error


@pytest.mark.usefixtures("alive")
@pytest.mark.parametrize("rpc", UNARY)
@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_deep_json_over_connect_is_invalid_argument(
    server: ServerProcess, rpc: str, http2: bool, compressed: bool
) -> None:
    headers = {"content-type": "application/json", **AUTH}
    body = DEEP
    if compressed:
        body = gzip.compress(body)
        headers["content-encoding"] = "gzip"
    with httpx.Client(http1=not http2, http2=http2, base_url=server.url) as client:
        response = client.post(SERVICE + rpc, content=body, headers=headers)
    assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert connect_error(response) == {"code": "invalid_argument", "message": TOO_DEEP}


@pytest.mark.usefixtures("alive")
def test_deep_json_over_grpc_web_and_grpc_is_invalid_argument(server: ServerProcess) -> None:
    for rpc in ("IssueCoupon", "CreateCampaign"):
        headers = {"content-type": "application/grpc-web+json", **AUTH}
        response = httpx.post(server.url + SERVICE + rpc, content=envelope(DEEP), headers=headers)
        assert response.status_code == 200
        assert response.content[:1] == b"\x80", response.content  # the trailers frame alone
        trailers = response.content[5:].decode()
        assert "grpc-status: 3\r\n" in trailers
        assert urllib.parse.quote(TOO_DEEP) in trailers
        with H2Client(server.port) as client:
            response = grpc_json(client, rpc, envelope(DEEP))
        assert response.grpc_status == b"3", response
        message = response.trailers.get(b"grpc-message", response.headers.get(b"grpc-message"))
        assert urllib.parse.unquote((message or b"").decode()) == TOO_DEEP


@pytest.mark.usefixtures("alive")
def test_deep_json_to_a_streaming_rpc_is_invalid_argument(server: ServerProcess) -> None:
    headers = {"content-type": "application/connect+json", **AUTH}
    response = httpx.post(
        server.url + SERVICE + "ExportCoupons", content=envelope(DEEP), headers=headers
    )
    assert response.status_code == 200 and response.content[:1] == b"\x02", response.content
    error = json.loads(response.content[5:])["error"]
    assert error == {"code": "invalid_argument", "message": TOO_DEEP}


@pytest.mark.usefixtures("alive")
def test_the_depth_limit_and_brackets_in_strings(server: ServerProcess) -> None:
    """64 levels are read (and refused for what they say), 65 are not read; brackets in a
    string do not nest, however many."""
    headers = {"content-type": "application/json"}
    url = server.url + SERVICE + "IssueCoupon"
    at_limit = connect_error(httpx.post(url, content=nested(64), headers=headers))
    assert at_limit == {"code": "invalid_argument", "message": "user_id: expected a string"}
    past = connect_error(httpx.post(url, content=nested(65), headers=headers))
    assert past == {"code": "invalid_argument", "message": TOO_DEEP}
    now = datetime.now(UTC) - timedelta(minutes=1)
    campaign = {"name": "[" * 100, "totalCoupons": 5, "startsAt": now.isoformat()}
    created = httpx.post(server.url + SERVICE + "CreateCampaign", json=campaign, headers=AUTH)
    assert created.status_code == 200, created.text
    campaign_id = created.json()["campaign"]["id"]
    body = {"campaignId": campaign_id, "userId": "[{" * 64}
    issued = httpx.post(url, content=json.dumps(body).encode(), headers=headers)
    assert issued.status_code == 200, issued.text
    assert issued.json()["coupon"]["userId"] == "[{" * 64


# Bodies the JSON parser refuses as a whole where the service names what is wrong.
NAMED = [
    (b'{"userId": "\\ud800"}', "user_id: expected a string of Unicode characters"),
    (b'{"userId": ["\\udfff"]}', "user_id: expected a string of Unicode characters"),
    # In a field the message does not have, otherwise ignored: named all the same.
    (b'{"userId": "x", "junk": "\\ud800"}', "junk: expected a string of Unicode characters"),
    (b'{"userId": "x", "\\udc00": 1}', "\\udc00: expected a string of Unicode characters"),
    (b'\xef\xbb\xbf{"userId": "ana"}', "request body: JSON must not begin with a byte order mark"),
    # UTF-16 and UTF-32 (with or without their marks): deep ones got past the depth check.
    *[
        (
            ('["\u2241", ' + "[" * 7_000 + "]" * 7_000 + ', "\u2241"]').encode(encoding),
            "request body: JSON must be UTF-8",
        )
        for encoding in ("utf-16-le", "utf-16", "utf-32-be")
    ],
]


@pytest.mark.usefixtures("alive")
@pytest.mark.parametrize(("body", "message"), NAMED)
@pytest.mark.parametrize("rpc", ["IssueCoupon", "ListUserCoupons"])
def test_a_lone_surrogate_or_a_byte_order_mark_is_named(
    server: ServerProcess, rpc: str, body: bytes, message: str
) -> None:
    headers = {"content-type": "application/json", **AUTH}
    response = httpx.post(server.url + SERVICE + rpc, content=body, headers=headers)
    error = connect_error(response)
    assert error["code"] == "invalid_argument"
    assert error["message"].startswith(message), error


@pytest.mark.usefixtures("alive")
@pytest.mark.parametrize("content_type", ["application/json", "application/connect+json"])
def test_gzip_that_expands_past_the_limit_is_said_in_the_service_words(
    server: ServerProcess, content_type: str
) -> None:
    """Small on the wire, over 64 KiB once decompressed: refused as a body over the limit."""
    message = gzip.compress(b'{"userId": "' + b"u" * 70_000 + b'"}')
    if content_type == "application/json":
        headers = {"content-type": content_type, "content-encoding": "gzip", **AUTH}
        response = httpx.post(
            server.url + SERVICE + "IssueCoupon", content=message, headers=headers
        )
        assert response.status_code == 429, response.text
        error = response.json()
    else:
        headers = {"content-type": content_type, "connect-content-encoding": "gzip", **AUTH}
        url = server.url + SERVICE + "ExportCoupons"
        response = httpx.post(url, content=envelope(message, flags=1), headers=headers)
        assert response.status_code == 200 and response.content[:1] == b"\x02", response.content
        error = json.loads(response.content[5:])["error"]
    assert error == {
        "code": "resource_exhausted",
        "message": "request body is over the limit of 65536 bytes once decompressed",
    }


HUGE = "9" * 50_000
# Integers of more digits than Python's parser reads (4,300): valid JSON, a number out of
# range, named by its field (a known one, or the unknown key).
HUGE_NUMBERS = [
    ("GetCampaign", f'{{"campaignId": "c", "pageSize": {HUGE}}}', "page_size: "),
    ("GetCampaign", f'{{"campaignId": "c", "pageSize": -{HUGE}}}', "page_size: "),
    ("IssueCoupon", f'{{"campaignId": "c", "userId": "u", "x": {HUGE}}}', "x: "),
    ("IssueCoupon", f'{{"campaignId": "c", "userId": [{HUGE}]}}', "user_id: "),
]


@pytest.mark.usefixtures("alive")
@pytest.mark.parametrize(("rpc", "body", "field"), HUGE_NUMBERS)
def test_an_integer_of_too_many_digits_is_said_out_of_range(
    server: ServerProcess, rpc: str, body: str, field: str
) -> None:
    headers = {"content-type": "application/json", **AUTH}
    response = httpx.post(server.url + SERVICE + rpc, content=body.encode(), headers=headers)
    error = connect_error(response)
    assert error == {
        "code": "invalid_argument",
        "message": f"{field}number out of range (50000 digits)",
    }
