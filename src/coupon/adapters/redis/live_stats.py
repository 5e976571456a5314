"""Live counters in Redis: one hash per campaign and second, added to by every server
process once a second, expiring after a couple of minutes. The campaign's hash tag keeps
them on its node in a cluster.

Each campaign's counts go in a script call of their own rather than in one pipeline: in a
cluster, redis-py closes every connection of the client when a pipeline meets a node that
is down, which would fail the requests of campaigns on the nodes that are up. A call that
fails touches only its node, like any request of that campaign, and only its counts are
kept by the process for its next flush (LiveCountsNotStored).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources

from redis.exceptions import OutOfMemoryError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from coupon.adapters.redis.client import FAILURES, RedisClient
from coupon.application.ports import LiveCounts, LiveCountsNotStored
from coupon.domain.errors import Unavailable


def _script(name: str) -> str:
    return resources.files("coupon.adapters.redis").joinpath("lua", name).read_text()


def _unavailable(exc: BaseException) -> Unavailable:
    return Unavailable("Redis is unavailable", detail=f"{type(exc).__name__}: {exc}")


# A call not answered in time: Redis may still run it (a hung server runs what it was sent
# once it wakes), so its counts are not sent again.
_UNANSWERED = (TimeoutError, RedisTimeoutError)


def _why(exc: BaseException) -> str:
    """Why counts were not stored, for the panel: what kind of failure, not its details."""
    if isinstance(exc, OutOfMemoryError):
        return "Redis refuses writes: it is full (maxmemory)"
    if isinstance(exc, ReadOnlyError):
        return "Redis refuses writes: it is a read-only replica"
    if isinstance(exc, _UNANSWERED):
        return "Redis does not answer in time"
    return "Redis is unavailable"


class RedisLiveStats:
    KEEP_SECONDS = 120
    # A campaign's counts not added within this are dropped (figures, not coupons): a
    # master that hangs holds up neither the next flush nor the other campaigns' counts.
    ADD_WAIT_SECONDS = 2.0

    def __init__(self, client: RedisClient, *, prefix: str = "coupon") -> None:
        self._prefix = prefix
        self._add = client.register_script(_script("live_add.lua"))
        self._read = client.register_script(_script("live_read.lua"))

    def key(self, campaign_id: str, second: int) -> str:
        return f"{self._prefix}:{{{campaign_id}}}:live:{second}"

    async def add(self, counts: LiveCounts) -> None:
        keys = []
        calls = []
        for key, fields in counts.items():
            campaign_id, second = key
            args: list[str | int] = [self.KEEP_SECONDS]
            for name, count in fields.items():
                args += (name, count)
            call = self._add(keys=[self.key(campaign_id, second)], args=args)
            keys.append(key)
            calls.append(asyncio.wait_for(call, self.ADD_WAIT_SECONDS))
        results = await asyncio.gather(*calls, return_exceptions=True)
        failure: BaseException | None = None
        not_stored = {}
        for key, result in zip(keys, results, strict=True):
            if not isinstance(result, BaseException):
                continue
            if not isinstance(result, FAILURES):  # TimeoutError is an OSError
                raise result
            if failure is None or isinstance(failure, _UNANSWERED):
                failure = result  # the first, but a refusal says more than a silence
            if not isinstance(result, _UNANSWERED):
                not_stored[key] = counts[key]
        if failure is not None:
            raise LiveCountsNotStored(
                _why(failure), not_stored, detail=f"{type(failure).__name__}: {failure}"
            )

    async def read(self, campaign_id: str, seconds: Sequence[int]) -> dict[int, dict[str, int]]:
        if not seconds:
            return {}
        try:
            replies = await self._read(keys=[self.key(campaign_id, s) for s in seconds])
        except FAILURES as exc:
            raise _unavailable(exc) from exc
        found = {}
        for second, flat in zip(seconds, replies, strict=True):
            if flat:
                found[second] = {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        return found
