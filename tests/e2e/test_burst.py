"""Invariants I1-I4 under a real burst: two server processes on PostgreSQL and Redis,
thousands of concurrent requests over HTTP, checked from the responses, from GetCampaign
and from the database."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import asyncpg
import pytest
import redis.asyncio as aioredis

from coupon.gen.coupon.v1.coupon_connect import CouponServiceClient
from coupon_loadtest.audit import duplicate_codes_anywhere
from harness.burst import (
    Campaign,
    CampaignCheck,
    Outcome,
    check_campaign,
    drive,
)
from harness.client import all_coupons, connect_client, create_campaign
from harness.server import ServerProcess
from harness.services import delete_prefix

TOKEN = "burst-token"
# Clients retry `unavailable` as the answer asks (the service sheds what it cannot serve in
# time); the invariants hold whatever the retries.
RETRIES = 20
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(server_env: dict[str, str]) -> Iterator[ServerProcess]:
    with ServerProcess(env={**server_env, "COUPON_ADMIN_TOKEN": TOKEN}, workers=2) as proc:
        yield proc


@dataclass
class Burst:
    """What the clients of one campaign's burst saw."""

    campaign_id: str
    outcomes: list[Outcome] = field(default_factory=list)

    def successes(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code]

    def errors(self) -> Counter[str]:
        return Counter(o.error for o in self.outcomes if o.error)


async def issue_many(
    server: ServerProcess, burst: Burst, users: list[str], concurrency: int, pace: float = 0.0
) -> None:
    requests = [(burst.campaign_id, user) for user in users]
    await drive(
        [server.url],
        requests,
        burst.outcomes,
        concurrency=concurrency,
        pace=pace,
        retry_unavailable=RETRIES,
    )


async def check_invariants(
    client: CouponServiceClient, pool: asyncpg.Pool, total: int, burst: Burst
) -> CampaignCheck[Campaign]:
    """I1-I5 for the campaign, from what the clients saw, GetCampaign and PostgreSQL (I2
    across every campaign in the table)."""
    campaign, _ = await all_coupons(client, burst.campaign_id, TOKEN)
    assert campaign.starts_at is not None
    ref = Campaign(burst.campaign_id, total, campaign.starts_at.to_datetime())
    check = await check_campaign(client, pool, ref, burst.outcomes, token=TOKEN)
    assert not check.violations, check.violations
    assert check.listed == check.issued == check.issued_count
    assert await duplicate_codes_anywhere(pool) == 0
    return check


async def test_thousands_of_concurrent_requests_issue_exactly_the_stock(
    server: ServerProcess, pg_pool: asyncpg.Pool
) -> None:
    total = 300
    async with connect_client(server.url) as client:
        created = await create_campaign(
            client, total=total, starts_in=-1, name="burst", token=TOKEN
        )
        campaign_id = created.id
        rng = random.Random(42)
        # 4,000 requests from 900 users: many users ask several times.
        users = [f"user-{rng.randrange(900)}" for _ in range(4000)]
        burst = Burst(campaign_id)
        await issue_many(server, burst, users, concurrency=400)
        check = await check_invariants(client, pg_pool, total, burst)
    assert check.issued == total  # 900 users wanted 300 coupons: all were issued
    assert set(burst.errors()) <= {"resource_exhausted"}, burst.errors()
    first = Counter(o.user for o in burst.successes() if not o.already)
    assert max(first.values()) == 1
    repeats = [o for o in burst.successes() if o.already]
    assert repeats, "users who asked again got their coupon back"


async def test_burst_through_the_start_issues_nothing_early_and_starts_promptly(
    server: ServerProcess, pg_pool: asyncpg.Pool
) -> None:
    total = 200
    async with connect_client(server.url) as client:
        created = await create_campaign(
            client, total=total, starts_in=1.5, name="start", token=TOKEN
        )
        assert created.starts_at is not None
        campaign_id = created.id
        starts = created.starts_at.to_datetime()
        users = [f"early-{i % 600}" for i in range(6000)]
        burst = Burst(campaign_id)
        await issue_many(server, burst, users, concurrency=60, pace=0.01)
        await check_invariants(client, pg_pool, total, burst)
    successes = burst.successes()
    assert successes, "the campaign started during the burst"
    # No client got a success before the start (server and client share this machine's
    # clock, so the response must have arrived after starts_at).
    assert all(s.received_at >= starts for s in successes)
    assert all(s.issued_at is not None and s.issued_at >= starts for s in successes)
    # Issuance begins at the start: every request refused as not started was sent before
    # it, so none sent after the start was turned away (and some were sent after it).
    refused_early = [o for o in burst.outcomes if o.error == "failed_precondition"]
    assert refused_early and all(o.sent_at < starts for o in refused_early)
    assert any(o.sent_at >= starts for o in burst.outcomes)
    assert set(burst.errors()) <= {"failed_precondition", "resource_exhausted"}


async def test_redis_state_lost_mid_burst_keeps_invariants_and_issuance_continues(
    server: ServerProcess,
    pg_pool: asyncpg.Pool,
    server_env: dict[str, str],
    redis_client: aioredis.Redis,
) -> None:
    total = 400
    async with connect_client(server.url) as client:
        created = await create_campaign(
            client, total=total, starts_in=-1, name="flush", token=TOKEN
        )
        campaign_id = created.id
        rng = random.Random(7)
        users = [f"flush-{rng.randrange(1000)}" for _ in range(5000)]
        burst = Burst(campaign_id)

        async def flush_midway() -> None:
            deadline = time.monotonic() + 20
            while new_issues() < 120 and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            flushed.append(new_issues())
            # Lose every key of this run, as a Redis restart without persistence would.
            await delete_prefix(server_env["REDIS_URL"], server_env["COUPON_REDIS_PREFIX"])

        def new_issues() -> int:
            return sum(1 for o in burst.successes() if not o.already)

        flushed: list[int] = []
        await asyncio.gather(
            issue_many(server, burst, users, concurrency=50, pace=0.01),
            flush_midway(),
        )
        assert flushed and flushed[0] < total, "the flush happened mid-campaign"
        assert new_issues() > flushed[0], "issuance went on after the flush"
        check = await check_invariants(client, pg_pool, total, burst)
        assert check.issued == total, "issuance continued after the flush until sold out"
        prefix = server_env["COUPON_REDIS_PREFIX"]
        assert await redis_client.exists(f"{prefix}:{{{campaign_id}}}:meta")
    assert set(burst.errors()) <= {"resource_exhausted", "unavailable"}, burst.errors()
