"""connect-es's Node client (@connectrpc/connect-node, code from protoc-gen-es) against a
real server process, on each transport it has: the Connect protocol and gRPC-Web over
HTTP/1.1 and HTTP/2, gRPC over HTTP/2; in JSON and binary protobuf. Every RPC and every
error code of the README's table arrives as the protocols specify."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from harness.server import ServerProcess
from tests.clients.conftest import TOKEN, node_calls

pytestmark = pytest.mark.e2e

# gRPC's numeric status for each code (the Connect protocol spells them out).
GRPC_STATUS = {
    "ok": "0",
    "invalid_argument": "3",
    "not_found": "5",
    "failed_precondition": "9",
    "resource_exhausted": "8",
    "unauthenticated": "16",
    "unavailable": "14",
}
UNKNOWN_CAMPAIGN = "0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50"

TRANSPORTS = (
    [
        pytest.param("connect", binary, version, id=f"connect-{fmt}-http{version}")
        for binary, fmt in ((False, "json"), (True, "binary"))
        for version in ("1.1", "2")
    ]
    + [
        pytest.param("grpc", binary, "2", id=f"grpc-{fmt}-http2")
        for binary, fmt in ((False, "json"), (True, "binary"))
    ]
    + [
        pytest.param("grpcweb", binary, version, id=f"grpcweb-{fmt}-http{version}")
        for binary, fmt in ((False, "json"), (True, "binary"))
        for version in ("1.1", "2")
    ]
)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def the_calls() -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    past, future = iso(now - timedelta(minutes=1)), iso(now + timedelta(hours=1))
    campaign = "$0.campaign.id"
    return [
        # 0-6: a campaign of two coupons, issued to two users, a repeat, then sold out.
        {
            "rpc": "CreateCampaign",
            "request": {"name": "node", "totalCoupons": 2, "startsAt": past},
            "token": TOKEN,
        },
        {"rpc": "GetCampaign", "request": {"campaignId": campaign}, "token": TOKEN},
        {"rpc": "IssueCoupon", "request": {"campaignId": campaign, "userId": "ana"}},
        {"rpc": "IssueCoupon", "request": {"campaignId": campaign, "userId": "ana"}},
        {"rpc": "IssueCoupon", "request": {"campaignId": campaign, "userId": "ben"}},
        {"rpc": "IssueCoupon", "request": {"campaignId": campaign, "userId": "cho"}},
        {"rpc": "GetCampaign", "request": {"campaignId": campaign}, "token": TOKEN},
        # 7-8: not started yet.
        {
            "rpc": "CreateCampaign",
            "request": {"name": "later", "totalCoupons": 5, "startsAt": future},
            "token": TOKEN,
        },
        {"rpc": "IssueCoupon", "request": {"campaignId": "$7.campaign.id", "userId": "ana"}},
        # 9: unknown campaign; 10: a field out of range; 11-12: no admin token.
        {"rpc": "IssueCoupon", "request": {"campaignId": UNKNOWN_CAMPAIGN, "userId": "ana"}},
        {
            "rpc": "CreateCampaign",
            "request": {"name": "none", "totalCoupons": 0, "startsAt": past},
            "token": TOKEN,
        },
        {"rpc": "CreateCampaign", "request": {"name": "x", "totalCoupons": 1, "startsAt": past}},
        {"rpc": "GetCampaign", "request": {"campaignId": campaign}},
    ]


def error(result: dict[str, Any]) -> tuple[str, str]:
    assert "error" in result, f"expected an error, got {result}"
    return result["error"]["code"], result["error"]["message"]


@pytest.mark.parametrize(("transport", "binary", "http_version"), TRANSPORTS)
def test_every_rpc_and_error_code_through_connect_node(
    coupon_server: ServerProcess, transport: str, binary: bool, http_version: str
) -> None:
    results = node_calls(
        coupon_server.url, transport, the_calls(), binary=binary, http_version=http_version
    )
    created, empty, first, repeat, second, sold_out, full = results[:7]

    campaign = created["response"]["campaign"]
    assert campaign["name"] == "node" and campaign["totalCoupons"] == "2"
    assert campaign["status"] == "CAMPAIGN_STATUS_ACTIVE"
    assert empty["response"]["campaign"]["id"] == campaign["id"]
    assert "coupons" not in empty["response"]  # none issued yet

    coupon = first["response"]["coupon"]
    assert coupon["userId"] == "ana" and coupon["campaignId"] == campaign["id"]
    assert "alreadyIssued" not in first["response"]
    assert repeat["response"] == {"coupon": coupon, "alreadyIssued": True}
    assert second["response"]["coupon"]["userId"] == "ben"
    assert error(sold_out) == (
        "resource_exhausted",
        "all 2 coupons of this campaign have been issued",
    )
    page = full["response"]
    assert [c["userId"] for c in page["coupons"]] == ["ana", "ben"]
    assert page["campaign"]["issuedCount"] == "2"
    assert page["campaign"]["status"] == "CAMPAIGN_STATUS_SOLD_OUT"

    code, message = error(results[8])
    assert code == "failed_precondition"
    assert message.startswith("campaign has not started yet: it starts at ")
    assert error(results[9]) == ("not_found", f"campaign {UNKNOWN_CAMPAIGN} does not exist")
    assert error(results[10]) == (
        "invalid_argument",
        "total_coupons: must be between 1 and 10000000 (got 0)",
    )
    needs_token = "this RPC needs the header 'Authorization: Bearer <COUPON_ADMIN_TOKEN>'"
    assert error(results[11]) == ("unauthenticated", needs_token)
    assert error(results[12]) == ("unauthenticated", needs_token)

    content_type = created["header"]["content-type"]
    codec = "proto" if binary else "json"
    if transport == "connect":
        assert content_type == f"application/{codec}"
    else:
        # gRPC and gRPC-Web: the status of a success comes after the body, in trailers
        # (for gRPC-Web, the trailer frame at the end of the body).
        assert content_type == f"application/{transport.replace('grpcweb', 'grpc-web')}+{codec}"
        for result in (created, first, repeat, full):
            assert result["trailer"]["grpc-status"] == "0"
        for result in results[5:13]:
            if "error" in result:
                grpc_status = result["metadata"]["grpc-status"]
                assert grpc_status == GRPC_STATUS[result["error"]["code"]]


@pytest.mark.parametrize(("transport", "binary", "http_version"), TRANSPORTS)
def test_unreachable_redis_is_unavailable_on_every_transport(
    coupon_server: ServerProcess,
    redis_down_server: ServerProcess,
    transport: str,
    binary: bool,
    http_version: str,
) -> None:
    start = iso(datetime.now(UTC) - timedelta(minutes=1))
    [created] = node_calls(
        coupon_server.url,
        "connect",
        [
            {
                "rpc": "CreateCampaign",
                "request": {"name": "no redis", "totalCoupons": 3, "startsAt": start},
                "token": TOKEN,
            }
        ],
        binary=False,
    )
    campaign_id = created["response"]["campaign"]["id"]
    [result] = node_calls(
        redis_down_server.url,
        transport,
        [{"rpc": "IssueCoupon", "request": {"campaignId": campaign_id, "userId": "ana"}}],
        binary=binary,
        http_version=http_version,
    )
    code, message = error(result)
    assert code == "unavailable"
    assert message.startswith("Redis is unavailable")
    if transport != "connect":
        assert result["metadata"]["grpc-status"] == GRPC_STATUS["unavailable"]
