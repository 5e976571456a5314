"""Invariants I1-I4 under a real burst: two server processes on PostgreSQL and Redis,
thousands of concurrent requests over HTTP, checked from the responses, from GetCampaign
and from the database."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio as aioredis
from connectrpc.errors import ConnectError

from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponServiceClient
from tests.support.client import all_coupons, connect_client, create_campaign
from tests.support.server import ServerProcess
from tests.support.services import delete_prefix

TOKEN = "burst-token"
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(server_env: dict[str, str]) -> Iterator[ServerProcess]:
    proc = ServerProcess(env={**server_env, "COUPON_ADMIN_TOKEN": TOKEN}, workers=2)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@dataclass
class Outcome:
    user: str
    sent_at: datetime
    received_at: datetime
    code: str = ""
    issued_at: datetime | None = None
    already: bool = False
    error: str = ""


@dataclass
class Burst:
    outcomes: list[Outcome] = field(default_factory=list)

    def successes(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code]

    def errors(self) -> Counter[str]:
        return Counter(o.error for o in self.outcomes if o.error)


async def issue_many(
    client: CouponServiceClient,
    campaign_id: str,
    users: list[str],
    concurrency: int,
    burst: Burst,
    pace: float = 0.0,
) -> None:
    queue = list(reversed(users))

    async def worker() -> None:
        while queue:
            user = queue.pop()
            sent = datetime.now(UTC)
            outcome = Outcome(user, sent, sent)
            try:
                r = await client.issue_coupon(
                    coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id=user)
                )
                assert r.coupon is not None and r.coupon.issued_at is not None
                outcome.code = r.coupon.code
                outcome.issued_at = r.coupon.issued_at.to_datetime()
                outcome.already = r.already_issued
            except ConnectError as exc:
                outcome.error = exc.code.value
            outcome.received_at = datetime.now(UTC)
            burst.outcomes.append(outcome)
            if pace:
                await asyncio.sleep(pace)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def check_invariants(
    client: CouponServiceClient, pool: asyncpg.Pool, campaign_id: str, total: int, burst: Burst
) -> list[coupon_pb.Coupon]:
    campaign, listed = await all_coupons(client, campaign_id, TOKEN)
    assert campaign.starts_at is not None
    starts = campaign.starts_at.to_datetime()
    # I1
    assert len(listed) <= total
    assert campaign.issued_count == len(listed)
    # I2 (across all campaigns: the database's whole table)
    assert len({c.code for c in listed}) == len(listed)
    dupes = await pool.fetchval(
        "SELECT count(*) FROM (SELECT code FROM coupons GROUP BY code HAVING count(*) > 1) d"
    )
    assert dupes == 0
    # I3
    assert all(c.issued_at is not None and c.issued_at.to_datetime() >= starts for c in listed)
    # I4
    assert len({c.user_id for c in listed}) == len(listed)
    # Every success a client got is in the list, with the same code for the same user.
    by_user = {c.user_id: c.code for c in listed}
    for s in burst.successes():
        assert by_user.get(s.user) == s.code, s
    # ... and in the database, which agrees with the API.
    rows = await pool.fetch(
        "SELECT user_id, code, issued_at, slot FROM coupons WHERE campaign_id = $1",
        uuid.UUID(campaign_id),
    )
    assert {(r["user_id"], r["code"]) for r in rows} == set(by_user.items())
    assert len({r["slot"] for r in rows}) == len(rows)
    assert all(1 <= r["slot"] <= total for r in rows)
    return listed


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
        burst = Burst()
        await issue_many(client, campaign_id, users, concurrency=400, burst=burst)
        listed = await check_invariants(client, pg_pool, campaign_id, total, burst)
    assert len(listed) == total  # 900 users wanted 300 coupons: all were issued
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
        burst = Burst()
        await issue_many(client, campaign_id, users, concurrency=60, burst=burst, pace=0.01)
        await check_invariants(client, pg_pool, campaign_id, total, burst)
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
        burst = Burst()

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
            issue_many(client, campaign_id, users, concurrency=50, burst=burst, pace=0.01),
            flush_midway(),
        )
        assert flushed and flushed[0] < total, "the flush happened mid-campaign"
        assert new_issues() > flushed[0], "issuance went on after the flush"
        listed = await check_invariants(client, pg_pool, campaign_id, total, burst)
        assert len(listed) == total, "issuance continued after the flush until sold out"
        prefix = server_env["COUPON_REDIS_PREFIX"]
        assert await redis_client.exists(f"{prefix}:{{{campaign_id}}}:meta")
    assert set(burst.errors()) <= {"resource_exhausted", "unavailable"}, burst.errors()
