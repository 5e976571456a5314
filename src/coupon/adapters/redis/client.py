"""Redis clients for the gate."""

from __future__ import annotations

import redis.asyncio as aioredis


def create_client(url: str, max_connections: int = 64) -> aioredis.Redis:
    # A blocking pool: under a burst, requests queue for a connection instead of failing.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=5,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=15,
    )
    return aioredis.Redis(connection_pool=pool)
