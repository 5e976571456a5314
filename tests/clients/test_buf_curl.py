"""`buf curl` (from npm) against a real server process with each protocol it speaks:
Connect (HTTP/1.1 and HTTP/2), gRPC (HTTP/2 with prior knowledge) and gRPC-Web; with the
schema from proto/, and without it, through the server's reflection service."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from harness.server import ServerProcess
from tests.clients.conftest import ROOT, TOKEN, buf_curl

pytestmark = pytest.mark.e2e

SERVICE = "coupon.v1.CouponService"
PROTOCOLS = [
    pytest.param(["--protocol", "connect"], id="connect-http1.1"),
    pytest.param(["--protocol", "connect", "--http2-prior-knowledge"], id="connect-http2"),
    pytest.param(["--protocol", "grpc", "--http2-prior-knowledge"], id="grpc-http2"),
    pytest.param(["--protocol", "grpcweb"], id="grpcweb-http1.1"),
    pytest.param(["--protocol", "grpcweb", "--http2-prior-knowledge"], id="grpcweb-http2"),
]
SCHEMA = [
    pytest.param(["--schema", str(ROOT / "proto")], id="schema"),
    pytest.param([], id="reflection"),
]


def call(
    server: ServerProcess, protocol: list[str], schema: list[str], rpc: str, data: object
) -> dict[str, object]:
    done = buf_curl(
        *protocol,
        *schema,
        "-H",
        f"Authorization: Bearer {TOKEN}",
        f"{server.url}/{SERVICE}/{rpc}",
        data=json.dumps(data),
    )
    if done.returncode != 0:
        return {"error": json.loads(done.stderr)}
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("schema", SCHEMA)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_buf_curl_issues_a_coupon(
    coupon_server: ServerProcess, protocol: list[str], schema: list[str]
) -> None:
    starts = (datetime.now(UTC) - timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    created = call(
        coupon_server,
        protocol,
        schema,
        "CreateCampaign",
        {"name": "buf", "totalCoupons": 1, "startsAt": starts},
    )
    campaign = created["campaign"]
    assert isinstance(campaign, dict) and campaign["totalCoupons"] == "1"
    issued = call(
        coupon_server,
        protocol,
        schema,
        "IssueCoupon",
        {"campaignId": campaign["id"], "userId": "dee"},
    )
    coupon = issued["coupon"]
    assert isinstance(coupon, dict) and coupon["userId"] == "dee"
    sold_out = call(
        coupon_server,
        protocol,
        schema,
        "IssueCoupon",
        {"campaignId": campaign["id"], "userId": "eve"},
    )
    assert sold_out == {
        "error": {
            "code": "resource_exhausted",
            "message": "all 1 coupons of this campaign have been issued",
        }
    }
    page = call(coupon_server, protocol, schema, "GetCampaign", {"campaignId": campaign["id"]})
    assert page["coupons"] == [coupon]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reflection_lists_the_service_and_its_methods(
    coupon_server: ServerProcess, protocol: list[str]
) -> None:
    services = buf_curl(*protocol, "--list-services", coupon_server.url)
    assert services.returncode == 0, services.stderr
    assert SERVICE in services.stdout.split()
    methods = buf_curl(*protocol, "--list-methods", coupon_server.url)
    assert methods.returncode == 0, methods.stderr
    listed = set(methods.stdout.split())
    assert {f"{SERVICE}/{rpc}" for rpc in ("CreateCampaign", "GetCampaign", "IssueCoupon")} <= (
        listed
    )


@pytest.mark.parametrize(
    "reflect_protocol", ["grpc-v1", "grpc-v1alpha"], ids=["reflection-v1", "reflection-v1alpha"]
)
def test_both_reflection_versions_answer(
    coupon_server: ServerProcess, reflect_protocol: str
) -> None:
    done = buf_curl(
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--reflect-protocol",
        reflect_protocol,
        "--list-methods",
        coupon_server.url,
    )
    assert done.returncode == 0, done.stderr
    assert f"{SERVICE}/IssueCoupon" in done.stdout.split()
