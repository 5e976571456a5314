"""The composition root: the container builds the service from settings alone, and closing
it leaves no task of its providers running."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from coupon.application.issue import IssueCoupon
from coupon.application.use_cases import CreateCampaign
from coupon.entrypoints.connect_service import CouponService
from coupon.entrypoints.ioc import make_container
from coupon.entrypoints.overload import Doorman
from coupon.entrypoints.settings import Settings
from coupon.gen.coupon.v1 import coupon_pb


async def test_the_memory_container_serves_an_issue_and_closes_without_leftovers() -> None:
    before = asyncio.all_tasks()
    container = make_container(Settings(backend="memory", max_in_flight=7))
    service = await container.get(CouponService)
    assert await container.get(CouponService) is service  # one per process (APP scope)
    assert (await container.get(Doorman)).limit == 7
    assert await container.get(IssueCoupon) is await container.get(IssueCoupon)
    create = await container.get(CreateCampaign)
    campaign = await create.execute(
        name="c",
        total_coupons=1,
        starts_at=datetime.now(UTC) - timedelta(minutes=1),
        ends_at=None,
    )
    issued = await service.issue(
        coupon_pb.IssueCouponRequest(campaign_id=campaign.id, user_id="alice")
    )
    assert issued.coupon is not None and issued.coupon.user_id == "alice"
    await container.close()
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()
