"""A Connect server that breaks the promises on purpose: over-issues, repeats codes, opens
early. The load tool must exit non-zero against it.

    python -m uvicorn tests.loadtest.broken_server:app
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponService, CouponServiceASGIApplication

NS_PER_S = 1_000_000_000
OVER_ISSUE = 5
DUPLICATE_EVERY = 10
OPENS_EARLY_NS = NS_PER_S // 4


def _ts(ns: int) -> Timestamp:
    return Timestamp(seconds=ns // NS_PER_S, nanos=ns % NS_PER_S // 1000 * 1000)


def _ns(ts: Timestamp | None) -> int:
    return 0 if ts is None else ts.seconds * NS_PER_S + ts.nanos


@dataclass
class _Campaign:
    message: coupon_pb.Campaign
    coupons: list[coupon_pb.Coupon] = field(default_factory=list)
    holders: dict[str, coupon_pb.Coupon] = field(default_factory=dict)


class BrokenCouponService(CouponService):
    """The RPCs the load tool does not use answer `unimplemented` (CouponService's own)."""

    def __init__(self) -> None:
        self._campaigns: dict[str, _Campaign] = {}
        self._issued = 0

    async def create_campaign(
        self,
        request: coupon_pb.CreateCampaignRequest,
        ctx: RequestContext[coupon_pb.CreateCampaignRequest, coupon_pb.CreateCampaignResponse],
        /,
    ) -> coupon_pb.CreateCampaignResponse:
        campaign = coupon_pb.Campaign(
            id=str(uuid.uuid4()),
            name=request.name,
            total_coupons=request.total_coupons,
            starts_at=request.starts_at,
            created_at=_ts(time.time_ns()),
        )
        self._campaigns[campaign.id] = _Campaign(campaign)
        return coupon_pb.CreateCampaignResponse(campaign=campaign)

    async def get_campaign(
        self,
        request: coupon_pb.GetCampaignRequest,
        ctx: RequestContext[coupon_pb.GetCampaignRequest, coupon_pb.GetCampaignResponse],
        /,
    ) -> coupon_pb.GetCampaignResponse:
        campaign = self._campaigns.get(request.campaign_id)
        if campaign is None:
            raise ConnectError(Code.NOT_FOUND, "no such campaign")
        start = int(request.page_token or 0)
        size = request.page_size or 1000
        page = campaign.coupons[start : start + size]
        more = start + size < len(campaign.coupons)
        campaign.message.issued_count = len(campaign.coupons)
        return coupon_pb.GetCampaignResponse(
            campaign=campaign.message,
            coupons=page,
            next_page_token=str(start + size) if more else "",
        )

    async def issue_coupon(
        self,
        request: coupon_pb.IssueCouponRequest,
        ctx: RequestContext[coupon_pb.IssueCouponRequest, coupon_pb.IssueCouponResponse],
        /,
    ) -> coupon_pb.IssueCouponResponse:
        campaign = self._campaigns.get(request.campaign_id)
        if campaign is None:
            raise ConnectError(Code.NOT_FOUND, "no such campaign")
        now = time.time_ns()
        if now < _ns(campaign.message.starts_at) - OPENS_EARLY_NS:
            raise ConnectError(Code.FAILED_PRECONDITION, "not started")
        held = campaign.holders.get(request.user_id)
        if held is not None:
            return coupon_pb.IssueCouponResponse(coupon=held, already_issued=True)
        if len(campaign.coupons) >= campaign.message.total_coupons + OVER_ISSUE:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, "sold out")
        self._issued += 1
        n = self._issued
        coupon = coupon_pb.Coupon(
            code=f"X{n - 1 if n % DUPLICATE_EVERY == 0 else n}",
            campaign_id=request.campaign_id,
            user_id=request.user_id,
            issued_at=_ts(now),
        )
        campaign.coupons.append(coupon)
        campaign.holders[request.user_id] = coupon
        return coupon_pb.IssueCouponResponse(coupon=coupon)


app = CouponServiceASGIApplication(BrokenCouponService())
