"""The generated Connect client, as a user of the service would use it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

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
