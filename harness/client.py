"""The generated Connect client, as a user of the service would use it."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf.wkt import Duration
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponServiceClient


def ts(value: datetime) -> Timestamp:
    return Timestamp.from_datetime(value)


def in_seconds(seconds: float) -> Timestamp:
    return ts(datetime.now(UTC) + timedelta(seconds=seconds))


@asynccontextmanager
async def connect_client(url: str) -> AsyncIterator[CouponServiceClient]:
    async with CouponServiceClient(url, send_compression=None) as client:
        yield client


def admin(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def create_campaign(
    client: CouponServiceClient,
    *,
    total: int,
    starts_in: float = -1,
    name: str = "test",
    token: str | None = None,
    **fields: object,
) -> coupon_pb.Campaign:
    """CreateCampaign starting `starts_in` seconds from now (already open by default)."""
    response = await client.create_campaign(
        coupon_pb.CreateCampaignRequest(
            name=name, total_coupons=total, starts_at=in_seconds(starts_in), **fields
        ),
        headers=admin(token) if token else None,
    )
    assert response.campaign is not None
    return response.campaign


async def all_coupons(
    client: CouponServiceClient, campaign_id: str, token: str, page_size: int = 1000
) -> tuple[coupon_pb.Campaign, list[coupon_pb.Coupon]]:
    coupons: list[coupon_pb.Coupon] = []
    page_token = ""
    while True:
        page = await client.get_campaign(
            coupon_pb.GetCampaignRequest(
                campaign_id=campaign_id, page_size=page_size, page_token=page_token
            ),
            headers=admin(token),
        )
        coupons.extend(page.coupons)
        page_token = page.next_page_token
        if not page_token:
            assert page.campaign is not None
            return page.campaign, coupons


def retry_delay(error: ConnectError) -> float | None:
    """The delay an error asks the client to wait (its google.rpc.RetryInfo), in seconds."""
    for detail in error.details:
        if detail.type_name == "google.rpc.RetryInfo":
            data = detail.message_bytes
            assert data[0] == 0x0A and data[1] == len(data) - 2, data  # field 1, one length byte
            delay = Duration.from_binary(data[2:])
            return int(delay.seconds) + int(delay.nanos) / 1e9
    return None


async def issue_retrying(
    client: CouponServiceClient, campaign_id: str, user: str, *, give_up_after: float = 30.0
) -> coupon_pb.IssueCouponResponse:
    """IssueCoupon as a well-behaved client sends it: `unavailable` (nothing was done) is
    sent again after the delay the answer asks for, with jitter; any other answer is final.
    Raises the last ConnectError."""
    give_up = time.monotonic() + give_up_after
    while True:
        try:
            return await client.issue_coupon(
                coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id=user)
            )
        except ConnectError as exc:
            if exc.code is not Code.UNAVAILABLE or time.monotonic() > give_up:
                raise
            delay = retry_delay(exc)
            assert delay is not None, f"unavailable without a retry hint: {exc}"
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
