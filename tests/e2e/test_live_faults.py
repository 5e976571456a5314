"""The live panel through Redis faults, against a real server and a Redis of the test's own
(full, stopped, hung; the shared one is never touched):

* while Redis refuses the counts (full under noeviction), the panel says its figures are
  missing and why, rather than showing a quiet campaign;
* the refusals answered during an outage (Redis full, or stopped) appear in the panel once
  Redis is back, every one of them;
* the p99 covers the requests refused after waiting on Redis, at the time they took;
* a worker logs a failing flush once per outage, with Redis's own words, and once more
  when its counts are stored again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponServiceClient
from harness.client import connect_client, create_campaign
from harness.private_redis import PrivateRedis
from harness.server import ServerProcess

pytestmark = pytest.mark.e2e
PREFIX = "live-faults"
# How long a condition the service reaches by itself may take on a busy machine.
PATIENCE_SECONDS = 30.0


@pytest.fixture
def server(server_env: dict[str, str], private_redis: PrivateRedis) -> Iterator[ServerProcess]:
    env = {**server_env, "REDIS_URL": private_redis.url, "COUPON_REDIS_PREFIX": PREFIX}
    with ServerProcess(env=env) as proc:
        yield proc


def panel(server: ServerProcess, campaign_id: str) -> dict[str, Any]:
    got = httpx.get(f"{server.url}/dashboard/api/campaigns/{campaign_id}", timeout=30)
    assert got.status_code == 200, got.text
    view: dict[str, Any] = got.json()
    return view


async def panel_until(
    server: ServerProcess, campaign_id: str, reached: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The campaign's panel once `reached` holds of it (the last one seen in the failure)."""
    give_up = time.monotonic() + PATIENCE_SECONDS
    view = panel(server, campaign_id)
    while not reached(view):
        assert time.monotonic() < give_up, view
        await asyncio.sleep(0.2)
        view = panel(server, campaign_id)
    return view


async def refused_unavailable(client: CouponServiceClient, campaign_id: str, users: int) -> int:
    """IssueCoupon for `users` new users, each refused `unavailable`: how many were."""
    for n in range(users):
        with pytest.raises(ConnectError) as caught:
            await client.issue_coupon(
                coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id=f"out-{n}")
            )
        assert caught.value.code is Code.UNAVAILABLE, caught.value
    return users


async def open_campaign(server: ServerProcess, client: CouponServiceClient) -> str:
    campaign_id: str = (await create_campaign(client, total=1000, name="live through faults")).id
    await client.issue_coupon(coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id="a"))
    # Its first figures stored: the panel works before the fault.
    await panel_until(server, campaign_id, lambda v: v["requests"] == 1)
    return campaign_id


async def make_full(admin: aioredis.Redis) -> None:
    """Full under noeviction: Redis answers reads and refuses every write."""
    await admin.config_set("maxmemory-policy", "noeviction")
    used = int((await admin.info("memory"))["used_memory"])
    await admin.config_set("maxmemory", str(used - 50_000))


async def test_while_redis_refuses_the_counts_the_panel_says_so_and_counts_them_after(
    server: ServerProcess, private_redis: PrivateRedis
) -> None:
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        async with connect_client(server.url) as client:
            campaign_id = await open_campaign(server, client)
            await make_full(admin)
            refused = await refused_unavailable(client, campaign_id, 40)
            missing = await panel_until(server, campaign_id, lambda v: bool(v["figuresMissing"]))
            assert "Redis refuses writes: it is full" in missing["figuresMissing"], missing
            # No figure is shown that would read as a quiet campaign.
            assert missing["requests"] == 0 and missing["refusals"] == {}, missing
            assert missing["p99Ms"] is None and missing["seconds"] == [], missing
            assert missing["campaign"]["issuedCount"] == 1  # PostgreSQL's, whatever Redis does

            await admin.config_set("maxmemory", "0")
            after = await panel_until(
                server,
                campaign_id,
                lambda v: not v["figuresMissing"] and v["refusals"].get("unavailable") == refused,
            )
        assert after["requests"] == 1 + refused, after
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()
    entries = server.log_entries()
    failed = [e for e in entries if e.get("message") == "live stats flush failed"]
    # Once for the outage (not once a second), in Redis's own words.
    assert len(failed) == 1, failed
    assert "OutOfMemoryError" in failed[0]["cause"] and "maxmemory" in failed[0]["cause"], failed
    again = [e for e in entries if e.get("message") == "live stats flushed again"]
    assert len(again) == 1 and again[0]["failed_flushes"] >= 1, again


async def test_the_refusals_of_a_redis_stopped_appear_once_it_is_back(
    server: ServerProcess, private_redis: PrivateRedis
) -> None:
    async with connect_client(server.url) as client:
        campaign_id = await open_campaign(server, client)
        private_redis.kill()
        refused = await refused_unavailable(client, campaign_id, 30)
        down = await panel_until(server, campaign_id, lambda v: bool(v["figuresMissing"]))
        assert down["requests"] == 0, down
        private_redis.start()  # empty: the figures before the outage are gone with it
        await panel_until(
            server,
            campaign_id,
            lambda v: not v["figuresMissing"] and v["refusals"].get("unavailable") == refused,
        )
    entries = server.log_entries()
    failed = [e for e in entries if e.get("message") == "live stats flush failed"]
    assert len(failed) == 1, failed
    assert "refused" in failed[0]["cause"].lower(), failed


async def test_the_p99_covers_requests_refused_after_waiting_on_a_hung_redis(
    server: ServerProcess, private_redis: PrivateRedis
) -> None:
    async with connect_client(server.url) as client:
        campaign_id = await open_campaign(server, client)
        private_redis.pause()
        took: list[float] = []

        async def slow_refusal(user: str) -> None:
            started = time.monotonic()
            with pytest.raises(ConnectError) as caught:
                await client.issue_coupon(
                    coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id=user),
                    timeout_ms=30_000,
                )
            took.append(time.monotonic() - started)
            assert caught.value.code is Code.UNAVAILABLE, caught.value

        try:
            await asyncio.gather(*(slow_refusal(f"hung-{n}") for n in range(5)))
        finally:
            private_redis.resume()
        # The five are all the requests of the p99's last seconds but for the first one.
        view = await panel_until(server, campaign_id, lambda v: v["requests"] >= 6)
    assert view["p99Ms"] is not None and view["p99Ms"] >= 900 * min(took), (view, took)
