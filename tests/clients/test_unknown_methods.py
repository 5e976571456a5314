"""A call of a method the port does not serve, from gRPC's own client (grpcio, over h2c)
and in gRPC-Web: the trailers-only `unimplemented` gRPC servers answer, naming the method,
not an HTTP 404 that clients report as a transport error."""

from __future__ import annotations

import grpc
import httpx
import pytest

from harness.server import ServerProcess

pytestmark = pytest.mark.e2e

UNKNOWN = [
    "/coupon.v1.CouponService/NoSuchMethod",
    "/other.v1.OtherService/Call",
    "/grpc.reflection.v1.ServerReflection/NoSuchMethod",
]


@pytest.mark.parametrize("path", UNKNOWN)
def test_grpc_of_an_unknown_method_is_unimplemented_naming_it(
    coupon_server: ServerProcess, path: str
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{coupon_server.port}") as channel:
        call = channel.unary_unary(path)
        with pytest.raises(grpc.RpcError) as raised:
            call(b"", timeout=10)
    error = raised.value
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    assert error.details() == f"unknown method {path}"  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", UNKNOWN)
def test_grpc_web_of_an_unknown_method_is_unimplemented_and_the_connection_goes_on(
    coupon_server: ServerProcess, path: str
) -> None:
    with httpx.Client(base_url=coupon_server.url) as client:
        answer = client.post(
            path,
            content=b"\x00\x00\x00\x00\x00",
            headers={"content-type": "application/grpc-web+proto"},
        )
        after = client.get("/healthz")  # the same keep-alive connection
    assert (answer.status_code, answer.headers["grpc-status"]) == (200, "12")
    assert answer.headers["grpc-message"] == f"unknown method {path}"
    assert after.status_code == 200


def test_connect_of_an_unknown_method_stays_404(coupon_server: ServerProcess) -> None:
    """The Connect protocol's answer for a path it does not serve."""
    answer = httpx.post(f"{coupon_server.url}{UNKNOWN[0]}", json={})
    assert answer.status_code == 404


def test_an_unknown_method_is_named_as_its_path_was_written(coupon_server: ServerProcess) -> None:
    """A method's name followed by a space (%20) is not that method: the message keeps the
    space, percent-encoded, rather than naming a method that exists."""
    answer = httpx.post(
        f"{coupon_server.url}/grpc.health.v1.Health/Check%20",
        content=b"\x00\x00\x00\x00\x00",
        headers={"content-type": "application/grpc-web+proto"},
    )
    assert answer.headers["grpc-status"] == "12"
    assert answer.headers["grpc-message"] == "unknown method /grpc.health.v1.Health/Check%20"
