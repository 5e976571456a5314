"""The HTTP/2 side of the port, frame by frame, against real server processes: flow control
with a page larger than the client's window, many streams at once, a peer's reset, limits,
graceful shutdown that finishes an open stream, the idle timeout, TLS with ALPN, and the
first-bytes sniffing that tells HTTP/2 from HTTP/1.1."""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame

from coupon.gen.coupon.v1 import coupon_pb
from harness.client import in_seconds
from harness.raw_http import rpc_error
from harness.server import ServerProcess
from tests.clients.conftest import ROOT, buf_curl, node_calls
from tests.clients.h2client import (
    CODEC,
    SERVICE,
    H2Client,
    Response,
    grpc_frame,
    grpc_headers,
    grpc_message,
    headers_frame,
)

pytestmark = pytest.mark.e2e

# connect-es's transports, each with JSON and binary messages.
NODE_TRANSPORTS = [
    pytest.param(transport, binary, id=f"{transport}-{'binary' if binary else 'json'}")
    for transport in ("connect", "grpc", "grpcweb")
    for binary in (False, True)
]


def start_server(tmp_path: Path, **env: str) -> ServerProcess:
    # Idle connections close after 5 s here (75 s by default), so a test can wait for it.
    env = {"COUPON_KEEPALIVE_SECONDS": "5", **env}
    proc = ServerProcess(env=env, in_memory=True, log_dir=tmp_path)
    proc.wait_ready()
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("h2"))
    try:
        yield proc
    finally:
        proc.stop()


def create_campaign(client: H2Client, total: int) -> str:
    response = client.call(
        "CreateCampaign",
        coupon_pb.CreateCampaignRequest(name="h2", total_coupons=total, starts_at=in_seconds(-60)),
        coupon_pb.CreateCampaignResponse,
    )
    assert response.campaign is not None
    return response.campaign.id


def issue_request(campaign_id: str, user: str) -> bytes:
    return grpc_frame(coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id=user))


def issue_all(client: H2Client, campaign_id: str, users: list[str]) -> list[Response]:
    """Every request on its own stream, all of them open at once."""
    streams = [client.start("IssueCoupon", issue_request(campaign_id, u)) for u in users]
    return client.wait(*streams)


def stops_gracefully(proc: ServerProcess) -> None:
    """SIGTERM ends the server with status 0 and no stream left behind (a stream whose task
    never ended would hold shutdown until its timeout and be cancelled)."""
    proc.signal(signal.SIGTERM)
    assert proc.process.wait(timeout=45) == 0
    assert "timeout graceful shutdown exceeded" not in proc.log()
    assert "Traceback" not in proc.log()


def test_many_streams_at_once_on_one_connection(server: ServerProcess) -> None:
    client = H2Client(server.port)
    try:
        campaign_id = create_campaign(client, total=100)
        assert client.conn.remote_settings.max_concurrent_streams == 100
        responses = issue_all(client, campaign_id, [f"user-{i}" for i in range(100)])
        assert all(r.grpc_status == b"0" for r in responses)
        coupons = [grpc_message(r.body, coupon_pb.IssueCouponResponse).coupon for r in responses]
        assert len({c.code for c in coupons if c is not None}) == 100
    finally:
        client.close()


def test_a_page_larger_than_the_window_waits_for_window_updates(server: ServerProcess) -> None:
    users = [f"reader-{i:04d}" for i in range(1500)]
    client = H2Client(server.port)
    try:
        campaign_id = create_campaign(client, total=len(users))
        for i in range(0, len(users), 100):
            assert all(
                r.grpc_status == b"0" for r in issue_all(client, campaign_id, users[i : i + 100])
            )
    finally:
        client.close()

    window = 8192
    reader = H2Client(server.port, window=window, auto_acknowledge=False)
    try:
        request = coupon_pb.GetCampaignRequest(campaign_id=campaign_id, page_size=len(users))
        stream_id = reader.start("GetCampaign", grpc_frame(request))
        response = reader.responses[stream_id]
        # Nothing acknowledged: the server may send exactly one window (h2 raises on a
        # byte more), then must wait.
        while len(response.body) < window:
            reader.read()
        assert len(response.body) == window and not response.ended
        reader.acknowledge(stream_id, window)
        reader.auto_acknowledge = True
        [response] = reader.wait(stream_id)
    finally:
        reader.close()
    assert response.grpc_status == b"0"
    assert len(response.body) > 10 * window
    page = grpc_message(response.body, coupon_pb.GetCampaignResponse)
    assert [c.user_id for c in page.coupons] == users


def test_a_reset_stream_ends_and_the_connection_goes_on(tmp_path: Path) -> None:
    proc = start_server(tmp_path)
    try:
        client = H2Client(proc.port, window=1024, auto_acknowledge=False)
        campaign_id = create_campaign(client, total=50)
        for response in issue_all(client, campaign_id, [f"u{i}" for i in range(50)]):
            assert response.grpc_status == b"0"
        # A response stuck on an exhausted window, then reset by the client.
        stuck = client.start(
            "GetCampaign", grpc_frame(coupon_pb.GetCampaignRequest(campaign_id=campaign_id))
        )
        while len(client.responses[stuck].body) < 1024:
            client.read()
        client.reset(stuck)
        # A request whose body never finishes, reset too.
        unfinished = client.start("IssueCoupon", issue_request(campaign_id, "late")[:4], end=False)
        client.reset(unfinished)
        # The connection still serves.
        client.auto_acknowledge = True
        again = client.call(
            "IssueCoupon",
            coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id="u1"),
            coupon_pb.IssueCouponResponse,
        )
        assert again.already_issued
        client.close()
        stops_gracefully(proc)
    finally:
        proc.stop()


def test_rapid_reset_is_answered_with_goaway_and_the_server_serves_on(tmp_path: Path) -> None:
    """CVE-2023-44487: thousands of streams, each opened (a whole IssueCoupon request) and
    reset at once, end the connection with GOAWAY ENHANCE_YOUR_CALM rather than keep the
    worker busy on requests nobody waits for; the next client is answered at once."""
    proc = start_server(tmp_path)
    try:
        with H2Client(proc.port) as setup:
            campaign_id = create_campaign(setup, total=10)
        attacker = H2Client(proc.port)
        attacker.sock.settimeout(10)
        body = issue_request(campaign_id, "nobody")
        # Read as it goes: the server closes with these bytes unsent, so its kernel answers
        # them with a TCP reset, which drops whatever the attacker had not read.
        received = bytearray()
        with contextlib.suppress(OSError):  # closed by the server meanwhile
            for first in range(1, 4001, 100):
                # 50 streams a write, past h2's state machine (it would stop at its
                # connection window): each reset as soon as it is sent.
                frames = b""
                for stream_id in range(first, first + 100, 2):
                    reset = RstStreamFrame(stream_id)
                    reset.error_code = ErrorCodes.CANCEL
                    frames += headers_frame(attacker, stream_id, "IssueCoupon").serialize()
                    frames += DataFrame(stream_id, body, flags=["END_STREAM"]).serialize()
                    frames += reset.serialize()
                attacker.sock.sendall(frames)
                if select.select([attacker.sock], [], [], 0)[0]:
                    received += attacker.sock.recv(65_536)
            while data := attacker.sock.recv(65_536):
                received += data
        attacker.close()
        answer = FrameBuffer(server=False)
        answer.max_frame_size = attacker.conn.max_inbound_frame_size
        answer.add_data(bytes(received))
        goaways = [f for f in answer if isinstance(f, GoAwayFrame)]
        assert [g.error_code for g in goaways] == [ErrorCodes.ENHANCE_YOUR_CALM]
        assert proc.metric("coupon_connections_closed_total", reason="abuse") == 1

        started = time.monotonic()
        with H2Client(proc.port) as client:
            answer = client.call(
                "IssueCoupon",
                coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id="next"),
                coupon_pb.IssueCouponResponse,
            )
        assert answer.coupon is not None
        assert time.monotonic() - started < 2
        stops_gracefully(proc)
    finally:
        proc.stop()


def test_a_client_that_cancels_some_streams_is_not_cut_off(server: ServerProcess) -> None:
    """More resets than the budget, but no more than the streams answered beside them (a
    client cancelling calls whose deadlines passed): the connection goes on."""
    with H2Client(server.port) as client:
        campaign_id = create_campaign(client, total=200)
        for round_ in range(3):
            users = [f"cancels-{round_}-{i}" for i in range(50)]
            assert all(r.grpc_status == b"0" for r in issue_all(client, campaign_id, users))
            for i in range(50):
                # Some whole requests, some whose body never comes: all cancelled.
                body = issue_request(campaign_id, f"cancelled-{round_}-{i}")
                client.reset(client.start("IssueCoupon", body if i % 2 else body[:3], end=i % 2))
        answer = client.call(
            "IssueCoupon",
            coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id="still-served"),
            coupon_pb.IssueCouponResponse,
        )
        assert answer.coupon is not None and not answer.already_issued
        assert client.goaway is None


REQUEST_TIMEOUT = 2


@pytest.fixture(scope="module")
def short_timeouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("h2-timeouts"),
        COUPON_REQUEST_TIMEOUT_SECONDS=str(REQUEST_TIMEOUT),
        COUPON_KEEPALIVE_SECONDS=str(REQUEST_TIMEOUT),
    )
    try:
        yield proc
    finally:
        proc.stop()


def serves_meanwhile(port: int, seconds: float) -> None:
    """Calls on another connection are answered while a stream waits for its time-out."""
    until = time.monotonic() + seconds
    i = 0
    with H2Client(port) as other:
        campaign_id = create_campaign(other, total=100)
        while time.monotonic() < until:
            answer = other.call(
                "IssueCoupon",
                coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id=f"other-{i}"),
                coupon_pb.IssueCouponResponse,
            )
            assert answer.coupon is not None
            i += 1
            time.sleep(0.2)


def test_a_request_that_never_arrives_whole_is_reset_after_the_request_timeout(
    short_timeouts: ServerProcess,
) -> None:
    """Slowloris over HTTP/2: a stream whose HEADERS came without the rest (no body, or part
    of it) is reset (CANCEL) after COUPON_REQUEST_TIMEOUT_SECONDS, and its connection, left
    with no stream, closes on its idle timer as any other."""
    with H2Client(short_timeouts.port) as setup:
        campaign_id = create_campaign(setup, total=100)
    client = H2Client(short_timeouts.port)
    try:
        started = time.monotonic()
        headers_only = client.start("IssueCoupon", end=False)
        part = client.start("IssueCoupon", issue_request(campaign_id, "slow")[:4], end=False)
        serves_meanwhile(short_timeouts.port, REQUEST_TIMEOUT - 0.5)
        client.sock.settimeout(REQUEST_TIMEOUT + 3)
        responses = client.wait(headers_only, part)
        assert [r.reset for r in responses] == [ErrorCodes.CANCEL] * 2
        assert not any(r.headers for r in responses)
        assert REQUEST_TIMEOUT - 0.5 < time.monotonic() - started < REQUEST_TIMEOUT + 2
        while client.goaway is None:
            client.read()  # then idle (keep-alive 2 s here): closed with a GOAWAY
        assert client.goaway.error_code == ErrorCodes.NO_ERROR
        assert client.goaway.last_stream_id == part
    finally:
        client.close()
    assert "Traceback" not in short_timeouts.log()


def test_a_response_the_client_never_lets_through_is_reset_after_the_request_timeout(
    short_timeouts: ServerProcess,
) -> None:
    """A client whose stream window stays shut (SETTINGS_INITIAL_WINDOW_SIZE 0, never
    opened) keeps no answer waiting: after COUPON_REQUEST_TIMEOUT_SECONDS without a byte of
    it sent, its stream is reset (CANCEL), while the same connection's other streams, old and
    new, are answered. The coupon it was issued stays issued: the retry gets it back."""
    with H2Client(short_timeouts.port) as setup:
        campaign_id = create_campaign(setup, total=100)
    client = H2Client(short_timeouts.port, window=0)
    client.sock.settimeout(REQUEST_TIMEOUT + 10)
    try:
        started = time.monotonic()
        stuck = client.start("IssueCoupon", issue_request(campaign_id, "never-reads"))
        served = client.start("IssueCoupon", issue_request(campaign_id, "reads"))
        client.conn.increment_flow_control_window(65_535, stream_id=served)
        client.flush()
        [answer] = client.wait(served)
        assert answer.grpc_status == b"0", answer
        [response] = client.wait(stuck)
        assert response.reset == ErrorCodes.CANCEL
        assert response.headers[b":status"] == b"200" and response.body == b""
        assert REQUEST_TIMEOUT - 0.5 < time.monotonic() - started < REQUEST_TIMEOUT + 8
        retry = client.start("IssueCoupon", issue_request(campaign_id, "never-reads"))
        client.conn.increment_flow_control_window(65_535, stream_id=retry)
        client.flush()
        [again] = client.wait(retry)
        assert again.grpc_status == b"0", again
        coupon = grpc_message(again.body, coupon_pb.IssueCouponResponse)
        assert coupon.already_issued and coupon.coupon is not None
        assert client.goaway is None
    finally:
        client.close()
    assert "Traceback" not in short_timeouts.log()


def test_a_slow_reader_that_keeps_opening_its_window_gets_its_whole_response(
    short_timeouts: ServerProcess,
) -> None:
    """The send time-out counts from the response's last byte sent, not from its first: a
    window opened a little at a time (less than a frame), each step within the time-out,
    lets a response through that takes several time-outs in all."""
    users = [f"slow-reader-{i:03d}" for i in range(100)]
    with H2Client(short_timeouts.port) as setup:
        campaign_id = create_campaign(setup, total=len(users))
        assert all(r.grpc_status == b"0" for r in issue_all(setup, campaign_id, users))
    step = 1000
    reader = H2Client(short_timeouts.port, window=step, auto_acknowledge=False)
    reader.sock.settimeout(REQUEST_TIMEOUT + 10)
    try:
        started = time.monotonic()
        request = coupon_pb.GetCampaignRequest(campaign_id=campaign_id, page_size=len(users))
        stream_id = reader.start("GetCampaign", grpc_frame(request))
        response = reader.responses[stream_id]
        granted = step
        while not (response.ended or response.reset is not None):
            if len(response.body) < granted:
                reader.read()
                continue
            assert len(response.body) == granted
            time.sleep(REQUEST_TIMEOUT / 2)  # half the time-out: a wide margin
            reader.conn.increment_flow_control_window(step, stream_id=stream_id)
            reader.conn.increment_flow_control_window(step)
            reader.flush()
            granted += step
        elapsed = time.monotonic() - started
    finally:
        reader.close()
    assert response.reset is None and response.grpc_status == b"0", response
    assert elapsed > 2 * REQUEST_TIMEOUT
    page = grpc_message(response.body, coupon_pb.GetCampaignResponse)
    assert [c.user_id for c in page.coupons] == users


def tcp_state(sock: socket.socket) -> int:
    """The socket's TCP state, from TCP_INFO (1: established)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def test_a_client_that_stops_reading_its_socket_is_closed(short_timeouts: ServerProcess) -> None:
    """A client that asks for large answers, with windows wide open, and never reads its
    socket fills the server's buffers: the connection is closed once the server has written
    nothing to it for COUPON_REQUEST_TIMEOUT_SECONDS, rather than held with its answers, and
    other clients are served meanwhile and after."""
    # 100 answers of 1,000 campaigns (about 27 MB): more than the kernel buffers on the way
    # (its send buffer grows to net.ipv4.tcp_wmem's maximum), so that the server's own fills.
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    if wmem_max > 16 * 1024 * 1024:
        pytest.skip(f"TCP send buffers of up to {wmem_max} bytes would take it all")
    with H2Client(short_timeouts.port) as setup:
        for _ in range(10):
            streams = [
                setup.start(
                    "CreateCampaign",
                    grpc_frame(
                        coupon_pb.CreateCampaignRequest(
                            name="n" * 200, total_coupons=1, starts_at=in_seconds(-60)
                        )
                    ),
                )
                for _ in range(100)
            ]
            assert all(r.grpc_status == b"0" for r in setup.wait(*streams))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", short_timeouts.port))
        conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        largest = 2**31 - 1
        conn.local_settings = Settings(
            client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: largest}
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(largest - 65_535)
        request = grpc_frame(coupon_pb.ListCampaignsRequest(page_size=1000))
        for _ in range(100):
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, grpc_headers("ListCampaigns", (b"te", b"trailers")))
            conn.send_data(stream_id, request, end_stream=True)
        sock.sendall(conn.data_to_send())
        # Never read from here on.
        serves_meanwhile(short_timeouts.port, REQUEST_TIMEOUT + 1)
        deadline = time.monotonic() + 4 * REQUEST_TIMEOUT + 10
        while tcp_state(sock) == 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tcp_state(sock) != 1, "the server still holds the connection"
    finally:
        sock.close()
    serves_meanwhile(short_timeouts.port, 0.5)
    assert "Traceback" not in short_timeouts.log()


def test_graceful_shutdown_finishes_an_open_stream_and_refuses_new_ones(tmp_path: Path) -> None:
    proc = start_server(tmp_path)
    try:
        client = H2Client(proc.port)
        campaign_id = create_campaign(client, total=5)
        body = issue_request(campaign_id, "last-one-in")
        open_stream = client.start("IssueCoupon", body[:3], end=False)
        client.conn.ping(b"shutdown")
        client.flush()
        while not any(getattr(e, "ping_data", None) == b"shutdown" for e in client.read()):
            pass  # the server has seen the stream once it answers the ping behind it

        proc.signal(signal.SIGTERM)
        frames = client.raw_frames()
        goaway = next(f for f in frames if isinstance(f, GoAwayFrame))
        assert goaway.error_code == ErrorCodes.NO_ERROR
        assert goaway.last_stream_id == open_stream

        refused_stream = open_stream + 2
        client.raw_headers(refused_stream, "IssueCoupon")
        refused = next(f for f in frames if isinstance(f, RstStreamFrame))
        assert (refused.stream_id, refused.error_code) == (
            refused_stream,
            ErrorCodes.REFUSED_STREAM,
        )

        client.raw_data(open_stream, body[3:])
        blocks: list[dict[bytes, bytes]] = []
        data = b""
        for frame in frames:
            if isinstance(frame, HeadersFrame) and frame.stream_id == open_stream:
                blocks.append(client.decode(frame))
            elif isinstance(frame, DataFrame) and frame.stream_id == open_stream:
                data += frame.data
            if frame.stream_id == open_stream and "END_STREAM" in frame.flags:
                break
        headers, trailers = blocks
        assert headers[b":status"] == b"200" and trailers[b"grpc-status"] == b"0"
        coupon = grpc_message(data, coupon_pb.IssueCouponResponse).coupon
        assert coupon is not None and coupon.user_id == "last-one-in"
        # With its last stream answered, the server says goodbye again and hangs up.
        assert any(isinstance(f, GoAwayFrame) for f in frames)
        client.close()
        assert proc.process.wait(timeout=45) == 0
        assert "timeout graceful shutdown exceeded" not in proc.log()
    finally:
        proc.stop()


def test_an_idle_connection_is_closed_with_goaway(server: ServerProcess) -> None:
    client = H2Client(server.port)
    try:
        create_campaign(client, total=1)
        while client.goaway is None:
            client.read()  # the keep-alive timeout (5 s here) applies to HTTP/2 too
        assert client.goaway.error_code == ErrorCodes.NO_ERROR
        with pytest.raises(ConnectionError):
            while True:
                client.read()
    finally:
        client.close()


def send_padded_request(client: H2Client, padding: int) -> int:
    """An IssueCoupon request whose header list is `padding` bytes longer (the padding is
    indexed: both sides' HPACK tables change with it)."""
    stream_id = client.conn.get_next_available_stream_id()
    # Literals without Huffman coding (as HPACK allows): this client's pure-Python Huffman
    # encoder takes seconds for 70 KB on a busy machine, long enough for the server's idle
    # timer to end a connection that has sent nothing yet.
    encoder = client.conn.encoder
    encoder.encode = functools.partial(type(encoder).encode, encoder, huffman=False)  # type: ignore[method-assign]
    client.conn.send_headers(
        stream_id, grpc_headers("IssueCoupon", (b"x-padding", b"x" * padding)), end_stream=True
    )
    client.responses[stream_id] = Response()
    client.flush()
    return stream_id


TOO_LARGE = "request headers are limited to 16384 bytes"


def test_a_header_list_over_the_limit_refuses_its_stream_alone(server: ServerProcess) -> None:
    """`resource_exhausted` on that stream, a gRPC trailers-only answer; the streams open
    beside it, and those after it, are answered on the same connection (the HPACK tables
    stay in step)."""
    client = H2Client(server.port)
    try:
        client.read()  # the server's SETTINGS, with its header list limit
        assert client.conn.remote_settings.max_header_list_size == 16 * 1024
        campaign_id = create_campaign(client, total=3)
        # Open, its body not yet ended, while the oversized request comes and goes.
        beside = client.start("IssueCoupon", issue_request(campaign_id, "beside"), end=False)
        refused_id = send_padded_request(client, 20_000)
        [refused] = client.wait(refused_id)
        client.send(beside, b"", end=True)
        [answered] = client.wait(beside)
        after = client.call(
            "IssueCoupon",
            coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id="after"),
            coupon_pb.IssueCouponResponse,
        )
    finally:
        client.close()
    assert refused.headers[b":status"] == b"200"
    assert refused.headers[b"content-type"] == b"application/grpc+proto"
    assert refused.grpc_status == b"8" and not refused.trailers and refused.body == b""
    assert refused.headers[b"grpc-message"] == TOO_LARGE.encode()
    assert answered.grpc_status == b"0"
    coupon = grpc_message(answered.body, coupon_pb.IssueCouponResponse).coupon
    assert coupon is not None and coupon.user_id == "beside"
    assert after.coupon is not None and after.coupon.user_id == "after"
    assert client.goaway is None


@pytest.mark.parametrize(
    ("path", "content_type", "expected"),
    [
        ("/healthz", "", (431, "text/plain; charset=utf-8", TOO_LARGE)),
        (
            "/coupon.v1.CouponService/IssueCoupon",
            "application/json",
            (429, "application/json", ("resource_exhausted", TOO_LARGE)),
        ),
        (
            "/coupon.v1.CouponService/ExportCoupons",
            "application/connect+proto",
            (200, "application/connect+proto", ("resource_exhausted", TOO_LARGE)),
        ),
        (
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "application/grpc-web-text",
            (200, "application/grpc-web-text", ("resource_exhausted", TOO_LARGE)),
        ),
        (
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            "application/grpc",
            (200, "application/grpc", ("resource_exhausted", TOO_LARGE)),
        ),
        (
            "/grpc.health.v1.Health/Check",
            "application/grpc",
            (200, "application/grpc", ("resource_exhausted", TOO_LARGE)),
        ),
    ],
    ids=["outside-the-api", "connect-unary", "connect-stream", "grpc-web-text", "grpc", "health"],
)
def test_a_header_list_over_the_limit_is_answered_in_the_callers_protocol(
    server: ServerProcess, path: str, content_type: str, expected: tuple[int, str, object]
) -> None:
    """Each answer read frame by frame as its protocol says (the body not sent: RST_STREAM
    NO_ERROR after the answer); plain 431 outside the API."""
    client = H2Client(server.port)
    try:
        stream_id = client.conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"localhost"),
            (b":path", path.encode()),
            *([(b"content-type", content_type.encode())] if content_type else []),
            (b"x-padding", b"x" * 20_000),
        ]
        client.conn.send_headers(stream_id, headers)
        client.responses[stream_id] = response = Response()
        client.flush()
        while not response.ended:
            client.read()
        while response.reset is None:
            client.read()
    finally:
        client.close()
    status, media, read = expected
    assert response.reset == ErrorCodes.NO_ERROR
    assert int(response.headers[b":status"]) == status
    answer = {k.decode(): v.decode() for k, v in response.headers.items()}
    assert answer["content-type"] == media
    if status == 431:
        assert response.body.decode() == read
    else:
        assert rpc_error(status, answer, response.body, content_type) == read


@pytest.mark.parametrize(("transport", "binary"), NODE_TRANSPORTS)
def test_connect_node_over_http2_reads_resource_exhausted_for_a_header_list_too_large(
    server: ServerProcess, transport: str, binary: bool
) -> None:
    """connect-es's own reading, unary and streaming; the connection serves on."""
    padded = {"x-padding": "$x*20000"}
    calls = [
        {"rpc": "IssueCoupon", "request": {"campaignId": "c", "userId": "u"}, "headers": padded},
        {"rpc": "ExportCoupons", "request": {"campaignId": "c"}, "headers": padded},
        {"rpc": "IssueCoupon", "request": {"campaignId": "c", "userId": "u"}},
    ]
    *refused, after = node_calls(server.url, transport, calls, binary=binary, http_version="2")
    for result in refused:
        assert result["error"] == {"code": "resource_exhausted", "message": TOO_LARGE}, result
        if transport != "connect":
            assert result["metadata"]["grpc-status"] == "8"
    assert after["error"]["code"] == "invalid_argument"  # read, and answered by the service


MAX_BODY = 64 * 1024
FRAME = 16 * 1024  # the largest DATA frame the server takes
ISSUE_PATH = SERVICE + "IssueCoupon"
EXPORT_PATH = SERVICE + "ExportCoupons"


def over_the_limit(size: int, *, declared: bool) -> str:
    """The refusal's message: the size a content-length declared, else at least what has
    arrived or what the first message's prefix says (the rest is never read)."""
    of = size if declared else f"at least {size}"
    return f"request body of {of} bytes is over the limit of {MAX_BODY} bytes"


def open_request(
    client: H2Client, path: str, content_type: str, *, length: int | None = None
) -> int:
    """A POST's headers, its body to follow (`length`: its content-length, None: none)."""
    stream_id = client.conn.get_next_available_stream_id()
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"localhost"),
        (b":path", path.encode()),
        (b"content-type", content_type.encode()),
        (b"te", b"trailers"),
    ]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    client.conn.send_headers(stream_id, headers)
    client.responses[stream_id] = Response()
    client.flush()
    return stream_id


def send_in_frames(client: H2Client, stream_id: int, body: bytes) -> bool:
    """`body` in DATA frames of FRAME bytes each (the last ending the stream), each as the
    windows allow, until the server answers. True: all of it sent."""
    response = client.responses[stream_id]
    sent = 0
    while sent < len(body):
        if response.ended or response.reset is not None:
            return False
        frame = body[sent : sent + FRAME]
        if client.conn.local_flow_control_window(stream_id) < len(frame):
            client.read()  # for the server's WINDOW_UPDATE, as the app reads
            continue
        client.conn.send_data(stream_id, frame, end_stream=sent + len(frame) == len(body))
        client.flush()
        sent += len(frame)
    return True


def refusal_read(client: H2Client, stream_id: int, *, client_ended: bool) -> Response:
    """The answer; a stream the client had not ended is then reset with NO_ERROR."""
    response = client.responses[stream_id]
    while not response.ended:
        client.read()
    if not client_ended:
        while response.reset is None:
            client.read()
        assert response.reset == ErrorCodes.NO_ERROR
    return response


def enveloped(size: int, declared: int | None = None) -> bytes:
    """A body of `size` bytes: one message after its prefix (gRPC's, gRPC-Web's, a Connect
    stream's), the prefix saying the body is `declared` bytes (`size` unless told)."""
    return struct.pack(">BI", 0, (declared or size) - 5) + b"\x00" * (size - 5)


def json_body(size: int) -> bytes:
    body = b'{"campaignId": "' + b"x" * (size - 18) + b'"}'
    assert len(body) == size
    return body


def assert_refused(response: Response, content_type: str, message: str, plain: int) -> None:
    """Read as the caller's protocol reads it (see test_a_header_list_over_the_limit_...);
    a gRPC answer trailers-only; `plain`: the HTTP status outside the API."""
    status = int(response.headers[b":status"])
    answer = {k.decode(): v.decode() for k, v in response.headers.items()}
    if plain:
        assert (status, answer["content-type"]) == (plain, "text/plain; charset=utf-8")
        assert response.body.decode() == f"request body is limited to {MAX_BODY} bytes"
        return
    if content_type.startswith("application/grpc"):
        assert not response.trailers and response.body == b"", "trailers-only"
    code = rpc_error(status, answer, response.body, content_type)
    assert code == ("resource_exhausted", message)


def still_serves(client: H2Client) -> bool:
    """The connection still serves: a call on a new stream is answered."""
    mine = open_request(client, SERVICE + "ListUserCoupons", "application/json")
    send_in_frames(client, mine, b'{"userId": "nobody"}')
    [response] = client.wait(mine)
    return response.headers.get(b":status") == b"200"


# The path, content type and HTTP status outside the API (0: on it) of each protocol.
BODY_REFUSALS = {
    "grpc": (ISSUE_PATH, "application/grpc", 0),
    "grpc-web": (ISSUE_PATH, "application/grpc-web+proto", 0),
    "connect-unary-json": (ISSUE_PATH, "application/json", 0),
    "connect-stream": (EXPORT_PATH, "application/connect+json", 0),
    "outside-the-api": ("/healthz", "application/json", 413),
}


@pytest.mark.parametrize("case", BODY_REFUSALS)
def test_a_body_declared_over_the_limit_is_refused_at_its_headers(
    server: ServerProcess, case: str
) -> None:
    """As over HTTP/1.1: refused before any of the body is sent, on its stream alone (the
    body need not follow: RST_STREAM NO_ERROR); the connection serves on."""
    path, content_type, plain = BODY_REFUSALS[case]
    client = H2Client(server.port)
    try:
        stream_id = open_request(client, path, content_type, length=MAX_BODY + 1)
        response = refusal_read(client, stream_id, client_ended=False)
        assert still_serves(client)
    finally:
        client.close()
    assert_refused(response, content_type, over_the_limit(MAX_BODY + 1, declared=True), plain)
    assert client.goaway is None


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("size", [MAX_BODY + 4_464, 3_000_000])
def test_curl_reads_the_refusal_of_a_body_over_the_limit(
    server: ServerProcess, tmp_path: Path, size: int
) -> None:
    """curl sends the body after the headers whatever the answer, and drops an answer
    whose stream is reset before it has sent it all: the rest of the body is read and
    dropped (up to 1 MiB, for a second) before the reset, so the answer reaches it."""
    body = tmp_path / "body.json"
    body.write_bytes(json_body(size))
    done = subprocess.run(
        ["curl", "-s", "--http2-prior-knowledge", "-w", "\n%{http_code}",
         "-H", "content-type: application/json", "--data-binary", f"@{body}",
         server.url + ISSUE_PATH],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    answer, status = done.stdout.rsplit("\n", 1)
    assert status == "429", (done.returncode, done.stdout, done.stderr)
    assert json.loads(answer)["code"] == "resource_exhausted"


def test_a_refused_body_that_goes_on_and_on_is_reset(server: ServerProcess) -> None:
    """What follows a refusal is dropped only up to 1 MiB: then the stream is reset
    (NO_ERROR), and the connection serves on."""
    client = H2Client(server.port)
    try:
        stream_id = open_request(client, ISSUE_PATH, "application/json", length=10 * 2**20)
        response = client.responses[stream_id]
        while not response.ended:
            client.read()
        started = time.monotonic()
        sent = 0
        while response.reset is None and sent < 8 * 2**20:
            if client.conn.local_flow_control_window(stream_id) < FRAME:
                client.read()
                continue
            client.conn.send_data(stream_id, b"x" * FRAME)
            client.flush()
            sent += FRAME
        while response.reset is None:
            client.read()
        assert response.reset == ErrorCodes.NO_ERROR
        assert sent < 4 * 2**20 and time.monotonic() - started < 5
        assert still_serves(client)
    finally:
        client.close()


def padded_issue(campaign_id: str, user: str, size: int) -> bytes:
    """IssueCoupon's gRPC body of exactly `size` bytes (over 16 KiB): the request, padded
    with a field the service does not know, which protobuf keeps and ignores."""
    message = CODEC.encode(coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id=user))
    pad = size - 5 - len(message) - 2 - 3  # the field's tag (2 bytes), its length (3)
    length = bytes((pad & 0x7F | 0x80, pad >> 7 & 0x7F | 0x80, pad >> 14))
    field = b"\xfa\x07" + length + b"\x00" * pad  # field 127, length-delimited
    body = struct.pack(">BI", 0, len(message) + len(field)) + message + field
    assert len(body) == size and 0 < pad >> 14 < 0x80
    return body


# A body of no content-length over the limit, in frames, and the size the refusal names:
# an enveloped one by its first message's prefix, at the first frame; the others (and an
# enveloped one whose first message keeps within it) when what has arrived passes it.
GROWING = {
    "grpc": (ISSUE_PATH, "application/grpc", enveloped(6 * FRAME), 6 * FRAME),
    "grpc-web": (ISSUE_PATH, "application/grpc-web+proto", enveloped(6 * FRAME), 6 * FRAME),
    "connect-stream": (EXPORT_PATH, "application/connect+proto", enveloped(6 * FRAME), 6 * FRAME),
    "connect-unary-json": (ISSUE_PATH, "application/json", json_body(6 * FRAME), 5 * FRAME),
    "grpc-second-message": (
        ISSUE_PATH,
        "application/grpc",
        padded_issue("c", "u", MAX_BODY) + enveloped(2 * FRAME),
        5 * FRAME,
    ),
}


@pytest.mark.parametrize("case", GROWING)
def test_a_body_of_no_declared_length_is_refused_once_over_the_limit(
    server: ServerProcess, case: str
) -> None:
    """gRPC's usual case (no content-length), in several DATA frames: the same answer as a
    body declared over the limit, in the caller's protocol; none of the excess reaches the
    service (whose own refusal would name its own limit, not the body's)."""
    path, content_type, body, size = GROWING[case]
    client = H2Client(server.port)
    try:
        stream_id = open_request(client, path, content_type)
        client_ended = send_in_frames(client, stream_id, body)
        response = refusal_read(client, stream_id, client_ended=client_ended)
        assert still_serves(client)
    finally:
        client.close()
    assert_refused(response, content_type, over_the_limit(size, declared=False), 0)
    assert client.goaway is None


def test_a_body_over_the_limit_refuses_its_stream_alone_and_frees_its_window(
    server: ServerProcess,
) -> None:
    """A stream open beside the refused ones is answered, and so are streams after them;
    their bodies, discarded, give the connection's window back (more of them than the
    1 MiB window would take if they did not)."""
    client = H2Client(server.port)
    try:
        campaign_id = create_campaign(client, total=3)
        beside = client.start("IssueCoupon", issue_request(campaign_id, "beside"), end=False)
        refused = []
        for i in range(24):  # 24 x 64 KiB: 1.5 MiB, over the connection's 1 MiB window
            declared = i % 2 == 0
            stream_id = open_request(
                client, ISSUE_PATH, "application/grpc", length=6 * FRAME if declared else None
            )
            # A stream's window of body, sent before its answer is read: the bytes reach
            # the server after it has refused the stream (its answer at the headers, or at
            # the first frame, whose prefix declares 96 KiB).
            body = enveloped(4 * FRAME, 6 * FRAME)
            while client.conn.local_flow_control_window(stream_id) < len(body):
                client.read()  # stalls here if the window of discarded bodies is not freed
            for start in range(0, len(body), FRAME):
                client.conn.send_data(stream_id, body[start : start + FRAME])
            client.flush()
            # The answer only: the stream's reset follows a second later (the rest of the
            # body it might still send is dropped meanwhile).
            response = client.responses[stream_id]
            while not response.ended:
                client.read()
            refused.append((response, declared))
        client.send(beside, b"", end=True)
        [answered] = client.wait(beside)
        after = client.call(
            "IssueCoupon",
            coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id="after"),
            coupon_pb.IssueCouponResponse,
        )
    finally:
        client.close()
    for response, declared in refused:
        message = over_the_limit(6 * FRAME, declared=declared)
        assert_refused(response, "application/grpc", message, 0)
    assert answered.grpc_status == b"0"
    coupon = grpc_message(answered.body, coupon_pb.IssueCouponResponse).coupon
    assert coupon is not None and coupon.user_id == "beside"
    assert after.coupon is not None and after.coupon.user_id == "after"
    assert client.goaway is None
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("declared", [False, True], ids=["no-content-length", "content-length"])
def test_a_body_at_the_limit_is_served(server: ServerProcess, declared: bool) -> None:
    """64 KiB exactly, in gRPC and the Connect protocol's JSON: the coupon is issued."""
    client = H2Client(server.port)
    try:
        campaign_id = create_campaign(client, total=2)
        body = padded_issue(campaign_id, "grpc-at-the-limit", MAX_BODY)
        grpc = open_request(
            client, ISSUE_PATH, "application/grpc", length=len(body) if declared else None
        )
        assert send_in_frames(client, grpc, body)
        text = json.dumps({"campaignId": campaign_id, "userId": "json-at-the-limit"})
        body = text.encode().ljust(MAX_BODY)  # JSON may end in spaces
        connect = open_request(
            client, ISSUE_PATH, "application/json", length=len(body) if declared else None
        )
        assert send_in_frames(client, connect, body)
        grpc_answer, connect_answer = client.wait(grpc, connect)
    finally:
        client.close()
    assert grpc_answer.grpc_status == b"0", grpc_answer
    coupon = grpc_message(grpc_answer.body, coupon_pb.IssueCouponResponse).coupon
    assert coupon is not None and coupon.user_id == "grpc-at-the-limit"
    assert connect_answer.headers[b":status"] == b"200", connect_answer
    assert json.loads(connect_answer.body)["coupon"]["userId"] == "json-at-the-limit"


@pytest.mark.parametrize(("transport", "binary"), NODE_TRANSPORTS)
def test_connect_node_over_http2_reads_resource_exhausted_for_a_body_too_large(
    server: ServerProcess, transport: str, binary: bool
) -> None:
    """connect-es's own requests (gRPC's and a Connect stream's without content-length)
    and its own reading, unary and streaming; the connection serves on."""
    calls = [
        {"rpc": "IssueCoupon", "request": {"campaignId": "c", "userId": "$x*70000"}},
        {"rpc": "ExportCoupons", "request": {"campaignId": "$x*70000"}},
        {"rpc": "IssueCoupon", "request": {"campaignId": "c", "userId": "u"}},
    ]
    *refused, after = node_calls(server.url, transport, calls, binary=binary, http_version="2")
    for result in refused:
        assert result["error"]["code"] == "resource_exhausted", result
        assert result["error"]["message"].startswith("request body of "), result
        assert result["error"]["message"].endswith(f"over the limit of {MAX_BODY} bytes")
        if transport != "connect":
            assert result["metadata"]["grpc-status"] == "8"
    assert after["error"]["code"] == "invalid_argument"  # read, and answered by the service


def test_a_header_list_over_the_hard_limit_ends_the_connection(server: ServerProcess) -> None:
    """Beyond four times the advertised limit, the peer ignores it on purpose: GOAWAY."""
    client = H2Client(server.port)
    try:
        send_padded_request(client, 70_000)
        with pytest.raises(ConnectionError):
            while True:
                client.read()
        assert client.goaway is not None and client.goaway.error_code != ErrorCodes.NO_ERROR
    finally:
        client.close()
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def lenient(client: H2Client) -> H2Client:
    """The client's h2 sends header lists as given: neither lower-cased, trimmed nor
    checked, so that a malformed one reaches the server."""
    client.conn.config.validate_outbound_headers = False
    client.conn.config.normalize_outbound_headers = False
    return client


def without(headers: list[tuple[bytes, bytes]], name: bytes) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in headers if n != name]


def get_campaign_headers(*extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return grpc_headers("GetCampaign", (b"te", b"trailers"), *extra)


GOOD_REQUEST = get_campaign_headers()
# Header lists that make a request malformed (RFC 9113, 8.1.1, 8.2.1, 8.2.2, 8.3.1).
MALFORMED: dict[str, list[tuple[bytes, bytes]]] = {
    "upper-case name": get_campaign_headers((b"X-Upper", b"1")),
    "space in a name": get_campaign_headers((b"x upper", b"1")),
    "colon in a name": get_campaign_headers((b"x:upper", b"1")),
    "non-ASCII name": get_campaign_headers(("x-ünicode".encode(), b"1")),
    "connection": get_campaign_headers((b"connection", b"keep-alive")),
    "keep-alive": get_campaign_headers((b"keep-alive", b"timeout=5")),
    "proxy-connection": get_campaign_headers((b"proxy-connection", b"keep-alive")),
    "transfer-encoding": get_campaign_headers((b"transfer-encoding", b"chunked")),
    "upgrade": get_campaign_headers((b"upgrade", b"h2c")),
    "te other than trailers": grpc_headers("GetCampaign", (b"te", b"gzip")),
    "NUL in a value": get_campaign_headers((b"x-bad", b"a\x00b")),
    "CR in a value": get_campaign_headers((b"x-bad", b"a\rb")),
    "LF in a value": get_campaign_headers((b"x-bad", b"a\nb")),
    "no :method": without(GOOD_REQUEST, b":method"),
    "no :path": without(GOOD_REQUEST, b":path"),
    "no :scheme": without(GOOD_REQUEST, b":scheme"),
    "unknown pseudo-header": [(b":custom", b"1"), *GOOD_REQUEST],
    ":status in a request": [(b":status", b"200"), *GOOD_REQUEST],
    "pseudo-header after a regular field": [
        *without(GOOD_REQUEST, b":path"),
        (b":path", (SERVICE + "GetCampaign").encode()),
    ],
    "two :path": [(b":path", (SERVICE + "GetCampaign").encode()), *GOOD_REQUEST],
    "host other than :authority": get_campaign_headers((b"host", b"elsewhere")),
    "content-length not digits": get_campaign_headers((b"content-length", b"12a")),
    # More digits than any length (Python's int() refuses more than 4,300).
    "content-length of 5000 digits": get_campaign_headers((b"content-length", b"9" * 5000)),
    "content-length of 19 digits": get_campaign_headers((b"content-length", b"1" * 19)),
    "two content-lengths": get_campaign_headers(
        (b"content-length", b"16000"), (b"content-length", b"16001")
    ),
}


def reset_alone(server: ServerProcess, malformed: Callable[[H2Client, bytes], int]) -> Response:
    """Opens a GetCampaign (its body not yet sent), lets `malformed(client, body)` send a
    malformed request on a stream of its own (its id returned), then finishes the first and
    makes one more call. The malformed stream is reset (PROTOCOL_ERROR, a stream error,
    RFC 9113, 8.1.1) and unanswered; the connection and its other streams go on. Returns
    the answer of the stream opened beside it."""
    client = lenient(H2Client(server.port))
    try:
        campaign_id = create_campaign(client, total=1)
        body = grpc_frame(coupon_pb.GetCampaignRequest(campaign_id=campaign_id))
        beside = client.start("GetCampaign", end=False)
        bad = malformed(client, body)
        client.flush()
        [refused] = client.wait(bad)
        client.send(beside, body, end=True)
        [answered] = client.wait(beside)
        after = client.call(
            "GetCampaign",
            coupon_pb.GetCampaignRequest(campaign_id=campaign_id),
            coupon_pb.GetCampaignResponse,
        )
    finally:
        client.close()
    assert refused.reset == ErrorCodes.PROTOCOL_ERROR and not refused.headers, refused
    assert answered.grpc_status == b"0", answered
    assert after.campaign is not None and after.campaign.id == campaign_id
    assert client.goaway is None
    return answered


@pytest.mark.parametrize("ended", [False, True], ids=["body-to-follow", "ended"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_header_list_resets_its_stream_alone(
    server: ServerProcess, case: str, ended: bool
) -> None:
    """RST_STREAM PROTOCOL_ERROR on that stream (a stream error, RFC 9113, 8.1.1), not a
    GOAWAY: the request open beside it is answered, and so is the next one. A body sent
    after the headers, which nobody reads, gives its window back."""

    def malformed(client: H2Client, body: bytes) -> int:
        bad = client.conn.get_next_available_stream_id()
        client.conn.send_headers(bad, MALFORMED[case], end_stream=ended)
        client.responses[bad] = Response()
        if not ended:
            client.conn.send_data(bad, b"x" * 16_000, end_stream=True)
        return bad

    answered = reset_alone(server, malformed)
    assert grpc_message(answered.body, coupon_pb.GetCampaignResponse).campaign is not None


def test_bodies_of_malformed_requests_give_the_connection_window_back(
    server: ServerProcess,
) -> None:
    """The bodies of reset malformed requests, which arrive after the reset, are dropped
    and their bytes given back to the connection's window: more of them than its 1 MiB
    would take, and the stream open beside them is still answered."""
    client = lenient(H2Client(server.port))
    try:
        campaign_id = create_campaign(client, total=1)
        body = grpc_frame(coupon_pb.GetCampaignRequest(campaign_id=campaign_id))
        beside = client.start("GetCampaign", end=False)
        for _ in range(24):  # 24 x 64 KiB: 1.5 MiB
            bad = client.conn.get_next_available_stream_id()
            client.conn.send_headers(bad, MALFORMED["upper-case name"])
            client.responses[bad] = Response()
            while client.conn.local_flow_control_window(bad) < 4 * FRAME:
                client.read()  # stalls here if the window of dropped bodies is not freed
            for _ in range(4):
                client.conn.send_data(bad, b"x" * FRAME)
            client.flush()
            [refused] = client.wait(bad)
            assert refused.reset == ErrorCodes.PROTOCOL_ERROR, refused
        client.send(beside, body, end=True)
        [answered] = client.wait(beside)
    finally:
        client.close()
    assert answered.grpc_status == b"0", answered
    assert client.goaway is None
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("sent", [0, 5, 15, 17, 30], ids=lambda n: f"{n}-bytes")
def test_a_body_other_than_its_content_length_resets_its_stream_alone(
    server: ServerProcess, sent: int
) -> None:
    """Content-length 16, a body of another size: malformed (RFC 9113, 8.1.1), its stream
    reset, the connection going on; the body of the size it says is served."""
    client = lenient(H2Client(server.port))
    try:
        campaign_id = create_campaign(client, total=1)
        body = grpc_frame(coupon_pb.GetCampaignRequest(campaign_id=campaign_id))
        beside = client.start("GetCampaign", end=False)
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            stream_id,
            get_campaign_headers((b"content-length", b"16")),
            end_stream=not sent,
        )
        client.responses[stream_id] = Response()
        if sent:
            client.conn.send_data(stream_id, b"x" * sent, end_stream=True)
        client.flush()
        [refused] = client.wait(stream_id)
        client.send(beside, body, end=True)
        [answered] = client.wait(beside)
        matching = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            matching, get_campaign_headers((b"content-length", b" %d\t" % len(body)))
        )
        client.responses[matching] = Response()
        client.conn.send_data(matching, body, end_stream=True)
        client.flush()
        [served] = client.wait(matching)
    finally:
        client.close()
    assert refused.reset == ErrorCodes.PROTOCOL_ERROR and not refused.headers, refused
    assert answered.grpc_status == b"0", answered
    assert served.grpc_status == b"0", served
    assert client.goaway is None


def test_a_body_short_of_its_content_length_before_trailers_resets_its_stream(
    server: ServerProcess,
) -> None:
    client = lenient(H2Client(server.port))
    try:
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream_id, get_campaign_headers((b"content-length", b"16")))
        client.responses[stream_id] = Response()
        client.conn.send_data(stream_id, b"x" * 5)
        client.conn.send_headers(stream_id, [(b"x-checksum", b"1")], end_stream=True)
        client.flush()
        [refused] = client.wait(stream_id)
        assert still_serves(client)
    finally:
        client.close()
    assert refused.reset == ErrorCodes.PROTOCOL_ERROR and not refused.headers, refused
    assert client.goaway is None


MALFORMED_TRAILERS: dict[str, list[tuple[bytes, bytes]]] = {
    "pseudo-header": [(b":path", b"/")],
    "upper-case name": [(b"X-Upper", b"1")],
    "connection": [(b"connection", b"close")],
    "LF in a value": [(b"x-bad", b"a\nb")],
}


@pytest.mark.parametrize("case", list(MALFORMED_TRAILERS))
def test_malformed_trailers_reset_their_stream_alone(server: ServerProcess, case: str) -> None:
    """A request whose trailer section is malformed is malformed too: its stream is reset
    (PROTOCOL_ERROR), unanswered; the connection and its other streams go on."""

    def malformed(client: H2Client, body: bytes) -> int:
        bad = client.start("GetCampaign", body, end=False)
        client.conn.send_headers(bad, MALFORMED_TRAILERS[case], end_stream=True)
        return bad

    reset_alone(server, malformed)


def test_well_formed_trailers_end_the_request(server: ServerProcess) -> None:
    client = lenient(H2Client(server.port))
    try:
        campaign_id = create_campaign(client, total=1)
        body = grpc_frame(coupon_pb.GetCampaignRequest(campaign_id=campaign_id))
        stream_id = client.start("GetCampaign", body, end=False)
        client.conn.send_headers(stream_id, [(b"x-checksum", b"1")], end_stream=True)
        client.flush()
        [response] = client.wait(stream_id)
    finally:
        client.close()
    assert response.grpc_status == b"0", response


ADMIN_TOKEN = "h2-admin-token-0123456789"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("h2-guarded"), COUPON_ADMIN_TOKEN=ADMIN_TOKEN)
    try:
        yield proc
    finally:
        proc.stop()


def admin_call(
    client: H2Client, rpc: str, request: object, *extra: tuple[bytes, bytes]
) -> Response:
    stream_id = client.conn.get_next_available_stream_id()
    client.conn.send_headers(stream_id, grpc_headers(rpc, (b"te", b"trailers"), *extra))
    client.conn.send_data(stream_id, grpc_frame(request), end_stream=True)
    client.responses[stream_id] = Response()
    client.flush()
    [response] = client.wait(stream_id)
    return response


@pytest.mark.parametrize("padding", [b" ", b"\t", b" \t ", b"  "])
def test_whitespace_around_a_value_is_not_part_of_it(
    guarded: ServerProcess, padding: bytes
) -> None:
    """As over HTTP/1.1 (RFC 9110, 5.5): the admin token and the deadline are read without
    it, not refused as malformed."""
    token = b"Bearer " + ADMIN_TOKEN.encode()
    client = lenient(H2Client(guarded.port))
    try:
        made = admin_call(
            client,
            "CreateCampaign",
            coupon_pb.CreateCampaignRequest(name="h2", total_coupons=1, starts_at=in_seconds(-60)),
            (b"authorization", token),
        )
        assert made.grpc_status == b"0", made
        created = grpc_message(made.body, coupon_pb.CreateCampaignResponse).campaign
        assert created is not None
        got = admin_call(
            client,
            "GetCampaign",
            coupon_pb.GetCampaignRequest(campaign_id=created.id),
            (b"authorization", padding + token + padding),
            (b"grpc-timeout", padding + b"5S" + padding),
        )
        wrong = admin_call(
            client,
            "GetCampaign",
            coupon_pb.GetCampaignRequest(campaign_id=created.id),
            (b"authorization", padding + token + b"x" + padding),
        )
    finally:
        client.close()
    assert got.grpc_status == b"0", got
    campaign = grpc_message(got.body, coupon_pb.GetCampaignResponse).campaign
    assert campaign is not None and campaign.id == created.id
    assert wrong.grpc_status == b"16", wrong  # unauthenticated: the token is still checked
    assert client.goaway is None


def test_http1_and_http2_are_told_apart_from_bytes_in_pieces(server: ServerProcess) -> None:
    # HTTP/2: the preface three bytes at a time.
    client = H2Client(server.port, dribble=3)
    try:
        campaign_id = create_campaign(client, total=2)
    finally:
        client.close()
    # HTTP/1.1 whose first byte, "P", is also the preface's.
    body = json.dumps({"campaignId": campaign_id, "userId": "pieces"}).encode()
    request = (
        b"POST /coupon.v1.CouponService/IssueCoupon HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (request[:1], request[1:3], request[3:]):
            sock.sendall(piece)
            time.sleep(0.02)
        answer = b""
        while chunk := sock.recv(65_536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(payload)["coupon"]["userId"] == "pieces"


def test_grpc_over_http1_is_refused_with_a_status_that_says_why(server: ServerProcess) -> None:
    """gRPC's status travels in trailers, which HTTP/1.1 does not carry here: the answer is
    a trailers-only `unimplemented` naming HTTP/2, and nothing is issued."""
    client = H2Client(server.port)
    try:
        campaign_id = create_campaign(client, total=2)
    finally:
        client.close()
    response = httpx.post(
        f"{server.url}/coupon.v1.CouponService/IssueCoupon",
        content=issue_request(campaign_id, "over-http1"),
        headers={"content-type": "application/grpc", "te": "trailers"},
    )
    assert response.http_version == "HTTP/1.1"
    assert (response.status_code, response.headers["grpc-status"]) == (200, "12")
    assert "HTTP/2" in response.headers["grpc-message"]
    assert "ASGI" not in response.headers["grpc-message"]
    mine = httpx.post(
        f"{server.url}/coupon.v1.CouponService/ListUserCoupons",
        json={"userId": "over-http1"},
    )
    assert mine.status_code == 200 and mine.json().get("coupons") is None, mine.text
    assert httpx.get(f"{server.url}/healthz").status_code == 200


@pytest.mark.parametrize("coding", ["GZIP", "Gzip"])
def test_a_content_coding_is_read_in_any_case(server: ServerProcess, coding: str) -> None:
    campaign = {"name": "cased", "totalCoupons": 1, "startsAt": "2026-01-01T00:00:00Z"}
    body = gzip.compress(json.dumps(campaign).encode())
    response = httpx.post(
        f"{server.url}/coupon.v1.CouponService/CreateCampaign",
        content=body,
        headers={"content-type": "application/json", "content-encoding": coding},
    )
    assert response.status_code == 200, response.text
    assert response.json()["campaign"]["name"] == "cased"


# A body in a coding the service does not decode, in each protocol: the RPC, the content
# type, the header naming the coding and the coding, and the header the answer must list
# the accepted codings in.
REFUSED_CODINGS = {
    "connect-json": ("IssueCoupon", "json", "content-encoding", "br", "accept-encoding"),
    "connect-proto": ("CreateCampaign", "proto", "content-encoding", "zstd", "accept-encoding"),
    "connect-stream": (
        "ExportCoupons", "connect+json", "connect-content-encoding", "br", "connect-accept-encoding"
    ),
    "grpc-web": (
        "IssueCoupon", "grpc-web+proto", "grpc-encoding", "snappy", "grpc-accept-encoding"
    ),
}  # fmt: skip


def accepted_codings(value: str) -> set[str]:
    return {coding.strip() for coding in value.split(",")}


@pytest.mark.parametrize("http2", [False, True], ids=["HTTP/1.1", "HTTP/2"])
@pytest.mark.parametrize("case", REFUSED_CODINGS)
def test_an_unsupported_coding_is_answered_with_the_codings_accepted(
    server: ServerProcess, http2: bool, case: str
) -> None:
    """The Connect protocol (and gRPC) answers `unimplemented` and says what it accepts."""
    rpc, content_type, coding_header, coding, accept_header = REFUSED_CODINGS[case]
    headers = {"content-type": f"application/{content_type}", coding_header: coding}
    with httpx.Client(http1=not http2, http2=http2, timeout=10) as web:
        response = web.post(
            f"{server.url}/coupon.v1.CouponService/{rpc}", content=b"\x00" * 8, headers=headers
        )
    if case.startswith("connect-") and case != "connect-stream":
        assert response.status_code == 501, response.text
        assert response.json()["code"] == "unimplemented"
    elif case == "connect-stream":
        assert b'"unimplemented"' in response.content
    else:
        assert b"grpc-status: 12" in response.content
    assert accepted_codings(response.headers.get(accept_header, "")) == {"gzip", "identity"}


def test_an_unsupported_grpc_coding_is_answered_with_the_codings_accepted(
    server: ServerProcess,
) -> None:
    client = H2Client(server.port)
    try:
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            stream_id,
            grpc_headers("IssueCoupon", (b"te", b"trailers"), (b"grpc-encoding", b"br")),
        )
        client.responses[stream_id] = Response()
        client.conn.send_data(stream_id, b"\x01\x00\x00\x00\x01\x00", end_stream=True)
        client.flush()
        [response] = client.wait(stream_id)
    finally:
        client.close()
    assert response.grpc_status == b"12"
    accepted = response.headers.get(b"grpc-accept-encoding", b"").decode()
    assert accepted_codings(accepted) == {"gzip", "identity"}


@pytest.mark.parametrize("http2", [False, True], ids=["HTTP/1.1", "HTTP/2"])
def test_an_unsupported_content_type_lists_what_the_method_accepts(
    server: ServerProcess, http2: bool
) -> None:
    with httpx.Client(http1=not http2, http2=http2, timeout=10) as web:
        unary = web.post(
            f"{server.url}/coupon.v1.CouponService/IssueCoupon",
            content=b"x",
            headers={"content-type": "text/plain"},
        )
        streaming = web.post(
            f"{server.url}/coupon.v1.CouponService/ExportCoupons",
            content=b"{}",
            headers={"content-type": "application/json"},
        )
    assert unary.status_code == streaming.status_code == 415
    unary_types = set(unary.headers["accept-post"].split(", "))
    streaming_types = set(streaming.headers["accept-post"].split(", "))
    web_types = {
        "application/grpc-web+proto",
        "application/grpc-web+json",
        "application/grpc-web-text+proto",
    }
    grpc_types = {"application/grpc+proto", "application/grpc+json"} if http2 else set()
    assert unary_types == {"application/proto", "application/json"} | web_types | grpc_types
    assert streaming_types == (
        {"application/connect+proto", "application/connect+json"} | web_types | grpc_types
    )


def test_connections_that_close_early_leave_the_server_serving(server: ServerProcess) -> None:
    for first_bytes in (b"", b"PRI * HTTP/2.0\r\n", b"P", b"GET /healthz HTTP/1.1\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(first_bytes)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65_536):
                pass
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert "Traceback" not in server.log()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl makes the test's self-signed certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_offers_http2_and_http11_through_alpn(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    proc = ServerProcess(
        env={"COUPON_TLS_CERT_FILE": str(cert), "COUPON_TLS_KEY_FILE": str(key)},
        in_memory=True,
        log_dir=tmp_path,
    )
    try:
        https = f"https://localhost:{proc.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with httpx.Client(verify=ssl.create_default_context(cafile=cert)) as http1:
                    health = http1.get(f"{https}/healthz")
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.process.poll() is None, proc.log()
                time.sleep(0.1)
        assert health.status_code == 200 and health.http_version == "HTTP/1.1"

        context = ssl.create_default_context(cafile=cert)
        context.set_alpn_protocols(["h2", "http/1.1"])
        client = H2Client(proc.port, tls=context)
        try:
            assert isinstance(client.sock, ssl.SSLSocket)
            assert client.sock.selected_alpn_protocol() == "h2"
            campaign_id = create_campaign(client, total=3)
        finally:
            client.close()

        for protocol in ("grpc", "connect", "grpcweb"):
            done = buf_curl(
                "--protocol", protocol, "--cacert", str(cert), "--schema", str(ROOT / "proto"),
                f"{https}/coupon.v1.CouponService/IssueCoupon",
                data=json.dumps({"campaignId": campaign_id, "userId": protocol}),
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["coupon"]["userId"] == protocol
    finally:
        proc.stop()


def test_tls_settings_come_in_pairs(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, _ = certificate
    proc = ServerProcess(env={"COUPON_TLS_CERT_FILE": str(cert)}, in_memory=True, log_dir=tmp_path)
    assert proc.process.wait(timeout=30) == 2
    assert "COUPON_TLS_KEY_FILE must be set too" in proc.log()
    proc.stop()


def _key(path: Path) -> Path:
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-out", str(path)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return path


@pytest.mark.parametrize("case", ["garbage", "swapped", "another key"])
def test_a_bad_certificate_or_key_stops_start_up_in_one_line_naming_the_variable(
    tmp_path: Path, certificate: tuple[Path, Path], case: str
) -> None:
    cert, key = certificate
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    files, variable = {
        "garbage": ((garbage, garbage), "COUPON_TLS_CERT_FILE"),
        "swapped": ((key, cert), "COUPON_TLS_CERT_FILE"),
        "another key": ((cert, _key(tmp_path / "other.pem")), "COUPON_TLS_KEY_FILE"),
    }[case]
    proc = ServerProcess(
        env={"COUPON_TLS_CERT_FILE": str(files[0]), "COUPON_TLS_KEY_FILE": str(files[1])},
        in_memory=True,
        log_dir=tmp_path,
    )
    try:
        status = proc.process.wait(timeout=30)
        log = proc.log()
    finally:
        proc.stop()
    assert status == 2, log
    lines = log.strip().splitlines()
    assert len(lines) == 1, log
    assert lines[0].startswith(f"coupon: {variable} must "), lines[0]
    assert "serving" not in log and "Traceback" not in log
