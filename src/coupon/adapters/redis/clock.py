"""Redis's clock: the one clock all server processes share (I3)."""

from __future__ import annotations

from datetime import UTC, datetime

from coupon.adapters.redis.client import FAILURES, RedisClient
from coupon.domain.errors import Unavailable


class RedisClock:
    """Redis's clock: the one clock all server processes share (I3)."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client

    async def now(self) -> datetime:
        try:
            seconds, micros = await self._client.time()
        except FAILURES as exc:
            raise Unavailable(
                "Redis is unavailable", detail=f"{type(exc).__name__}: {exc}"
            ) from exc
        return datetime.fromtimestamp(int(seconds), UTC).replace(microsecond=int(micros))
