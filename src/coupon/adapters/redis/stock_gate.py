"""The Redis admission gate: keeps the burst off PostgreSQL.

Keys of one campaign share the hash tag `{campaign_id}`, so the gate runs unchanged on
Redis Cluster. Redis may lose everything at any time: PostgreSQL still guarantees I1, I2
and I4, and a campaign whose state is gone is rebuilt from the ledger before any further
admission.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from datetime import datetime
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.typing import EncodableT

from coupon.adapters.redis import admission_reply as wire
from coupon.adapters.redis.admission_reply import Held, ReplyKind
from coupon.adapters.redis.client import FAILURES, RedisClient
from coupon.adapters.redis.script_lane import ScriptLane
from coupon.application.ports import Admission, AdmissionKind, GateView, Handoff, Settles
from coupon.domain.campaign import Campaign
from coupon.domain.coupon import Coupon
from coupon.domain.errors import Overloaded, Unavailable

log = logging.getLogger("coupon")


def _unavailable(exc: BaseException) -> Unavailable:
    return Unavailable("Redis is unavailable", detail=f"{type(exc).__name__}: {exc}")


def _script(name: str) -> str:
    return resources.files("coupon.adapters.redis").joinpath("lua", name).read_text()


# Renews the rebuild lock only while it is still ours; deletes it the same way.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# TIME on the node that holds KEYS[1]: in a cluster, the campaign's own master, whose
# clock its admissions read (a keyless TIME would go to whichever node the client picks).
_TIME = "return redis.call('TIME')"

# A request waiting for the next admission call: a future (`admit`) or a handoff.
_Waiting = tuple[str, Settles[Admission], float]


class RedisStockGate:
    """Admissions of concurrent requests for one campaign share one script call (one round
    trip, one Redis command): with a call in flight, newcomers queue for the next one, so
    batches grow with the load. Confirms are batched too, and nobody waits for them."""

    STALE_BATCH = 50
    MAX_BATCH = 512
    LOAD_CHUNK = 10_000
    # A call the script runs later than this after it was sent admits nobody: a Redis that
    # was stalled (a long fork, SIGSTOP, a failover) does not hand out slots to requests
    # that have long been answered `unavailable`.
    ADMIT_BUDGET_S = 2.0
    # An admission call is given up this long after it was sent, whatever Redis does
    # (hangs, connections that cannot be set up): with a request's 500-ms deadline for
    # reaching a call, every request is answered within 5 s of its arrival. What such a
    # call may have admitted is given back (see _admit_batch).
    ADMIT_WAIT_S = 4.5
    # The rebuild lock: short, renewed while the rebuild runs, so a crashed rebuilder holds
    # a campaign up for seconds, not a minute; others wait for it this long at most.
    LOCK_LEASE_MS = 5_000
    LOCK_RENEW_S = 1.5
    REBUILD_WAIT_S = 8.0
    # How long a call whose reply was lost keeps trying to give its admissions back.
    ABANDON_RETRY_S = (0.05, 0.1, 0.2, 0.5)
    # A graceful shutdown waits this long for the gate's calls (queued confirms, calls in
    # flight, admissions being given back), then gives them up: each is an optimisation the
    # lease makes up for, and every coupon acknowledged is in PostgreSQL already (I5).
    CLOSE_WAIT_S = 2.0

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "coupon",
        lease_seconds: float = 15.0,
        reissue_delay_seconds: float = 1.0,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._lease_us = int(lease_seconds * 1_000_000)
        self._lease_s = lease_seconds
        self._delay_us = int(reissue_delay_seconds * 1_000_000)
        self._admit = client.register_script(_script("admit.lua"))
        self._settle = client.register_script(_script("settle.lua"))
        self._abandon = client.register_script(_script("abandon.lua"))
        self._end = client.register_script(_script("end.lua"))
        self._write_meta = client.register_script(_script("meta.lua"))
        self._load_users = client.register_script(_script("load_users.lua"))
        self._renew = client.register_script(_RENEW)
        self._unlock = client.register_script(_UNLOCK)
        self._time = client.register_script(_TIME)
        # A cluster routes each call by its keys; its client is used as it is.
        self._lane = ScriptLane(client) if isinstance(client, aioredis.Redis) else None
        self._waiting: dict[str, list[_Waiting]] = {}
        self._busy: set[str] = set()
        self._confirms: dict[str, list[str]] = {}  # user, value, user, value, ...
        self._tasks: set[asyncio.Future[None]] = set()
        self._closing = False  # shutting down: no retrying, nothing new once given up
        self._given_up = False
        # Give-backs not retried at shutdown (close says so), and the last one's error.
        self._dropped = 0
        self._dropped_cause = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        # Names this process's admission calls: 'origin.n'.
        self._origin = secrets.token_hex(4)
        self._calls = itertools.count(1)
        # Redis's clock minus ours, in microseconds: a lower bound, from the replies.
        self._offset_us: int | None = None
        self._offset_at = 0.0

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

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if self._given_up:  # after the shutdown's wait: nobody would wait for it
            work.close()
            return
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _wake(self, campaign_id: str) -> None:
        """Make sure the campaign's drain runs: it sends whatever is waiting or queued."""
        if campaign_id not in self._busy:
            self._busy.add(campaign_id)
            # Start on the next loop iteration, so the requests of this one join the batch.
            self._running_loop().call_soon(self._spawn, self._drain(campaign_id))

    async def admit(self, campaign_id: str, user_id: str, deadline: float = 0.0) -> Admission:
        # A caller cancelled while waiting cancels the future; the batch then gives its slot
        # back if it was admitted (see _answer).
        future: asyncio.Future[Admission] = self._running_loop().create_future()
        self._waiting.setdefault(campaign_id, []).append((user_id, future, deadline))
        self._wake(campaign_id)
        return await future

    def admit_soon(
        self, campaign_id: str, user_id: str, deadline: float, handoff: Handoff[Admission]
    ) -> None:
        self._waiting.setdefault(campaign_id, []).append((user_id, handoff, deadline))
        self._wake(campaign_id)

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
        took = 0.0  # how long the call before this batch took
        failed: Unavailable | None = None  # what it failed with, when Redis failed it
        try:
            while campaign_id in self._waiting or campaign_id in self._confirms:
                queue = self._waiting.pop(campaign_id, [])
                if len(queue) > self.MAX_BATCH:
                    self._waiting[campaign_id] = queue[self.MAX_BATCH :]
                    queue = queue[: self.MAX_BATCH]
                started = time.monotonic()
                failed = await self._admit_batch(campaign_id, _in_time(queue, took, failed))
                took = time.monotonic() - started
        finally:
            self._busy.discard(campaign_id)

    def _deadline_us(self, sent_us: int) -> int:
        """The latest Redis time at which this call may still admit (0: not known yet)."""
        if self._offset_us is None:
            return 0
        return sent_us + self._offset_us + int(self.ADMIT_BUDGET_S * 1_000_000)

    def _observe_clock(self, redis_now_us: int) -> None:
        """Each reply bounds Redis's clock from below: it was read before we received it."""
        sample = redis_now_us - time.time_ns() // 1000
        now = time.monotonic()
        if self._offset_us is None or sample > self._offset_us or now - self._offset_at > 10:
            self._offset_us, self._offset_at = sample, now

    async def _admit_batch(self, campaign_id: str, batch: list[_Waiting]) -> Unavailable | None:
        """One admission call; what Redis failed it with, if it did (None: it answered)."""
        confirms = self._confirms.pop(campaign_id, [])
        if not batch and not confirms:
            return None
        token = f"{self._origin}.{next(self._calls)}"
        users = "\0".join([user for user, _, _ in batch])
        keys = self.keys(campaign_id)
        args: list[EncodableT] = [
            self._lease_us,
            self.STALE_BATCH,
            "\0".join(confirms),
            users,
            self._deadline_us(time.time_ns() // 1000),
            token,
        ]
        try:
            if self._lane is not None:
                raw = await self._lane.run(self._admit, keys, args, self.ADMIT_WAIT_S)
            else:
                raw = await self._admit(keys=keys, args=args)
        except BaseException as exc:
            failure = isinstance(exc, FAILURES)
            error = _unavailable(exc) if failure else exc
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(error)
            if batch:
                # The call may have run with its reply lost: nobody records what it admitted.
                self._spawn(self._give_back(campaign_id, token, users))
            if confirms and failure:
                log.warning(
                    "confirms failed; the lease settles those admissions",
                    extra={"campaign_id": campaign_id},
                )
            if not failure:
                raise
            assert isinstance(error, Unavailable)
            return error
        reply = wire.decode(raw)
        self._observe_clock(reply.now_us)
        return self._answer(campaign_id, batch, reply)

    def _answer(
        self, campaign_id: str, batch: list[_Waiting], reply: wire.Reply
    ) -> Unavailable | None:
        """Settle the batch from the script's reply; the error when Redis ran it too late
        to admit anyone (a Redis that was stalled), else None."""
        now = wire.from_micros(reply.now_us)
        kind = reply.kind
        if kind is ReplyKind.TOO_LATE:
            error = Unavailable("Redis is slow: it answered too late to admit anyone; retry")
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(error)
            return error
        if kind is not ReplyKind.DECIDED:
            whole = Admission(
                AdmissionKind.NOT_LOADED
                if kind is ReplyKind.NOT_LOADED
                else AdmissionKind.NOT_STARTED,
                now,
                view=_view(reply) if kind is ReplyKind.NOT_STARTED else None,
            )
            for _, future, _ in batch:
                if not future.done():
                    future.set_result(whole)
            return None
        view: GateView | None = None
        for (user, future, _), result in zip(batch, reply.results, strict=True):
            if type(result) is int:
                if result > 0:
                    if future.done():  # its caller left: nobody records it
                        self._spawn(self._release_quietly(campaign_id, user, result))
                    else:
                        future.set_result(Admission(AdmissionKind.ADMITTED, now, result))
                    continue
                if future.done():
                    continue
                if view is None:
                    view = _view(reply)
                if result == wire.RESULT_SOLD_OUT:
                    future.set_result(
                        Admission(AdmissionKind.SOLD_OUT, now, stale=reply.stale, view=view)
                    )
                else:
                    future.set_result(Admission(AdmissionKind.ENDED, now, view=view))
            elif not future.done():
                assert isinstance(result, Held)
                future.set_result(
                    Admission(
                        AdmissionKind.ALREADY_HELD,
                        now,
                        result.slot,
                        result.pending,
                        ((user, result.slot),) if result.stale else (),
                        wire.held_coupon(campaign_id, user, result.value),
                    )
                )
        return None

    async def _give_back(self, campaign_id: str, token: str, users: str) -> None:
        """Abandon a call whose reply was lost, as soon as Redis answers again: its users
        can then be admitted again at once, not only after the lease."""
        give_up = time.monotonic() + self._lease_s
        delays = itertools.chain(self.ABANDON_RETRY_S, itertools.repeat(self.ABANDON_RETRY_S[-1]))
        for delay in delays:
            try:
                given = await self._abandon(
                    keys=self.keys(campaign_id), args=[token, self._delay_us, users]
                )
            except FAILURES as exc:
                if self._closing:  # shutting down: no retrying (close says so)
                    self._dropped += 1
                    self._dropped_cause = f"{type(exc).__name__}: {exc}"
                    return
                if time.monotonic() + delay > give_up:
                    return  # the lease settles them
                await asyncio.sleep(delay)
                continue
            if given:
                log.info(
                    "gave back admissions of a call whose reply was lost",
                    extra={"campaign_id": campaign_id, "admissions": int(given)},
                )
            return

    async def load(self, campaign: Campaign, holdings: AsyncIterator[Sequence[Coupon]]) -> None:
        """Rebuild from the ledger. One process rebuilds under a short lock that it renews
        while it works; the others wait for the meta key, written last (nobody is admitted
        on half a state), and take over if the lock lapses (the rebuilder died)."""
        meta = self.keys(campaign.id)[0]
        lock = self._lock_key(campaign.id)
        token = secrets.token_hex(8)
        give_up = time.monotonic() + self.REBUILD_WAIT_S
        try:
            while True:
                if await self._client.hexists(meta, "gen"):
                    return
                if await self._client.set(lock, token, nx=True, px=self.LOCK_LEASE_MS):
                    break
                if time.monotonic() > give_up:
                    raise Unavailable("the campaign's gate is being rebuilt; retry")
                await asyncio.sleep(0.05)
            renewing = asyncio.ensure_future(self._keep_lock(lock, token))
            try:
                if not await self._client.hexists(meta, "gen"):
                    await self._rebuild(campaign, holdings)
            finally:
                renewing.cancel()
                await self._unlock(keys=[lock], args=[token])
        except FAILURES as exc:
            raise _unavailable(exc) from exc

    async def _keep_lock(self, lock: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.LOCK_RENEW_S)
            try:
                await self._renew(keys=[lock], args=[token, self.LOCK_LEASE_MS])
            except FAILURES:
                continue  # the rebuild's own commands fail the same way and report it

    async def _rebuild(self, campaign: Campaign, holdings: AsyncIterator[Sequence[Coupon]]) -> None:
        meta, users, free, pending = self.keys(campaign.id)
        client = self._client
        # Any state there is partial or of an older script version: start clean.
        await client.delete(meta, users, free, pending)
        seconds, micros = await self._time(keys=[meta])
        started_us = int(seconds) * 1_000_000 + int(micros)
        taken = bytearray(campaign.total_coupons + 1)
        top = count = 0
        async for chunk in holdings:
            if not chunk:
                continue
            for start in range(0, len(chunk), self.LOAD_CHUNK):
                part = chunk[start : start + self.LOAD_CHUNK]
                packed = "\0".join([f for c in part for f in (c.user_id, wire.holding(c))])
                await self._load_users(keys=[users], args=[packed])
            for coupon in chunk:
                taken[coupon.slot] = 1
                top = max(top, coupon.slot)
            count += len(chunk)
        # Slots below the top that nobody holds were admitted and never recorded: issuable
        # again once no process can still be answering "sold out" from memory.
        reopen = started_us + self._delay_us
        gaps = [slot for slot in range(1, top + 1) if not taken[slot]]
        for start in range(0, len(gaps), self.LOAD_CHUNK):
            await client.zadd(
                free, {str(slot): reopen for slot in gaps[start : start + self.LOAD_CHUNK]}
            )
        end = campaign.effective_end
        fields: dict[str, str | int] = {
            "total": campaign.total_coupons,
            "starts": wire.micros(min(campaign.starts_at, end or campaign.starts_at)),
            "ends": wire.NO_END if end is None else wire.micros(end),
            "next": top,
            "gen": f"{started_us}.{secrets.token_hex(4)}",
            "adm": 0,
        }
        # Written last (admissions wait for it), with the end EndCampaign recorded in Redis
        # applied in the same step (meta.lua).
        await self._write_meta(
            keys=[meta, self._ended_key(campaign.id)],
            args=[item for pair in fields.items() for item in pair],
        )
        log.info(
            "gate loaded",
            extra={"campaign_id": campaign.id, "holdings": count, "free": len(gaps)},
        )

    def confirm(self, coupon: Coupon) -> None:
        """Queued: sent with the campaign's next admission batch (a batch of no requests if
        none comes); nobody waits for it. A confirm that never arrives is harmless: the
        lease settles the admission later."""
        self._confirms.setdefault(coupon.campaign_id, []).extend(
            (coupon.user_id, wire.holding(coupon))
        )
        self._wake(coupon.campaign_id)

    async def close(self) -> None:
        """Send queued confirms and wait for the calls in flight (graceful shutdown), for
        CLOSE_WAIT_S at most: a Redis that is down or hangs does not hold the exit. What is
        left then is given up, in one warning line; the lease settles those admissions."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.CLOSE_WAIT_S
        while (self._tasks or self._busy) and loop.time() < deadline:
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=deadline - loop.time())
            else:  # a drain is scheduled (see _wake) but has not started yet
                await asyncio.sleep(0)
        left = list(self._tasks)
        if left or self._busy:
            self._given_up = True
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
        if left or self._dropped:
            cause = self._dropped_cause or f"no answer in {self.CLOSE_WAIT_S:g} s"
            log.warning(
                "gate calls given up at shutdown: Redis is unavailable; the lease settles "
                "their admissions",
                extra={"calls": len(left) + self._dropped, "cause": cause},
            )
        if self._lane is not None:
            await self._lane.close()

    async def release(self, campaign_id: str, user_id: str, slot: int) -> None:
        await self._settle_call(campaign_id, user_id, slot, "release")

    async def forget(self, campaign_id: str, user_id: str, slot: int) -> None:
        await self._settle_call(campaign_id, user_id, slot, "forget")

    async def _settle_call(self, campaign_id: str, user_id: str, slot: int, mode: str) -> None:
        try:
            await self._settle(
                keys=self.keys(campaign_id), args=[user_id, slot, mode, self._delay_us]
            )
        except FAILURES as exc:
            raise _unavailable(exc) from exc

    async def end(self, campaign_id: str, at: datetime | None) -> datetime:
        meta = self.keys(campaign_id)[0]
        try:
            reply = await self._end(
                keys=[meta, self._ended_key(campaign_id)],
                args=["" if at is None else wire.micros(at)],
            )
        except FAILURES as exc:
            raise _unavailable(exc) from exc
        return wire.from_micros(int(reply[1]))

    async def ended_at(self, campaign_id: str) -> datetime | None:
        try:
            value = await self._client.get(self._ended_key(campaign_id))
        except FAILURES as exc:
            raise _unavailable(exc) from exc
        return None if value is None else wire.from_micros(int(value))

    async def pending_users(self, campaign_id: str) -> Sequence[str]:
        try:
            found: list[Any] = await self._client.zrange(self.keys(campaign_id)[3], 0, -1)
        except FAILURES as exc:
            raise _unavailable(exc) from exc
        return [user.decode() if isinstance(user, bytes) else str(user) for user in found]

    async def pending_count(self, campaign_id: str, end: datetime) -> int:
        # Scored by admission time (admit.lua): those within the lease before the end.
        until = wire.micros(end)
        try:
            found = await self._client.zcount(
                self.keys(campaign_id)[3], until - self._lease_us, f"({until}"
            )
        except FAILURES as exc:
            raise _unavailable(exc) from exc
        return int(found)


def _in_time(
    queue: list[_Waiting], previous_call: float, failed: Unavailable | None = None
) -> list[_Waiting]:
    """The requests still worth sending: one whose deadline passed while it waited for the
    call before it is answered untouched (nothing taken, nothing to undo): with what that
    call failed with when Redis failed it (unreachable, hung past ADMIT_WAIT_S, too late to
    admit), as the requests in it were, since Redis is what held them up; else
    `Overloaded`."""
    now = 0.0
    kept: list[_Waiting] = []
    late: Unavailable | None = failed
    for entry in queue:
        deadline = entry[2]
        if deadline:
            if not now:
                now = time.monotonic()
            if deadline < now:
                future = entry[1]
                if late is None:
                    # The call's time counts this process's own delays (a busy event
                    # loop) as well as Redis's: it is not said to be Redis's alone.
                    late = Overloaded(
                        f"the gate is slow: the admission call before took "
                        f"{previous_call:.1f} s; retry"
                        if previous_call > 0.25
                        else "waited too long for the gate; retry"
                    )
                if not future.done():
                    future.set_exception(late)
                continue
        kept.append(entry)
    return kept


def _view(reply: wire.Reply) -> GateView:
    return GateView(
        version=reply.version,
        starts_at=wire.from_micros(reply.starts_us),
        ends_at=None if reply.ends_us == wire.NO_END else wire.from_micros(reply.ends_us),
        reopens_at=wire.from_micros(reply.reopens_us) if reply.reopens_us else None,
    )
