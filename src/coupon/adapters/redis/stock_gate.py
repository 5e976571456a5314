"""The Redis admission gate: keeps the burst off PostgreSQL.

Keys of one campaign share the hash tag `{campaign_id}`, so the gate runs unchanged on
Redis Cluster. Redis may lose everything at any time: PostgreSQL still guarantees I1, I2
and I4, and a campaign whose state is gone is rebuilt from the ledger before any further
admission.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.typing import EncodableT

from coupon.adapters.redis.client import RedisClient
from coupon.application.ports import Admission, AdmissionKind
from coupon.domain.campaign import Campaign
from coupon.domain.coupon import Coupon
from coupon.domain.errors import Unavailable

log = logging.getLogger("coupon")


def _unavailable(exc: BaseException) -> Unavailable:
    return Unavailable(f"Redis is unavailable: {type(exc).__name__}: {exc}")


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


def _holding(coupon: Coupon) -> str:
    """The users-hash value of a committed coupon: 'slot|code|issued_at in microseconds'."""
    return f"{coupon.slot}|{coupon.code}|{_micros(coupon.issued_at)}"


def _held(campaign_id: str, user_id: str, value: bytes) -> Coupon | None:
    parts = value.decode().split("|")
    if len(parts) != 3:
        return None  # still pending: no coupon yet
    return Coupon(parts[1], campaign_id, user_id, _from_micros(int(parts[2])), int(parts[0]))


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

    def __init__(self, client: RedisClient) -> None:
        self._client = client

    async def now(self) -> datetime:
        try:
            seconds, micros = await self._client.time()
        except (RedisError, OSError) as exc:
            raise Unavailable(f"Redis is unavailable: {exc}") from exc
        return datetime.fromtimestamp(int(seconds), UTC).replace(microsecond=int(micros))


async def _call(conn: AbstractConnection, *command: EncodableT) -> Any:
    """One command on `conn`, bypassing the pool's health check, and its reply."""
    await conn.send_packed_command(conn.pack_command(*command), check_health=False)
    return await conn.read_response()


class ScriptLane:
    """Runs scripts on connections set aside from a one-server client's pool.

    The client's own path (`execute_command`) takes a connection from the pool under a lock
    and a timeout, checks it for unread data, and goes through retry and observability
    hooks on every call: 125 us of CPU per admission batch, against 60 us here. The gate
    has at most one batch in flight per campaign, so a few connections serve them all.
    """

    ATTEMPTS = 3

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pool = client.connection_pool
        self._idle: list[AbstractConnection] = []

    async def run(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[EncodableT]
    ) -> Any:
        for attempt in range(1, self.ATTEMPTS + 1):
            conn = self._idle.pop() if self._idle else await self._connection()
            try:
                reply = await self._evalsha(conn, script, keys, args)
            except (RedisConnectionError, OSError):
                # A connection the server has closed (Redis restarted, or dropped an idle
                # client), kept here or idle in the pool: once more on another, as the
                # client's own retry would.
                await self._drop(conn)
                if attempt == self.ATTEMPTS:
                    raise
                continue
            except BaseException:
                # A reply may still be on its way: the connection cannot be used again.
                await self._drop(conn)
                raise
            self._idle.append(conn)
            return reply
        raise AssertionError("unreachable")

    async def _evalsha(
        self,
        conn: AbstractConnection,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[EncodableT],
    ) -> Any:
        try:
            return await _call(conn, "EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            # The server lost its scripts (restarted, flushed): load it and send again.
            script.sha = await self._client.script_load(script.script)
        return await _call(conn, "EVALSHA", script.sha, len(keys), *keys, *args)

    async def _connection(self) -> AbstractConnection:
        conn: AbstractConnection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        return conn

    async def _drop(self, conn: AbstractConnection) -> None:
        await conn.disconnect()
        await self._pool.release(conn)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._pool.release(conn)


class RedisStockGate:
    """Admissions of concurrent requests for one campaign share one script call (one round
    trip, one Redis command): with a call in flight, newcomers queue for the next one, so
    batches grow with the load. Confirms are batched too, and nobody waits for them."""

    STALE_BATCH = 50
    MAX_BATCH = 512
    LOAD_CHUNK = 10_000

    def __init__(
        self, client: RedisClient, *, prefix: str = "coupon", lease_seconds: float = 15.0
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._lease_us = int(lease_seconds * 1_000_000)
        self._admit = client.register_script(_script("admit.lua"))
        # A cluster routes each call by its keys; its client is used as it is.
        self._lane = ScriptLane(client) if isinstance(client, aioredis.Redis) else None
        self._settle = client.register_script(_script("settle.lua"))
        self._end = client.register_script(_script("end.lua"))
        self._write_meta = client.register_script(_script("meta.lua"))
        self._waiting: dict[str, list[tuple[str, asyncio.Future[Admission]]]] = {}
        self._busy: set[str] = set()
        self._confirms: dict[str, list[str]] = {}  # user, value, user, value, ...
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the gate (and its connections) run on, looked up once: on Python 3.11
        each asyncio.get_running_loop() is a getpid() system call, two per request here."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def keys(self, campaign_id: str) -> list[str]:
        tag = f"{self._prefix}:{{{campaign_id}}}"
        return [f"{tag}:meta", f"{tag}:users", f"{tag}:free", f"{tag}:pending"]

    def _lock_key(self, campaign_id: str) -> str:
        return f"{self._prefix}:{{{campaign_id}}}:loading"

    def _ended_key(self, campaign_id: str) -> str:
        return f"{self._prefix}:{{{campaign_id}}}:ended"

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _wake(self, campaign_id: str) -> None:
        """Make sure the campaign's drain runs: it sends whatever is waiting or queued."""
        if campaign_id not in self._busy:
            self._busy.add(campaign_id)
            # Start on the next loop iteration, so the requests of this one join the batch.
            self._running_loop().call_soon(self._spawn, self._drain(campaign_id))

    async def admit(self, campaign_id: str, user_id: str) -> Admission:
        future: asyncio.Future[Admission] = self._running_loop().create_future()
        self._waiting.setdefault(campaign_id, []).append((user_id, future))
        self._wake(campaign_id)
        # A caller cancelled while waiting cancels `future`; the batch then gives its slot
        # back if it was admitted (see _admit_batch).
        return await future

    async def _release_quietly(self, campaign_id: str, user_id: str, slot: int) -> None:
        try:
            await self.release(campaign_id, user_id, slot)
        except Unavailable:
            log.warning(
                "release failed; the lease will return the slot", extra={"campaign_id": campaign_id}
            )

    async def _drain(self, campaign_id: str) -> None:
        """One script call at a time per campaign: the requests and confirms that queued
        meanwhile go together in the next."""
        try:
            while campaign_id in self._waiting or campaign_id in self._confirms:
                queue = self._waiting.pop(campaign_id, [])
                if len(queue) > self.MAX_BATCH:
                    self._waiting[campaign_id] = queue[self.MAX_BATCH :]
                    queue = queue[: self.MAX_BATCH]
                await self._admit_batch(campaign_id, queue)
        finally:
            self._busy.discard(campaign_id)

    async def _admit_batch(
        self, campaign_id: str, batch: list[tuple[str, asyncio.Future[Admission]]]
    ) -> None:
        confirms = self._confirms.pop(campaign_id, [])
        try:
            keys = self.keys(campaign_id)
            args: list[EncodableT] = [
                self._lease_us,
                self.STALE_BATCH,
                "\0".join(confirms),
                "\0".join([user for user, _ in batch]),
            ]
            if self._lane is not None:
                reply = await self._lane.run(self._admit, keys, args)
            else:
                reply = await self._admit(keys=keys, args=args)
        except BaseException as exc:
            error = _unavailable(exc) if isinstance(exc, (RedisError, OSError)) else exc
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if confirms and error is not exc:
                log.warning(
                    "confirms failed; the lease settles those admissions",
                    extra={"campaign_id": campaign_id},
                )
            if error is exc:
                raise
            return
        now = _from_micros(int(reply[0]))
        tag = reply[1]
        if tag != b"M":
            whole = Admission(_KINDS[tag], now)
            for _, future in batch:
                if not future.done():
                    future.set_result(whole)
            return
        stale = _pairs(reply[3])
        for (user, future), result in zip(batch, reply[2], strict=True):
            # A slot number: admitted; 0: sold out; a list: already held (see admit.lua).
            if future.done():
                if type(result) is int and result > 0:  # its caller left: nobody records it
                    self._spawn(self._release_quietly(campaign_id, user, result))
                continue
            if type(result) is int:
                if result > 0:
                    future.set_result(Admission(AdmissionKind.ADMITTED, now, result))
                else:
                    future.set_result(Admission(AdmissionKind.SOLD_OUT, now, stale=stale))
            else:
                slot = int(result[0])
                own = ((user, slot),) if result[2] else ()
                held = _held(campaign_id, user, result[3])
                future.set_result(
                    Admission(AdmissionKind.ALREADY_HELD, now, slot, bool(result[1]), own, held)
                )

    async def load(self, campaign: Campaign, holdings: Sequence[Coupon]) -> None:
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
                taken = {c.slot for c in holdings}
                top = max(taken, default=0)
                for start in range(0, len(holdings), self.LOAD_CHUNK):
                    chunk = holdings[start : start + self.LOAD_CHUNK]
                    await self._client.hset(users, mapping={c.user_id: _holding(c) for c in chunk})
                gaps = [s for s in range(1, top + 1) if s not in taken]
                for start in range(0, len(gaps), self.LOAD_CHUNK):
                    await self._client.rpush(free, *gaps[start : start + self.LOAD_CHUNK])
                end = campaign.effective_end
                ends = -1 if end is None else _micros(end)
                # With the end EndCampaign recorded in Redis applied (meta.lua).
                fields = {
                    "total": campaign.total_coupons,
                    "starts": _micros(min(campaign.starts_at, end or campaign.starts_at)),
                    "ends": ends,
                    "next": top,
                }
                await self._write_meta(
                    keys=[meta, self._ended_key(campaign.id)],
                    args=[item for pair in fields.items() for item in pair],
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
            raise _unavailable(exc) from exc

    async def _wait_loaded(self, meta: str, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if await self._client.exists(meta):
                return
            await asyncio.sleep(0.05)
        raise Unavailable("the campaign's gate is still being rebuilt; retry")

    async def confirm(self, coupon: Coupon) -> None:
        """Queued: sent with the campaign's next admission batch (a batch of no requests if
        none comes); nobody waits for it. A confirm that never arrives is harmless: the
        lease settles the admission later."""
        self._confirms.setdefault(coupon.campaign_id, []).extend((coupon.user_id, _holding(coupon)))
        self._wake(coupon.campaign_id)

    async def close(self) -> None:
        """Send queued confirms and wait for batches in flight (graceful shutdown)."""
        while self._tasks or self._busy:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            else:  # a drain is scheduled (see _wake) but has not started yet
                await asyncio.sleep(0)
        if self._lane is not None:
            await self._lane.close()

    async def release(self, campaign_id: str, user_id: str, slot: int) -> None:
        await self._settle_call(campaign_id, user_id, slot, "release")

    async def forget(self, campaign_id: str, user_id: str, slot: int) -> None:
        await self._settle_call(campaign_id, user_id, slot, "forget")

    async def _settle_call(self, campaign_id: str, user_id: str, slot: int, mode: str) -> None:
        try:
            await self._settle(keys=self.keys(campaign_id), args=[user_id, slot, mode])
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def end(self, campaign_id: str, at: datetime | None) -> datetime:
        meta = self.keys(campaign_id)[0]
        try:
            reply = await self._end(
                keys=[meta, self._ended_key(campaign_id)],
                args=["" if at is None else _micros(at)],
            )
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return _from_micros(int(reply[1]))

    async def ended_at(self, campaign_id: str) -> datetime | None:
        try:
            value = await self._client.get(self._ended_key(campaign_id))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return None if value is None else _from_micros(int(value))
