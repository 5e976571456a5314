"""The one-server Redis client survives a Redis restart without failing a command."""

from __future__ import annotations

import asyncio

from coupon.adapters.redis.client import create_client
from harness.private_redis import PrivateRedis


async def test_commands_after_a_restart_reconnect_instead_of_failing() -> None:
    redis = PrivateRedis()
    client = create_client(redis.url)
    try:
        await asyncio.gather(*(client.time() for _ in range(8)))  # several idle connections
        redis.restart()  # each of them now closed by the server
        for _ in range(10):
            seconds, _ = await client.time()
            assert seconds > 0
    finally:
        await client.aclose()
        redis.close()
