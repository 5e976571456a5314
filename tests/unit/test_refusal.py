"""The answers the HTTP layers give a request they refuse themselves (http/refusal.py)."""

from __future__ import annotations

import json
import struct

import pytest

from coupon.entrypoints.http.refusal import body_refusal, grpc_message, refusal

ISSUE = b"/coupon.v1.CouponService/IssueCoupon"


def test_grpc_message_is_percent_encoded_as_the_grpc_spec_says() -> None:
    # Printable ASCII stays, "%" itself and everything else (UTF-8 bytes) is encoded.
    assert grpc_message("limit: 100% ~ é\n") == b"limit: 100%25 ~ %C3%A9%0A"


@pytest.mark.parametrize(
    ("content_type", "echoed"),
    [
        (b"application/grpc", b"application/grpc"),
        (b"Application/GRPC+proto; charset=x", b"application/grpc+proto"),
        (b"application/grpc-web-text+json", b"application/grpc-web-text+json"),
        (b"application/grpc-web+\xff", b"application/grpc-web"),
    ],
)
def test_grpc_and_grpc_web_get_a_trailers_only_answer(content_type: bytes, echoed: bytes) -> None:
    status, media, body, headers = refusal(ISSUE, content_type, "too 100%", status=431, plain="x")
    assert (status, media, body) == (200, echoed, b"")
    assert headers == [(b"grpc-status", b"8"), (b"grpc-message", b"too 100%25")]


def test_a_connect_stream_gets_one_end_stream_message() -> None:
    status, media, body, headers = refusal(
        b"/coupon.v1.CouponService/ExportCoupons?x",
        b"application/connect+proto",
        "too large",
        status=413,
        plain="x",
    )
    assert (status, media, headers) == (200, b"application/connect+proto", [])
    flags, length = struct.unpack(">BI", body[:5])
    assert (flags, length) == (0x02, len(body) - 5)
    assert json.loads(body[5:]) == {"error": {"code": "resource_exhausted", "message": "too large"}}


@pytest.mark.parametrize("content_type", [b"application/json", b"application/proto", b""])
def test_a_connect_unary_call_or_anything_else_gets_the_connect_unary_error(
    content_type: bytes,
) -> None:
    status, media, body, _ = refusal(ISSUE, content_type, "too large", status=431, plain="x")
    assert (status, media) == (429, b"application/json")
    assert json.loads(body) == {"code": "resource_exhausted", "message": "too large"}


def test_outside_the_api_it_is_plain_http() -> None:
    answer = refusal(b"/healthz", b"application/grpc", "too large", status=431, plain="limited")
    assert answer == (431, b"text/plain; charset=utf-8", b"limited", [])
    reflection = b"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
    assert refusal(reflection, b"application/grpc", "m", status=431, plain="p")[0] == 200


def test_a_body_over_the_limit_names_its_size_and_the_limit() -> None:
    message = b"request body of 70000 bytes is over the limit of 65536 bytes"
    _, _, _, headers = body_refusal(ISSUE, b"application/grpc", 70_000, 65_536, declared=True)
    assert headers == [(b"grpc-status", b"8"), (b"grpc-message", message)]
    answer = body_refusal(b"/healthz", b"application/json", 70_000, 65_536, declared=False)
    assert answer == (
        413,
        b"text/plain; charset=utf-8",
        b"request body is limited to 65536 bytes",
        [],
    )


def test_a_body_of_no_declared_length_is_said_to_be_at_least_what_arrived() -> None:
    """Sent chunked (or over HTTP/2 without a content-length), the body is refused once
    what has arrived passes the limit: its whole size is never known, so none is claimed."""
    message = b"request body of at least 81920 bytes is over the limit of 65536 bytes"
    _, _, _, headers = body_refusal(ISSUE, b"application/grpc", 81_920, 65_536, declared=False)
    assert headers == [(b"grpc-status", b"8"), (b"grpc-message", message)]
