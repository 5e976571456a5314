"""Live counters in Redis: one hash per campaign and second, added to by every server
process once a second (HINCRBY), expiring after a couple of minutes. The campaign's hash
tag keeps them on its node in a cluster."""

from __future__ import annotations

from collections.abc import Sequence

from redis.exceptions import RedisError

from coupon.adapters.redis.client import RedisClient
from coupon.application.ports import LiveCounts
from coupon.domain.errors import Unavailable


class RedisLiveStats:
    KEEP_SECONDS = 120

    def __init__(self, client: RedisClient, *, prefix: str = "coupon") -> None:
        self._client = client
        self._prefix = prefix

    def key(self, campaign_id: str, second: int) -> str:
        return f"{self._prefix}:{{{campaign_id}}}:live:{second}"

    async def add(self, counts: LiveCounts) -> None:
        if not counts:
            return
        pipe = self._client.pipeline(transaction=False)
        for (campaign_id, second), fields in counts.items():
            key = self.key(campaign_id, second)
            for name, count in fields.items():
                pipe.hincrby(key, name, count)
            pipe.expire(key, self.KEEP_SECONDS)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis is unavailable: {type(exc).__name__}: {exc}") from exc

    async def read(self, campaign_id: str, seconds: Sequence[int]) -> dict[int, dict[str, int]]:
        pipe = self._client.pipeline(transaction=False)
        for second in seconds:
            pipe.hgetall(self.key(campaign_id, second))
        try:
            replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis is unavailable: {type(exc).__name__}: {exc}") from exc
        return {
            second: {name.decode(): int(count) for name, count in reply.items()}
            for second, reply in zip(seconds, replies, strict=True)
            if reply
        }
