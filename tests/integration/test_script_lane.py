"""The gate's admission script runs on connections it sets aside from the client's pool;
they recover from what a pooled connection recovers from, and go back to the pool."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from coupon.adapters.redis.client import create_client
from coupon.adapters.redis.stock_gate import RedisStockGate
from coupon.application.ports import AdmissionKind
from coupon.application.use_cases import new_campaign_id
from coupon.domain.campaign import Campaign
from coupon.domain.coupon import Coupon
from harness.private_redis import PrivateRedis


async def no_holdings() -> AsyncIterator[Sequence[Coupon]]:
    return
    yield


async def loaded_gate(client: aioredis.Redis, prefix: str) -> tuple[RedisStockGate, str]:
    gate = RedisStockGate(client, prefix=prefix)
    now = datetime.now(UTC)
    campaign = Campaign(new_campaign_id(), "lane", 100, now - timedelta(minutes=1), None, now)
    await gate.load(campaign, no_holdings())
    return gate, campaign.id


async def lane_client_id(gate: RedisStockGate) -> int:
    """The server's id of the gate's one idle connection."""
    assert gate._lane is not None
    (conn,) = gate._lane._idle
    await conn.send_command("CLIENT", "ID")
    return int(await conn.read_response())


def in_use(client: aioredis.Redis) -> int:
    return len(client.connection_pool._in_use_connections)


async def test_a_connection_the_server_closed_is_replaced(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    gate, campaign = await loaded_gate(redis_client, redis_prefix)
    assert (await gate.admit(campaign, "before")).kind is AdmissionKind.ADMITTED
    killed = await lane_client_id(gate)
    assert await redis_client.client_kill_filter(_id=str(killed)) == 1
    # The next batch finds the connection closed, and runs on a new one.
    assert (await gate.admit(campaign, "after")).kind is AdmissionKind.ADMITTED
    assert await lane_client_id(gate) != killed
    await gate.close()


async def test_a_script_the_server_lost_is_loaded_again(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    gate, campaign = await loaded_gate(redis_client, redis_prefix)
    real = gate._admit.sha
    gate._admit.sha = "0" * 40  # what the server answers for a lost script: NOSCRIPT
    assert (await gate.admit(campaign, "u1")).kind is AdmissionKind.ADMITTED
    assert gate._admit.sha == real
    await gate.close()


async def test_connections_go_back_to_the_pool_on_close(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    before = in_use(redis_client)
    gate, campaign = await loaded_gate(redis_client, redis_prefix)
    for i in range(50):
        await gate.admit(campaign, f"u{i}")
    assert in_use(redis_client) > before
    await gate.close()
    assert in_use(redis_client) == before


async def test_a_redis_restart_costs_no_batch() -> None:
    """Every connection, kept by the gate or idle in the pool, is closed by the restart;
    the next batch still gets its answer (the state is gone: not loaded)."""
    redis = PrivateRedis()
    client = create_client(redis.url)
    try:
        gate, campaign = await loaded_gate(client, "lane")
        await asyncio.gather(*(client.time() for _ in range(8)))  # idle pooled connections
        assert (await gate.admit(campaign, "before")).kind is AdmissionKind.ADMITTED
        redis.restart()
        assert (await gate.admit(campaign, "after")).kind is AdmissionKind.NOT_LOADED
        await gate.close()
    finally:
        await client.aclose()
        redis.close()
