"""The HTTP/1.1 front door reads IssueCoupon's common request itself when it arrives whole
in one read, and leaves everything else to its HTTP parser. Each request here is sent twice
over a real socket to a real server: in one write (the lane's case) and split in two writes
with a pause between (the parser's case); the two answers must be the same. A request the
lane read differently from the parser (a field it let through, a length it misread) shows
as two different answers."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coupon.entrypoints.app import MAX_REQUEST_BYTES
from coupon.gen.coupon.v1 import coupon_pb
from harness.client import connect_client, create_campaign
from harness.raw_http import ISSUE, last_words, open_connection, read_response, rpc_error
from harness.server import ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(server_env: dict[str, str]) -> Iterator[ServerProcess]:
    with ServerProcess(env=server_env) as proc:
        yield proc


@pytest.fixture(scope="module")
async def campaign(server: ServerProcess) -> str:
    async with connect_client(server.url) as client:
        return (await create_campaign(client, total=1_000_000, name="lane")).id


def body(campaign_id: str, user_id: str) -> bytes:
    return json.dumps({"campaignId": campaign_id, "userId": user_id}).encode()


def request(
    payload: bytes, fields: list[str] | None = None, *, line: str = f"POST {ISSUE} HTTP/1.1"
) -> bytes:
    if fields is None:
        fields = ["Host: test", "Content-Type: application/json"]
        fields.append(f"Content-Length: {len(payload)}")
    return (line + "\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n").encode() + payload


# name -> fields; {n} is the body's length. Each request is of a user of its own.
CASES: dict[str, list[str]] = {
    "common": ["Host: test", "Content-Type: application/json", "Content-Length: {n}"],
    "names in any case": ["HOST: test", "content-TYPE: application/json", "CONTENT-LENGTH: {n}"],
    "no spaces, tabs": ["Host:test", "Content-Type:\tapplication/json", "Content-Length:{n}  "],
    "content type with parameters": [
        "Host: test",
        "Content-Type: application/json; charset=utf-8",
        "Content-Length: {n}",
    ],
    "identity encoding": [
        "Host: test",
        "Content-Type: application/json",
        "Content-Encoding: identity",
        "Content-Length: {n}",
    ],
    "many other fields": [
        "Host: test",
        "User-Agent: test/1.0",
        "Accept: */*",
        "Accept-Encoding: gzip, br",
        "Connect-Protocol-Version: 1",
        "X-Request-Id: abc-123",
        "Content-Type: application/json",
        "Content-Length: {n}",
    ],
    "keep-alive": [
        "Host: test",
        "Connection: keep-alive",
        "Content-Type: application/json",
        "Content-Length: {n}",
    ],
    "close": [
        "Host: test",
        "Connection: close",
        "Content-Type: application/json",
        "Content-Length: {n}",
    ],
    "two lengths": [
        "Host: test",
        "Content-Type: application/json",
        "Content-Length: {n}",
        "Content-Length: {n}",
    ],
    "two content types": [
        "Content-Type: application/proto",
        "Content-Type: application/json",
        "Content-Length: {n}",
    ],
    "space before the colon": [
        "Host: test",
        "Content-Type: application/json",
        "Content-Length : {n}",
    ],
    "a folded line": [
        "Host: test",
        "Content-Type: application/json",
        " folded",
        "Content-Length: {n}",
    ],
    "a field without a colon": [
        "Host: test",
        "Content-Type: application/json",
        "Bogus",
        "Content-Length: {n}",
    ],
    "a name with a bad character": [
        "Ho(st: test",
        "Content-Type: application/json",
        "Content-Length: {n}",
    ],
    "a control character": [
        "Host: te\x01st",
        "Content-Type: application/json",
        "Content-Length: {n}",
    ],
    "a negative length": ["Host: test", "Content-Type: application/json", "Content-Length: -{n}"],
    "a length with a sign": [
        "Host: test",
        "Content-Type: application/json",
        "Content-Length: +{n}",
    ],
    "chunked and a length": [
        "Host: test",
        "Content-Type: application/json",
        "Transfer-Encoding: chunked",
        "Content-Length: {n}",
    ],
    "gzip encoding": [
        "Host: test",
        "Content-Type: application/json",
        "Content-Encoding: gzip",
        "Content-Length: {n}",
    ],
    "a deadline": [
        "Host: test",
        "Content-Type: application/json",
        "Connect-Timeout-Ms: 5000",
        "Content-Length: {n}",
    ],
    "an origin": [
        "Host: test",
        "Origin: http://elsewhere.example",
        "Content-Type: application/json",
        "Content-Length: {n}",
    ],
    "protocol version 1": [
        "Host: test",
        "Connect-Protocol-Version: 1",
        "Content-Type: application/json",
        "Content-Length: {n}",
    ],
    "protocol version 2": [
        "Host: test",
        "Content-Type: application/json",
        "Connect-Protocol-Version: 2",
        "Content-Length: {n}",
    ],
    "an unknown content type": ["Host: test", "Content-Type: text/plain", "Content-Length: {n}"],
    "no content type": ["Host: test", "Content-Length: {n}"],
    "no length": ["Host: test", "Content-Type: application/json", "Connection: close"],
    "connection upgrade": [
        "Host: test",
        "Connection: upgrade",
        "Upgrade: foo",
        "Content-Type: application/json",
        "Content-Length: {n}",
    ],
}


async def answer(server: ServerProcess, raw: bytes, *, split: bool) -> tuple[int, str, bool]:
    """(status, Connect error code or "", whether the server then closed the connection)."""
    reader, writer = await open_connection(server.url)
    try:
        if split:
            cut = raw.index(b"\r\n") + 2  # the request line, then the rest
            writer.write(raw[:cut])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(raw[cut:])
        else:
            writer.write(raw)
        await writer.drain()
        try:
            response = await asyncio.wait_for(read_response(reader), 5)
        except (ConnectionError, asyncio.IncompleteReadError):
            return 0, "closed", True
        code = ""
        if response.status != 200 and response.body.startswith(b"{"):
            code = str(response.json().get("code", ""))
        closed = await last_words(reader, 0.3) is not None
        return response.status, code, closed
    finally:
        writer.close()


@pytest.mark.parametrize("case", CASES)
async def test_a_request_in_one_read_is_answered_as_the_parser_answers_it(
    server: ServerProcess, campaign: str, case: str
) -> None:
    answers = []
    # One read twice (the same fields: the second is read from the lane's memory of
    # them), then two reads; users of the same length, so the fields are the same.
    for n, split in enumerate((False, False, True)):
        payload = body(campaign, f"{case}-{n}")
        fields = [f.format(n=len(payload)) for f in CASES[case]]
        answers.append(await answer(server, request(payload, fields), split=split))
    assert answers[0] == answers[1] == answers[2], (
        f"{case}: one read {answers[:2]}, two {answers[2]}"
    )


async def test_the_lane_answers_the_common_request_and_closes_when_asked(
    server: ServerProcess, campaign: str
) -> None:
    # What the differential test above takes for granted: the common request succeeds.
    payload = body(campaign, "plain")
    assert await answer(server, request(payload), split=False) == (200, "", False)
    payload = body(campaign, "closing")
    fields = ["Host: t", "Connection: close", "Content-Type: application/json"]
    raw = request(payload, [*fields, f"Content-Length: {len(payload)}"])
    status, _, closed = await answer(server, raw, split=False)
    assert (status, closed) == (200, True)


@pytest.mark.parametrize(
    ("version", "expected"),
    [("1", (200, "")), ("2", (400, "invalid_argument")), ("", (400, "invalid_argument"))],
)
async def test_a_protocol_version_other_than_1_is_refused_whichever_way_it_is_read(
    server: ServerProcess, campaign: str, version: str, expected: tuple[int, str]
) -> None:
    """The Connect protocol has one version: a request that names another is refused, on
    the lane, through the parser and over HTTP/2, and issues nothing."""
    user = f"version-{version or 'empty'}"
    payload = body(campaign, user)
    fields = ["Host: t", "Content-Type: application/json", f"Content-Length: {len(payload)}"]
    raw = request(payload, [*fields, f"Connect-Protocol-Version: {version}"])
    for split in (False, True):
        status, code, _ = await answer(server, raw, split=split)
        assert (status, code) == expected, split
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as h2:
        response = await h2.post(
            server.url + ISSUE,
            content=payload,
            headers={"content-type": "application/json", "connect-protocol-version": version},
        )
    code = "" if response.status_code == 200 else response.json()["code"]
    assert (response.status_code, code) == expected
    async with connect_client(server.url) as client:
        mine = await client.list_user_coupons(coupon_pb.ListUserCouponsRequest(user_id=user))
    assert len(mine.coupons) == (1 if expected[0] == 200 else 0)


async def test_a_body_over_the_limit_in_one_write_is_refused_unread(
    server: ServerProcess, campaign: str
) -> None:
    """The body limit holds on the lane too: a request one byte over it, sent in one write
    (on loopback, usually one read), is `resource_exhausted`; never read for its fields,
    which would say `invalid_argument` (a user id far too long)."""
    for n in range(3):
        empty = body(campaign, "")
        payload = empty[:-2] + b"u" * (MAX_REQUEST_BYTES + 1 - len(empty)) + empty[-2:]
        assert len(payload) == MAX_REQUEST_BYTES + 1
        status, code, _ = await answer(server, request(payload), split=False)
        assert (status, code) == (429, "resource_exhausted"), n


async def test_requests_pipelined_in_one_read_are_each_answered_in_order(
    server: ServerProcess, campaign: str
) -> None:
    reader, writer = await open_connection(server.url)
    try:
        # Two requests in one write: not the lane's case (one request alone in a read).
        writer.write(request(body(campaign, "pipe-1")) + request(body(campaign, "pipe-2")))
        first = await read_response(reader)
        second = await read_response(reader)
        assert (first.status, second.status) == (200, 200)
        assert first.json()["coupon"] != second.json()["coupon"]
    finally:
        writer.close()


async def test_a_request_line_that_only_starts_like_the_lane_goes_to_the_parser(
    server: ServerProcess, campaign: str
) -> None:
    payload = body(campaign, "http10")
    fields = ["Host: t", "Content-Type: application/json", f"Content-Length: {len(payload)}"]
    raw = request(payload, fields, line=f"POST {ISSUE}x HTTP/1.1")
    one = await answer(server, raw, split=False)
    assert one == await answer(server, raw, split=True)
    assert one[0] == 404


def _cased(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper(), name.title()])


_VALUE_NOISE = st.text(
    alphabet=st.sampled_from(["a", " ", "\t", ";", "=", "\x00", "\x01", "\x7f", "\xe9"]),
    max_size=3,
)
# One field of a request: a part of what the lane reads, or anything else a client sends.
_FIELD = st.one_of(
    st.tuples(
        _cased("Content-Type"),
        st.sampled_from(
            [
                "application/json",
                "application/proto",
                "text/plain",
                "application/json; charset=utf-8",
            ]
        ),
    ),
    st.tuples(_cased("Content-Length"), st.sampled_from(["{n}", " {n} ", "+{n}", "{m}", "0{n}"])),
    st.tuples(
        _cased("Connection"), st.sampled_from(["keep-alive", "close", "Keep-Alive", "upgrade"])
    ),
    st.tuples(_cased("Content-Encoding"), st.sampled_from(["identity", "gzip", " identity"])),
    st.tuples(_cased("Transfer-Encoding"), st.sampled_from(["chunked", "identity"])),
    st.tuples(st.sampled_from(["X-Id", "user-agent", "accept", "x_1"]), _VALUE_NOISE),
    st.tuples(
        st.text(alphabet=st.sampled_from(["x", "-", "(", " ", "\t", "@", "\x01"]), max_size=3),
        st.just(" a"),
    ),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(extra=st.lists(_FIELD, max_size=2), order=st.randoms(use_true_random=False))
async def test_any_mix_of_fields_is_answered_in_one_read_as_the_parser_answers_it(
    server: ServerProcess, campaign: str, extra: list[tuple[str, str]], order: random.Random
) -> None:
    # The fields of a request the lane takes, and others (maybe contradicting them), in
    # any order.
    fields = [("Host", " test"), ("Content-Type", " application/json"), ("Content-Length", " {n}")]
    fields += extra
    order.shuffle(fields)
    answers = []
    for split in (False, True):
        payload = body(campaign, f"mix-{order.random()}-{split}")
        lines = [
            f"{name}:{value.format(n=len(payload), m=len(payload) - 1)}" for name, value in fields
        ]
        answers.append(await answer(server, request(payload, lines), split=split))
    assert answers[0] == answers[1], f"{fields}: one read {answers[0]}, two reads {answers[1]}"


# A Connect header of one value given twice -> the header the refusal names.
REPEATED: dict[str, tuple[list[str], str]] = {
    "two content types": (["Content-Type: application/proto"], "content-type"),
    "the same content type twice": (["Content-Type: application/json"], "content-type"),
    "protocol versions 1 and 2": (
        ["Connect-Protocol-Version: 1", "Connect-Protocol-Version: 2"],
        "connect-protocol-version",
    ),
    "protocol version 1 twice": (
        ["Connect-Protocol-Version: 1", "Connect-Protocol-Version: 1"],
        "connect-protocol-version",
    ),
    "two deadlines": (
        ["Connect-Timeout-Ms: 5000", "Connect-Timeout-Ms: 1"],
        "connect-timeout-ms",
    ),
    "two identity encodings": (
        ["Content-Encoding: identity", "Content-Encoding: identity"],
        "content-encoding",
    ),
}


@pytest.mark.parametrize("case", REPEATED)
async def test_a_connect_header_given_twice_is_refused_whichever_way_it_is_read(
    server: ServerProcess, campaign: str, case: str
) -> None:
    """A header of one value given twice would be read as its first value by one reader
    and its last by another: it is refused, naming the header, on the lane, through the
    parser and over HTTP/2, and issues nothing."""
    extra, header = REPEATED[case]
    user = f"repeated-{case}"
    payload = body(campaign, user)
    fields = ["Host: t", "Content-Type: application/json", *extra]
    raw = request(payload, [*fields, f"Content-Length: {len(payload)}"])
    for split in (False, False, True):
        status, code, _ = await answer(server, raw, split=split)
        assert (status, code) == (400, "invalid_argument"), (case, split)
    headers = [("content-type", "application/json")]
    headers += [tuple(f.lower().split(": ", 1)) for f in extra]  # type: ignore[misc]
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as h2:
        response = await h2.post(server.url + ISSUE, content=payload, headers=headers)
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_argument"
    assert header in response.json()["message"]
    async with connect_client(server.url) as client:
        mine = await client.list_user_coupons(coupon_pb.ListUserCouponsRequest(user_id=user))
    assert not mine.coupons


async def test_a_repeated_header_is_refused_in_the_callers_protocol(
    server: ServerProcess, campaign: str
) -> None:
    """Off IssueCoupon too, and in the protocol the caller speaks: gRPC-Web reads the
    refusal from grpc-status."""
    envelope = b"\x00\x00\x00\x00\x00"  # an empty message: refused before it is read
    media = "application/grpc-web+proto"
    path = "/coupon.v1.CouponService/GetCampaign"
    headers = [("content-type", media), ("x-grpc-web", "1"), ("grpc-timeout", "5S")]
    headers.append(("grpc-timeout", "1S"))
    async with httpx.AsyncClient(http1=True, http2=False, timeout=10) as h1:
        response = await h1.post(server.url + path, content=envelope, headers=headers)
    assert rpc_error(response.status_code, dict(response.headers), response.content, media) == (
        "invalid_argument",
        "the grpc-timeout header is given more than once",
    )
    json_headers = [("content-type", "application/json")] * 2
    async with httpx.AsyncClient(http1=True, http2=False, timeout=10) as h1:
        response = await h1.post(
            server.url + path, content=json.dumps({"campaignId": campaign}), headers=json_headers
        )
    assert response.status_code == 400
    assert response.json()["message"] == "the content-type header is given more than once"
