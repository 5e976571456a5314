"""The one-server client's pool loses no connection whatever is cancelled when, and one its
caller lost stops counting: the pool cannot be used up for good."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

from coupon.adapters.redis.client import create_client
from coupon.adapters.redis.stock_gate import RedisStockGate
from coupon.application.ports import AdmissionKind
from coupon.application.use_cases import new_campaign_id
from coupon.domain.campaign import Campaign
from coupon.domain.coupon import Coupon
from harness.services import TestServices


async def test_a_caller_cancelled_as_it_is_handed_a_connection_passes_it_on(
    services: TestServices,
) -> None:
    """The connection goes to the next caller in line, at once, not after its time-out."""
    client = create_client(services.redis_url, max_connections=1)
    pool = client.connection_pool
    try:
        held = await pool.get_connection()
        first = asyncio.ensure_future(client.ping())
        second = asyncio.ensure_future(client.ping())
        await asyncio.sleep(0.05)  # both wait for the one connection
        await pool.release(held)  # handed to the first...
        first.cancel()  # ...which leaves before it runs
        assert await asyncio.wait_for(second, 2)
        assert len(pool._in_use_connections) == 0
    finally:
        await client.aclose()


async def test_a_connection_its_caller_lost_stops_counting(services: TestServices) -> None:
    client = create_client(services.redis_url, max_connections=1)
    try:
        await client.connection_pool.get_connection()  # and never given back
        gc.collect()
        assert await asyncio.wait_for(client.ping(), 2)
    finally:
        await client.aclose()


async def no_holdings() -> AsyncIterator[Sequence[Coupon]]:
    return
    yield


async def test_the_gate_keeps_at_most_half_the_pool(
    services: TestServices, redis_prefix: str
) -> None:
    client = create_client(services.redis_url, max_connections=8)
    gate = RedisStockGate(client, prefix=redis_prefix)
    now = datetime.now(UTC)
    campaigns = [
        Campaign(new_campaign_id(), "pool", 10, now - timedelta(minutes=1), None, now)
        for _ in range(40)
    ]
    try:
        for campaign in campaigns:
            await gate.load(campaign, no_holdings())
        admissions = await asyncio.gather(
            *(gate.admit(c.id, f"u{i}") for c in campaigns for i in range(3))
        )
        assert {a.kind for a in admissions} == {AdmissionKind.ADMITTED}
        assert gate._lane is not None
        assert len(gate._lane._idle) <= 4
        # The rest of the pool is there for everything else, all at once.
        await asyncio.wait_for(asyncio.gather(*(client.ping() for _ in range(4))), 2)
    finally:
        await gate.close()
        await client.aclose()
