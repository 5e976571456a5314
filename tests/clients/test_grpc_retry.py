"""gRPC clients' retry policies work on the service's own errors.

gRPC commits a call once it sees a response's headers: no retry after that (gRFC A6). An
error raised before any message is therefore answered trailers-only, one HEADERS frame
that ends the stream, which a channel whose policy lists the code retries; an error after
messages still ends with trailers after the DATA. An `unavailable` with a retry hint
carries it as `grpc-retry-pushback-ms` too, which the retry waits instead of its own
backoff. Seen frame by frame (h2client) and through grpcio itself, against servers whose
Redis is down (the shared one is never touched)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from hyperframe.frame import HeadersFrame, RstStreamFrame

from coupon.gen.coupon.v1 import coupon_pb
from harness.client import connect_client, create_campaign
from harness.private_redis import PrivateRedis
from harness.server import ServerProcess
from tests.clients.conftest import TOKEN
from tests.clients.h2client import CODEC, SERVICE, H2Client, grpc_frame, grpc_headers

pytestmark = pytest.mark.e2e

ISSUE = SERVICE + "IssueCoupon"
AUTHORIZATION = (b"authorization", f"Bearer {TOKEN}".encode())


# A frame as the tests read it: its type, its flags, its header fields (HEADERS) or its size.
Seen = tuple[str, set[str], dict[bytes, bytes] | int]


def frames_of(client: H2Client, stream_id: int) -> list[Seen]:
    """The frames of one stream, as they arrive, until it ends or is reset."""
    frames: list[Seen] = []
    for frame in client.raw_frames():
        if frame.stream_id != stream_id:
            continue
        if isinstance(frame, HeadersFrame):
            frames.append(("HEADERS", set(frame.flags), client.decode(frame)))
        else:
            frames.append(
                (type(frame).__name__, set(frame.flags), len(getattr(frame, "data", b"")))
            )
        if "END_STREAM" in frame.flags or isinstance(frame, RstStreamFrame):
            return frames
    raise AssertionError(f"the connection closed before stream {stream_id} ended: {frames}")


def call_frames(
    port: int, rpc: str, request: object, *extra: tuple[bytes, bytes], window: int = 65_535
) -> list[Seen]:
    """A gRPC call's frames, the client's window for the response `window` bytes (and
    none of it given back)."""
    with H2Client(port, window=window, auto_acknowledge=False) as client:
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream_id, grpc_headers(rpc, (b"te", b"trailers"), *extra))
        client.conn.send_data(stream_id, grpc_frame(request), end_stream=True)
        client.flush()
        return frames_of(client, stream_id)


def trailers_only(frames: list[Seen]) -> dict[bytes, bytes]:
    """The fields of a trailers-only answer: one HEADERS frame ending the stream."""
    assert len(frames) == 1, frames
    [(kind, flags, fields)] = frames
    assert kind == "HEADERS" and "END_STREAM" in flags, frames
    assert isinstance(fields, dict)
    return fields


@pytest.mark.parametrize(
    ("rpc", "request_message", "field"),
    [
        ("IssueCoupon", coupon_pb.IssueCouponRequest(campaign_id="x", user_id="u"), "campaign_id"),
        ("ListUserCoupons", coupon_pb.ListUserCouponsRequest(user_id=""), "user_id"),
    ],
)
def test_an_error_before_any_message_is_one_headers_frame_that_ends_the_stream(
    coupon_server: ServerProcess, rpc: str, request_message: object, field: str
) -> None:
    fields = trailers_only(call_frames(coupon_server.port, rpc, request_message))
    assert fields[b":status"] == b"200"
    assert fields[b"content-type"].startswith(b"application/grpc")
    assert fields[b"grpc-status"] == b"3"  # invalid_argument
    assert fields[b"grpc-message"].startswith(field.encode()), fields
    assert b"grpc-retry-pushback-ms" not in fields  # no hint, no pushback


async def test_an_error_after_messages_ends_with_trailers_after_the_data(
    coupon_server: ServerProcess,
) -> None:
    """ExportCoupons whose deadline passes while its first message is held back by the
    client's window: the message's first bytes have gone, so the status goes as trailers."""
    async with connect_client(coupon_server.url) as client:
        campaign = await create_campaign(client, total=10, name="export", token=TOKEN)
        await client.issue_coupon(
            coupon_pb.IssueCouponRequest(campaign_id=campaign.id, user_id="exported")
        )
    request = coupon_pb.ExportCouponsRequest(campaign_id=campaign.id)
    extra = (AUTHORIZATION, (b"grpc-timeout", b"1S"))
    frames = call_frames(coupon_server.port, "ExportCoupons", request, *extra, window=10)
    (kind, flags, response), *data, (last_kind, last_flags, trailers) = frames
    assert kind == "HEADERS" and "END_STREAM" not in flags, frames
    assert isinstance(response, dict) and response[b":status"] == b"200"
    assert b"grpc-status" not in response, response
    assert data and all(frame[0] == "DataFrame" for frame in data), frames
    assert last_kind == "HEADERS" and "END_STREAM" in last_flags, frames
    assert isinstance(trailers, dict) and trailers[b"grpc-status"] == b"4"  # deadline_exceeded


def test_unavailable_is_trailers_only_with_its_hint_as_pushback(
    redis_down_server: ServerProcess,
) -> None:
    request = coupon_pb.IssueCouponRequest(campaign_id=str(uuid.uuid4()), user_id="pushed")
    fields = trailers_only(call_frames(redis_down_server.port, "IssueCoupon", request))
    assert fields[b"grpc-status"] == b"14", fields  # unavailable
    hint = fields[b"retry-after-ms"]
    assert int(hint) > 0
    assert fields[b"grpc-retry-pushback-ms"] == hint


# --- through grpcio's own retries -----------------------------------------------------


def retrying_channel(port: int) -> grpc.Channel:
    """A channel whose service config retries `unavailable` up to 5 attempts in all."""
    policy = {
        "maxAttempts": 5,
        "initialBackoff": "0.1s",
        "maxBackoff": "0.1s",
        "backoffMultiplier": 1,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    method = {"name": [{"service": "coupon.v1.CouponService"}], "retryPolicy": policy}
    config = {"methodConfig": [method]}
    return grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.service_config", json.dumps(config))]
    )


@pytest.fixture
def gated_server(
    server_env: dict[str, str], private_redis: PrivateRedis
) -> Iterator[ServerProcess]:
    """A server on a Redis of the test's own, which the test stops and starts."""
    env = {**server_env, "REDIS_URL": private_redis.url, "COUPON_REDIS_PREFIX": "retry"}
    with ServerProcess(env=env) as proc:
        yield proc


def unavailable_answers(server: ServerProcess) -> float:
    return server.metric("coupon_rpc_requests_total", rpc="IssueCoupon", code="unavailable")


async def test_a_grpc_retry_policy_retries_unavailable_until_the_call_succeeds(
    gated_server: ServerProcess, private_redis: PrivateRedis
) -> None:
    async with connect_client(gated_server.url) as client:
        campaign = await create_campaign(client, total=10, name="retried")
    request = coupon_pb.IssueCouponRequest(campaign_id=campaign.id, user_id="patient")
    private_redis.kill()
    with retrying_channel(gated_server.port) as channel:
        issue = channel.unary_unary(
            ISSUE,
            request_serializer=CODEC.encode,
            response_deserializer=lambda data: CODEC.decode(data, coupon_pb.IssueCouponResponse),
        )
        call = issue.future(request, timeout=60)
        # The first attempt refused (its pushback, the 1 s hint, before the next one):
        # Redis comes back, and an attempt after that is issued the coupon.
        while not unavailable_answers(gated_server) and not call.done():
            time.sleep(0.05)
        private_redis.start()
        response = call.result()
    assert response.coupon is not None and response.coupon.user_id == "patient"
    assert not response.already_issued
    assert unavailable_answers(gated_server) >= 1
    ok = gated_server.metric("coupon_rpc_requests_total", rpc="IssueCoupon", code="ok")
    assert ok == 1
