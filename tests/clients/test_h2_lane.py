"""IssueCoupon's common Connect request over HTTP/2, which the h2 protocol answers itself
(no task, no ASGI cycle: http/h2.py's lane), frame by frame against a real server: bodies
in pieces, resets before and after the request arrived whole, answers the client's window
holds back, the request time-out, graceful shutdown, and what does not take the lane."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, GoAwayFrame

from coupon.gen.coupon.v1 import coupon_pb
from harness.private_redis import PrivateRedis
from harness.server import ServerProcess
from tests.clients.h2client import CODEC, SERVICE, H2Client, Response

pytestmark = pytest.mark.e2e

REQUEST_TIMEOUT = 2


def start_server(tmp_path: Path, **env: str) -> ServerProcess:
    proc = ServerProcess(env=env, in_memory=True, log_dir=tmp_path)
    proc.wait_ready()
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("h2-lane"),
        COUPON_REQUEST_TIMEOUT_SECONDS=str(REQUEST_TIMEOUT),
    )
    try:
        yield proc
    finally:
        proc.stop()


def connect_headers(
    content_type: bytes, length: int, *extra: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"localhost"),
        (b":path", (SERVICE + "IssueCoupon").encode()),
        (b"content-type", content_type),
        (b"content-length", str(length).encode()),
        *extra,
    ]


def body_of(campaign_id: str, user: str, *, binary: bool) -> tuple[bytes, bytes]:
    request = coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id=user)
    if binary:
        return b"application/proto", CODEC.encode(request)
    return b"application/json", json.dumps({"campaignId": campaign_id, "userId": user}).encode()


def start_issue(
    client: H2Client,
    campaign_id: str,
    user: str,
    *,
    binary: bool = False,
    pieces: int = 1,
    send: float = 1.0,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> int:
    """An IssueCoupon stream: its body in `pieces` DATA frames, of which the first `send`
    share is sent (the rest left for later: `finish`)."""
    content_type, body = body_of(campaign_id, user, binary=binary)
    stream_id = client.conn.get_next_available_stream_id()
    client.responses[stream_id] = Response()
    if not body:
        client.conn.send_headers(stream_id, connect_headers(content_type, 0), end_stream=True)
        client.flush()
        return stream_id
    client.conn.send_headers(stream_id, connect_headers(content_type, len(body), *extra))
    cut = int(len(body) * send)
    step = max(1, -(-cut // pieces)) if cut else 1
    for i in range(0, cut, step):
        part = body[i : min(i + step, cut)]
        client.conn.send_data(stream_id, part, end_stream=i + len(part) == len(body))
    client.flush()
    return stream_id


def finish(client: H2Client, stream_id: int, campaign_id: str, user: str) -> None:
    _, body = body_of(campaign_id, user, binary=False)
    sent = int(len(body) * 0.5)
    client.send(stream_id, body[sent:])


def create_campaign(port: int, total: int) -> str:
    response = httpx.post(
        f"http://127.0.0.1:{port}/coupon.v1.CouponService/CreateCampaign",
        json={"name": "lane", "totalCoupons": total, "startsAt": "2026-01-01T00:00:00Z"},
        timeout=10,
    )
    response.raise_for_status()
    return str(response.json()["campaign"]["id"])


def coupon_of(response: Response) -> dict[str, object]:
    assert response.headers[b":status"] == b"200", response
    assert (
        response.headers.get(b"content-length", str(len(response.body)).encode())
        == str(len(response.body)).encode()
    )
    answer: dict[str, object] = json.loads(response.body)
    return answer


def test_many_streams_at_once_each_body_in_pieces(server: ServerProcess) -> None:
    campaign_id = create_campaign(server.port, 100)
    with H2Client(server.port) as client:
        users = [f"lane-{i}" for i in range(100)]
        streams = [
            start_issue(client, campaign_id, u, binary=i % 2 == 1, pieces=1 + i % 3)
            for i, u in enumerate(users)
        ]
        responses = client.wait(*streams)
        codes = set()
        for i, response in enumerate(responses):
            if i % 2:
                assert response.headers[b"content-type"] == b"application/proto"
                decoded = CODEC.decode(response.body, coupon_pb.IssueCouponResponse)
                assert decoded.coupon is not None and not decoded.already_issued
                codes.add(decoded.coupon.code)
            else:
                coupon = coupon_of(response)["coupon"]
                assert isinstance(coupon, dict)
                codes.add(coupon["code"])
        assert len(codes) == 100
        # Sold out: the refusal, in the same words as over HTTP/1.1; a holder is answered.
        [late, again] = client.wait(
            start_issue(client, campaign_id, "one-too-many"),
            start_issue(client, campaign_id, users[0]),
        )
        assert late.headers[b":status"] == b"429"
        assert json.loads(late.body)["code"] == "resource_exhausted"
        assert coupon_of(again)["alreadyIssued"] is True
        assert client.goaway is None


def test_streams_reset_before_their_bodies_ended_leave_nothing_behind(
    server: ServerProcess,
) -> None:
    """The stream limit counts unanswered streams: a reset one left behind would hold a
    place for good, and the next hundred would be refused (REFUSED_STREAM)."""
    campaign_id = create_campaign(server.port, 1000)
    with H2Client(server.port) as client:
        # A hundred resets: the most the connection allows before it takes them for an
        # attack (h2.RESET_BUDGET), and every place the stream limit has.
        half = [start_issue(client, campaign_id, f"gone-{s}", send=0.5) for s in range(100)]
        for stream_id in half:
            client.reset(stream_id)
        streams = [start_issue(client, campaign_id, f"after-{i}") for i in range(100)]
        responses = client.wait(*streams)
        assert all(r.reset is None for r in responses)
        assert all(coupon_of(r)["coupon"] for r in responses)
        # Nothing was issued to the ones that left before their requests arrived whole.
        [gone] = client.wait(start_issue(client, campaign_id, "gone-0"))
        assert "alreadyIssued" not in coupon_of(gone)
    assert "Traceback" not in server.log()


def test_a_stream_reset_once_its_request_arrived_keeps_its_coupon(server: ServerProcess) -> None:
    campaign_id = create_campaign(server.port, 10)
    with H2Client(server.port) as client:
        stream_id = start_issue(client, campaign_id, "leaves-early")
        client.reset(stream_id)
        deadline = time.monotonic() + 10
        while True:  # the answer may have crossed the reset; either way it was issued
            [retry] = client.wait(start_issue(client, campaign_id, "leaves-early"))
            if coupon_of(retry).get("alreadyIssued") or time.monotonic() > deadline:
                break
        assert coupon_of(retry)["alreadyIssued"] is True


def test_an_answer_the_window_holds_back_goes_out_as_it_opens(server: ServerProcess) -> None:
    campaign_id = create_campaign(server.port, 10)
    with H2Client(server.port, window=0) as client:
        stream_id = start_issue(client, campaign_id, "shut-window")
        response = client.responses[stream_id]
        while not response.headers:
            client.read()
        assert response.headers[b":status"] == b"200" and response.body == b""
        client.conn.increment_flow_control_window(65_535, stream_id=stream_id)
        client.flush()
        [response] = client.wait(stream_id)
        assert coupon_of(response)["coupon"]


def test_an_answer_the_window_never_lets_through_is_reset_and_kept(
    server: ServerProcess,
) -> None:
    campaign_id = create_campaign(server.port, 10)
    with H2Client(server.port, window=0) as client:
        client.sock.settimeout(REQUEST_TIMEOUT + 10)
        started = time.monotonic()
        [stuck] = client.wait(start_issue(client, campaign_id, "never-reads"))
        assert stuck.reset == ErrorCodes.CANCEL
        assert REQUEST_TIMEOUT - 0.5 < time.monotonic() - started < REQUEST_TIMEOUT + 8
        retry = start_issue(client, campaign_id, "never-reads")
        client.conn.increment_flow_control_window(65_535, stream_id=retry)
        client.flush()
        [again] = client.wait(retry)
        assert coupon_of(again)["alreadyIssued"] is True


def test_a_request_that_never_arrives_whole_is_reset_after_the_request_timeout(
    server: ServerProcess,
) -> None:
    campaign_id = create_campaign(server.port, 10)
    with H2Client(server.port) as client:
        client.sock.settimeout(REQUEST_TIMEOUT + 10)
        started = time.monotonic()
        [response] = client.wait(start_issue(client, campaign_id, "half-sent", send=0.5))
        assert response.reset == ErrorCodes.CANCEL
        assert REQUEST_TIMEOUT - 0.5 < time.monotonic() - started < REQUEST_TIMEOUT + 8
        [later] = client.wait(start_issue(client, campaign_id, "half-sent"))
        assert "alreadyIssued" not in coupon_of(later)


def test_requests_the_lane_does_not_take_are_answered_alike(server: ServerProcess) -> None:
    """An empty body, a bad field, a deadline header (the Connect app's): the same Connect
    errors and answers as over HTTP/1.1."""
    campaign_id = create_campaign(server.port, 10)
    with H2Client(server.port) as client:
        stream_id = client.conn.get_next_available_stream_id()
        client.responses[stream_id] = Response()
        client.conn.send_headers(
            stream_id, connect_headers(b"application/json", 0), end_stream=True
        )
        client.flush()
        [empty] = client.wait(stream_id)
        assert empty.headers[b":status"] == b"400"
        assert json.loads(empty.body)["code"] == "invalid_argument"
        [bad] = client.wait(start_issue(client, "not-a-uuid", "u"))
        assert bad.headers[b":status"] == b"400"
        assert "campaign_id" in json.loads(bad.body)["message"]
        [timed] = client.wait(
            start_issue(
                client, campaign_id, "with-deadline", extra=((b"connect-timeout-ms", b"5000"),)
            )
        )
        assert coupon_of(timed)["coupon"]


def test_graceful_shutdown_answers_a_stream_whose_body_comes_after_it(tmp_path: Path) -> None:
    proc = start_server(tmp_path)
    try:
        campaign_id = create_campaign(proc.port, 5)
        client = H2Client(proc.port)
        open_stream = start_issue(client, campaign_id, "last-one-in", send=0.5)
        client.conn.ping(b"shutdown")
        client.flush()
        while not any(getattr(e, "ping_data", None) == b"shutdown" for e in client.read()):
            pass  # the server has seen the stream once it answers the ping behind it
        proc.signal(signal.SIGTERM)
        frames = client.raw_frames()
        goaway = next(f for f in frames if isinstance(f, GoAwayFrame))
        assert goaway.last_stream_id == open_stream
        # h2 (client side) sends nothing after a GOAWAY: the rest of the body goes raw.
        _, body = body_of(campaign_id, "last-one-in", binary=False)
        client.raw_data(open_stream, body[int(len(body) * 0.5) :])
        data = b""
        for frame in frames:
            if isinstance(frame, DataFrame) and frame.stream_id == open_stream:
                data += frame.data
            if frame.stream_id == open_stream and "END_STREAM" in frame.flags:
                break
        assert json.loads(data)["coupon"]["userId"] == "last-one-in"
        client.close()
        assert proc.process.wait(timeout=45) == 0
        assert "timeout graceful shutdown exceeded" not in proc.log()
        assert "Traceback" not in proc.log()
    finally:
        proc.stop()


def test_a_reset_in_the_same_read_as_the_request_it_ends_leaves_the_connection_serving(
    server: ServerProcess,
) -> None:
    """An answer made at once (here: unreadable input, and sold out from memory) is written
    while the read that ended the request is still being handled: a RST_STREAM later in the
    same read had closed the stream in h2, and writing to it ended the whole connection
    (and every other stream on it) with no GOAWAY."""
    campaign_id = create_campaign(server.port, 1)
    with H2Client(server.port) as client:
        [first] = client.wait(start_issue(client, campaign_id, "first"))
        assert coupon_of(first)["coupon"]
        for body in (b"{}", json.dumps({"campaignId": campaign_id, "userId": "late"}).encode()):
            for _ in range(3):
                stream_id = client.conn.get_next_available_stream_id()
                client.conn.send_headers(stream_id, connect_headers(b"application/json", len(body)))
                client.conn.send_data(stream_id, body, end_stream=True)
                client.conn.reset_stream(stream_id)
                client.flush()  # HEADERS, DATA and RST_STREAM in one write
        [after] = client.wait(start_issue(client, campaign_id, "first"))
        assert coupon_of(after)["alreadyIssued"] is True
        assert client.goaway is None
    assert "Fatal error" not in server.log() and "Traceback" not in server.log()


def test_a_value_the_app_built_from_the_request_goes_out_without_surrounding_space(
    server: ServerProcess,
) -> None:
    """An unknown method's path ending in a space (%20) is in its grpc-message: a field
    value with a space around it is malformed (RFC 9113, 8.2.1), and h2-based clients
    (this one) end the connection for it."""
    with H2Client(server.port) as client:
        stream_id = client.request(
            b"/coupon.v1.CouponService/Nope%20", b"application/grpc ;a=b", b"\x00" * 5
        )
        [answer] = client.wait(stream_id)
    assert answer.grpc_status == b"12", answer
    assert not answer.headers[b"content-type"].endswith(b" ")
    message = answer.headers.get(b"grpc-message", answer.trailers.get(b"grpc-message", b""))
    assert message.startswith(b"unknown method") and not message.endswith(b" "), answer


def test_the_lanes_log_lines_carry_the_first_request_id_as_over_http_1_1(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    redis = PrivateRedis()
    try:
        env = {**server_env, "REDIS_URL": redis.url}
        with ServerProcess(env=env, log_dir=tmp_path) as proc:
            campaign_id = create_campaign(proc.port, 5)
            redis.kill()  # so that the request fails, in a log line
            with H2Client(proc.port) as client:
                [answer] = client.wait(
                    start_issue(
                        client,
                        campaign_id,
                        "logged",
                        extra=((b"x-request-id", b"  RID-FIRST "), (b"x-request-id", b"RID-2")),
                    )
                )
            assert answer.headers[b":status"] == b"503", answer
            entries = proc.log_entries()
            ids = {e.get("request_id") for e in entries if "request_id" in e}
            assert "RID-FIRST" in ids and "RID-2" not in ids, ids
    finally:
        redis.kill()
