"""The Redis admission gate: keeps the burst off PostgreSQL.

Keys of one campaign share the hash tag `{campaign_id}`, so the gate runs unchanged on
Redis Cluster. Redis may lose everything at any time: PostgreSQL still guarantees I1, I2
and I4, and a campaign whose state is gone is rebuilt from the ledger before any further
admission.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from coupon.application.ports import Admission, AdmissionKind
from coupon.domain.campaign import Campaign
from coupon.domain.errors import Unavailable

log = logging.getLogger("coupon")


def _script(name: str) -> str:
    return resources.files("coupon.adapters.redis").joinpath("lua", name).read_text()


def _micros(value: datetime) -> int:
    return int(value.timestamp()) * 1_000_000 + value.microsecond


def _from_micros(value: int) -> datetime:
    return datetime.fromtimestamp(value // 1_000_000, UTC).replace(microsecond=value % 1_000_000)


def _pairs(flat: Sequence[Any]) -> tuple[tuple[str, int], ...]:
    return tuple(
        (flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i]), int(flat[i + 1]))
        for i in range(0, len(flat) - 1, 2)
    )


_KINDS = {
    b"A": AdmissionKind.ADMITTED,
    b"H": AdmissionKind.ALREADY_HELD,
    b"S": AdmissionKind.SOLD_OUT,
    b"B": AdmissionKind.NOT_STARTED,
    b"E": AdmissionKind.ENDED,
    b"L": AdmissionKind.NOT_LOADED,
}


class RedisClock:
    """Redis's clock: the one clock all server processes share (I3)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    async def now(self) -> datetime:
        try:
            seconds, micros = await self._client.time()
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis is unavailable: {exc}") from exc
        return datetime.fromtimestamp(int(seconds), UTC).replace(microsecond=int(micros))


class RedisStockGate:
    STALE_BATCH = 50
    LOAD_CHUNK = 10_000

    def __init__(
        self, client: aioredis.Redis, *, prefix: str = "coupon", lease_seconds: float = 15.0
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._lease_us = int(lease_seconds * 1_000_000)
        self._admit = client.register_script(_script("admit.lua"))
        self._settle = client.register_script(_script("settle.lua"))

    def keys(self, campaign_id: str) -> list[str]:
        tag = f"{self._prefix}:{{{campaign_id}}}"
        return [f"{tag}:meta", f"{tag}:users", f"{tag}:free", f"{tag}:pending"]

    def _lock_key(self, campaign_id: str) -> str:
        return f"{self._prefix}:{{{campaign_id}}}:loading"

    async def admit(self, campaign_id: str, user_id: str) -> Admission:
        try:
            reply = await self._admit(
                keys=self.keys(campaign_id), args=[user_id, self._lease_us, self.STALE_BATCH]
            )
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis is unavailable: {type(exc).__name__}: {exc}") from exc
        kind = _KINDS[reply[0]]
        now = _from_micros(int(reply[1]))
        if kind is AdmissionKind.ADMITTED:
            return Admission(kind, now, int(reply[2]))
        if kind is AdmissionKind.ALREADY_HELD:
            return Admission(kind, now, int(reply[2]), bool(reply[3]), _pairs(reply[4:]))
        if kind is AdmissionKind.SOLD_OUT:
            return Admission(kind, now, stale=_pairs(reply[2:]))
        return Admission(kind, now)

    async def load(self, campaign: Campaign, holdings: Sequence[tuple[str, int]]) -> None:
        """Rebuild from the ledger. One process loads (a short Redis lock); the others wait
        for the meta key, which is written last, so nobody is admitted on half a state."""
        meta, users, free, pending = self.keys(campaign.id)
        lock = self._lock_key(campaign.id)
        try:
            if await self._client.exists(meta):
                return
            if not await self._client.set(lock, "1", nx=True, px=60_000):
                await self._wait_loaded(meta)
                return
            try:
                if await self._client.exists(meta):
                    return
                await self._client.delete(users, free, pending)
                taken = {slot for _, slot in holdings}
                top = max(taken, default=0)
                for start in range(0, len(holdings), self.LOAD_CHUNK):
                    chunk = holdings[start : start + self.LOAD_CHUNK]
                    await self._client.hset(users, mapping=dict(chunk))
                gaps = [s for s in range(1, top + 1) if s not in taken]
                for start in range(0, len(gaps), self.LOAD_CHUNK):
                    await self._client.rpush(free, *gaps[start : start + self.LOAD_CHUNK])
                ends = -1 if campaign.ends_at is None else _micros(campaign.ends_at)
                await self._client.hset(
                    meta,
                    mapping={
                        "total": campaign.total_coupons,
                        "starts": _micros(campaign.starts_at),
                        "ends": ends,
                        "next": top,
                    },
                )
                log.info(
                    "gate loaded",
                    extra={
                        "campaign_id": campaign.id,
                        "holdings": len(holdings),
                        "free": len(gaps),
                    },
                )
            finally:
                await self._client.delete(lock)
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis is unavailable: {type(exc).__name__}: {exc}") from exc

    async def _wait_loaded(self, meta: str, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if await self._client.exists(meta):
                return
            await asyncio.sleep(0.05)
        raise Unavailable("the campaign's gate is still being rebuilt; retry")

    async def confirm(self, campaign_id: str, user_id: str) -> None:
        try:
            await self._client.zrem(self.keys(campaign_id)[3], user_id)
        except (RedisError, OSError, RedisTimeoutError):
            # Harmless: an unconfirmed admission is settled against the ledger later.
            log.warning("confirm failed", extra={"campaign_id": campaign_id})

    async def release(self, campaign_id: str, user_id: str, slot: int) -> None:
        await self._settle_call(campaign_id, user_id, slot, "release")

    async def forget(self, campaign_id: str, user_id: str, slot: int) -> None:
        await self._settle_call(campaign_id, user_id, slot, "forget")

    async def _settle_call(self, campaign_id: str, user_id: str, slot: int, mode: str) -> None:
        try:
            await self._settle(keys=self.keys(campaign_id), args=[user_id, slot, mode])
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis is unavailable: {type(exc).__name__}: {exc}") from exc
