"""The gRPC health-checking protocol, asked as load balancers and probes ask it: grpcio over
h2c (what grpc_health_probe and Kubernetes' gRPC probes are), grpcurl through reflection,
and the Connect protocol, against a server that can serve and one whose Redis is down."""

from __future__ import annotations

import json
import subprocess

import grpc
import httpx
import pytest
from connectrpc.codec import proto_binary_codec

from coupon.gen.grpc.health.v1.health_pb import HealthCheckRequest, HealthCheckResponse
from harness.server import ServerProcess
from tests.clients.test_grpcurl import grpcurl

pytestmark = pytest.mark.e2e

CHECK = "/grpc.health.v1.Health/Check"
Status = HealthCheckResponse.ServingStatus
CODEC = proto_binary_codec()


def to_bytes(message: HealthCheckRequest) -> bytes:
    return CODEC.encode(message)


def from_bytes(data: bytes) -> HealthCheckResponse:
    return CODEC.decode(data, HealthCheckResponse)


def check(port: int, service: str = "") -> HealthCheckResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            CHECK,
            request_serializer=to_bytes,
            response_deserializer=from_bytes,
        )
        answer: HealthCheckResponse = call(HealthCheckRequest(service=service), timeout=10)
        return answer


@pytest.mark.parametrize("service", ["", "coupon.v1.CouponService"])
def test_a_server_that_can_serve_is_serving(coupon_server: ServerProcess, service: str) -> None:
    """Public, as /readyz is: no admin token asked (this server requires one)."""
    assert check(coupon_server.port, service).status == Status.SERVING


def test_a_server_whose_redis_is_down_is_not_serving(redis_down_server: ServerProcess) -> None:
    assert check(redis_down_server.port).status == Status.NOT_SERVING
    assert httpx.get(f"{redis_down_server.url}/readyz", timeout=10).status_code == 503


def test_a_service_it_does_not_have_is_not_found(coupon_server: ServerProcess) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        check(coupon_server.port, "other.v1.Other")
    error = raised.value
    assert error.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert "'other.v1.Other'" in error.details()  # type: ignore[attr-defined]


def test_watch_is_unimplemented_as_the_protocol_allows(coupon_server: ServerProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{coupon_server.port}") as channel:
        call = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=to_bytes,
            response_deserializer=from_bytes,
        )
        with pytest.raises(grpc.RpcError) as raised:
            list(call(HealthCheckRequest(), timeout=10))
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_grpcurl_finds_and_calls_it_through_reflection(coupon_server: ServerProcess) -> None:
    target = f"127.0.0.1:{coupon_server.port}"
    listed = grpcurl(target, "list")
    assert "grpc.health.v1.Health" in listed.stdout.split(), listed
    answered: subprocess.CompletedProcess[str] = grpcurl(target, "grpc.health.v1.Health/Check")
    assert json.loads(answered.stdout) == {"status": "SERVING"}, answered


def test_the_connect_protocol_asks_it_too(coupon_server: ServerProcess) -> None:
    answer = httpx.post(f"{coupon_server.url}{CHECK}", json={}, timeout=10)
    assert answer.status_code == 200 and answer.json() == {"status": "SERVING"}


def test_grpc_over_http_1_1_is_refused_plainly_as_for_the_service(
    coupon_server: ServerProcess,
) -> None:
    """gRPC needs trailers, which HTTP/1.1 here does not carry: the same trailers-only
    answer as the service's RPCs give, and nothing in the error log (a traceback per
    request, which anyone could have the service write)."""
    for _ in range(2):
        answer = httpx.post(
            f"{coupon_server.url}{CHECK}",
            content=b"\x00\x00\x00\x00\x00",
            headers={"content-type": "application/grpc"},
            timeout=10,
        )
        assert answer.status_code == 200 and answer.headers["grpc-status"] == "12", answer
    assert "Traceback" not in coupon_server.log()


@pytest.mark.parametrize(
    "content_type", ["Application/gRPC-Web+Proto", "application/grpc-web+proto; charset=utf-8"]
)
def test_grpc_web_media_types_are_read_in_any_case_as_for_the_service(
    coupon_server: ServerProcess, content_type: str
) -> None:
    answer = httpx.post(
        f"{coupon_server.url}{CHECK}",
        content=b"\x00\x00\x00\x00\x00",
        headers={"content-type": content_type},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert b"grpc-status:0" in answer.content.replace(b" ", b""), answer.content


def test_watch_refusing_a_media_type_lists_the_stream_types(coupon_server: ServerProcess) -> None:
    """Watch is a stream: its 415 lists what a stream is sent as, not a unary call's types."""
    answer = httpx.post(
        f"{coupon_server.url}/grpc.health.v1.Health/Watch",
        content=b"{}",
        headers={"content-type": "text/plain"},
        timeout=10,
    )
    assert answer.status_code == 415
    assert answer.headers["accept-post"].startswith("application/connect+proto"), answer.headers
