"""A gRPC or gRPC-Web Content-Type written otherwise than in lower case without parameters
is the same media type (RFC 9110, 8.3.1: case-insensitive, parameters allowed; gRPC's own
servers take `application/grpc; charset=utf-8`): answered in its protocol, not with a 415.
The Connect protocol's JSON is UTF-8: a charset other than UTF-8 is answered 415, as
connect-go answers it, over HTTP/1.1 (IssueCoupon's lane included) and HTTP/2 alike."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest

from coupon.gen.coupon.v1 import coupon_pb
from harness.server import ServerProcess
from tests.clients.conftest import TOKEN
from tests.clients.h2client import SERVICE, H2Client, grpc_frame

pytestmark = pytest.mark.e2e

REQUEST = grpc_frame(coupon_pb.ListUserCouponsRequest(user_id="someone"))


@pytest.mark.parametrize(
    "content_type",
    [
        "Application/gRPC-Web+Proto",
        "application/grpc-web+proto; charset=utf-8",
        "APPLICATION/GRPC-WEB",
    ],
)
def test_grpc_web_in_any_case_or_with_parameters(
    coupon_server: ServerProcess, content_type: str
) -> None:
    answer = httpx.post(
        f"{coupon_server.url}{SERVICE}ListUserCoupons",
        content=REQUEST,
        headers={"content-type": content_type},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/grpc-web")
    assert b"grpc-status:0" in answer.content.replace(b" ", b""), answer.content


@pytest.mark.parametrize(
    "content_type", [b"application/grpc; charset=utf-8", b"Application/GRPC+proto"]
)
def test_grpc_in_any_case_or_with_parameters(
    coupon_server: ServerProcess, content_type: bytes
) -> None:
    with H2Client(coupon_server.port) as client:
        stream_id = client.request(f"{SERVICE}ListUserCoupons".encode(), content_type, REQUEST)
        [response] = client.wait(stream_id)
    assert response.headers[b":status"] == b"200", response
    assert response.grpc_status == b"0", response


@pytest.fixture(scope="module")
def campaign_id(coupon_server: ServerProcess) -> str:
    answer = httpx.post(
        f"{coupon_server.url}{SERVICE}CreateCampaign",
        json={"name": "charsets", "totalCoupons": 100, "startsAt": "2026-01-01T00:00:00Z"},
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    campaign_id: str = answer.raise_for_status().json()["campaign"]["id"]
    return campaign_id


@pytest.fixture(params=[False, True], ids=["HTTP/1.1", "HTTP/2"])
def web(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    http2: bool = request.param
    with httpx.Client(http1=not http2, http2=http2, timeout=10) as client:
        yield client


def coupons_of(url: str, user: str) -> list[object]:
    answer = httpx.post(f"{url}{SERVICE}ListUserCoupons", json={"userId": user}, timeout=10)
    coupons: list[object] = answer.raise_for_status().json().get("coupons", [])
    return coupons


@pytest.mark.parametrize(
    ("content_type", "charset"),
    [
        ("application/json; charset=latin1", "latin1"),
        ("application/json;charset=utf-16", "utf-16"),
        ("Application/JSON; Charset=ISO-8859-1", "iso-8859-1"),  # named in lower case
        ('application/json; charset="utf8"', "utf8"),
    ],
)
def test_json_in_a_charset_other_than_utf8_is_refused_and_issues_nothing(
    coupon_server: ServerProcess,
    campaign_id: str,
    web: httpx.Client,
    content_type: str,
    charset: str,
) -> None:
    user = f"charset-{uuid.uuid4()}"
    body = json.dumps({"campaignId": campaign_id, "userId": user}).encode()
    for rpc in ("IssueCoupon", "ListUserCoupons"):  # the lane's method, and another
        answer = web.post(
            f"{coupon_server.url}{SERVICE}{rpc}",
            content=body,
            headers={"content-type": content_type},
        )
        assert answer.status_code == 415, answer.text
        error = answer.json()
        assert error["code"] == "invalid_argument"
        assert error["message"].startswith(f"content-type: charset '{charset}' is not served")
        assert "application/json" in answer.headers["accept-post"]
    assert coupons_of(coupon_server.url, user) == []


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        'application/json; charset="utf-8"',
    ],
)
def test_json_said_to_be_utf8_is_served(
    coupon_server: ServerProcess, campaign_id: str, web: httpx.Client, content_type: str
) -> None:
    answer = web.post(
        f"{coupon_server.url}{SERVICE}IssueCoupon",
        content=json.dumps({"campaignId": campaign_id, "userId": "utf8-" + content_type}),
        headers={"content-type": content_type},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["coupon"]["userId"] == "utf8-" + content_type


def test_a_connect_stream_of_json_in_another_charset_is_refused(
    coupon_server: ServerProcess, campaign_id: str, web: httpx.Client
) -> None:
    body = json.dumps({"campaignId": campaign_id}).encode()
    answer = web.post(
        f"{coupon_server.url}{SERVICE}ExportCoupons",
        content=b"\x00" + len(body).to_bytes(4, "big") + body,
        headers={
            "content-type": "application/connect+json; charset=windows-1252",
            "authorization": f"Bearer {TOKEN}",
        },
    )
    assert answer.status_code == 415, answer.text
    assert "'windows-1252'" in answer.json()["message"]
    assert "application/connect+json" in answer.headers["accept-post"]
