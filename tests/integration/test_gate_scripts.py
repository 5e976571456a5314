"""The Redis gate's scripts, called as the gate calls them, on what only they see: the token
that names an admission call (a call sent again, a call whose reply was lost), the deadline
a stalled Redis runs a call after, and Redis's own clock to the microsecond."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from coupon.adapters.redis import admission_reply as wire
from coupon.adapters.redis.admission_reply import Held, ReplyKind
from coupon.adapters.redis.stock_gate import RedisStockGate
from coupon.application.ports import AdmissionKind
from coupon.application.use_cases import new_campaign_id
from coupon.domain.campaign import Campaign
from coupon.domain.coupon import Coupon

DELAY = 0.2  # the gate's reissue delay here

# admit.lua as it is, with Redis's clock read as ARGV[7] seconds and ARGV[8] microseconds:
# a local `redis` shadows the global one for the whole script, TIME aside.
_AT_FIXED_TIME = """
local real = redis
local redis = setmetatable({call = function(command, ...)
  if command == 'TIME' then return {ARGV[7], ARGV[8]} end
  return real.call(command, ...)
end}, {__index = real})
"""


async def no_holdings() -> AsyncIterator[Sequence[Coupon]]:
    return
    yield


async def loaded(
    client: aioredis.Redis,
    prefix: str,
    total: int,
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
    delay: float = DELAY,
) -> tuple[RedisStockGate, str]:
    gate = RedisStockGate(client, prefix=prefix, reissue_delay_seconds=delay)
    now = datetime.now(UTC)
    starts_at = starts_at or now - timedelta(minutes=1)
    campaign = Campaign(new_campaign_id(), "scripts", total, starts_at, ends_at, now)
    await gate.load(campaign, no_holdings())
    return gate, campaign.id


def admit_args(
    gate: RedisStockGate, users: Sequence[str], token: str, deadline: int = 0
) -> list[Any]:
    """The admission script's arguments as the gate sends them (no confirms)."""
    return [gate._lease_us, gate.STALE_BATCH, "", "\0".join(users), deadline, token]


async def admit(
    gate: RedisStockGate, campaign_id: str, users: Sequence[str], token: str, deadline: int = 0
) -> wire.Reply:
    raw = await gate._admit(
        keys=gate.keys(campaign_id), args=admit_args(gate, users, token, deadline)
    )
    return wire.decode(raw)


async def state(client: aioredis.Redis, gate: RedisStockGate, campaign_id: str) -> list[Any]:
    meta, users, free, pending = gate.keys(campaign_id)
    return [
        await client.hgetall(meta),
        await client.hgetall(users),
        await client.zrange(free, 0, -1, withscores=True),
        await client.zrange(pending, 0, -1, withscores=True),
    ]


async def redis_now_us(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1_000_000 + int(micros)


async def test_a_call_sent_again_gets_its_own_admissions_back(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """A call whose reply was lost is sent again under the same token (the script lane does
    on a broken connection): it is answered with the same slots, admitted, not with
    "already held" by itself."""
    gate, campaign = await loaded(redis_client, redis_prefix, total=5)
    first = await admit(gate, campaign, ["alice", "bob"], "origin.1")
    assert first.kind is ReplyKind.DECIDED and list(first.results) == [1, 2]
    again = await admit(gate, campaign, ["alice", "bob"], "origin.1")
    assert again.kind is ReplyKind.DECIDED and list(again.results) == [1, 2]
    # Another call finds them held, pending.
    other = await admit(gate, campaign, ["alice"], "origin.2")
    (held,) = other.results
    assert isinstance(held, Held) and held.slot == 1 and held.pending
    await gate.close()


async def test_a_call_run_after_its_deadline_admits_nobody_and_changes_nothing(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    gate, campaign = await loaded(redis_client, redis_prefix, total=5)
    before = await state(redis_client, gate, campaign)
    passed = await redis_now_us(redis_client) - 1
    late = await admit(gate, campaign, ["alice", "bob"], "origin.1", deadline=passed)
    assert late.kind is ReplyKind.TOO_LATE
    assert await state(redis_client, gate, campaign) == before
    in_time = await admit(gate, campaign, ["alice"], "origin.2", deadline=passed + 60_000_000)
    assert in_time.kind is ReplyKind.DECIDED and list(in_time.results) == [1]
    await gate.close()


async def test_admissions_given_back_are_issuable_after_the_reissue_delay(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """A lost call's admissions given back wait the reissue delay, as a release's do: no
    process may still be answering "sold out" from memory when someone new can get one."""
    delay = 2.0  # long beside any pause of a busy machine between the steps below
    gate, campaign = await loaded(redis_client, redis_prefix, total=1, delay=delay)
    assert list((await admit(gate, campaign, ["alice"], "origin.1")).results) == [1]
    seconds, micros = await redis_client.time()  # Redis's clock, before the give-back
    given_back_after = datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=micros)
    await gate._give_back(campaign, "origin.1", "alice")
    assert await gate.pending_users(campaign) == []  # alice may ask again at once
    waiting = await gate.admit(campaign, "bob")
    assert waiting.kind is AdmissionKind.SOLD_OUT
    assert waiting.view is not None and waiting.view.reopens_at is not None
    assert waiting.view.reopens_at >= given_back_after + timedelta(seconds=delay)
    await asyncio.sleep(delay)
    bob = await gate.admit(campaign, "bob")
    assert bob.kind is AdmissionKind.ADMITTED and bob.slot == 1
    await gate.close()


async def test_giving_back_a_call_leaves_another_calls_admissions_alone(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """The lost call asked for bob too, whom another call had admitted: giving it back
    frees alice's admission, not bob's."""
    gate, campaign = await loaded(redis_client, redis_prefix, total=2)
    assert list((await admit(gate, campaign, ["bob"], "origin.1")).results) == [1]
    lost = await admit(gate, campaign, ["alice", "bob"], "origin.2")
    assert lost.results[0] == 2 and isinstance(lost.results[1], Held)
    await gate._give_back(campaign, "origin.2", "alice\0bob")
    assert await gate.pending_users(campaign) == ["bob"]
    (held,) = (await admit(gate, campaign, ["bob"], "origin.3")).results
    assert isinstance(held, Held) and held.slot == 1 and held.pending
    await gate.close()


async def test_the_window_is_decided_to_the_microsecond(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """Admitted from the start's microsecond on, refused from the end's: Redis's clock read
    at exactly those instants."""
    starts = datetime(2030, 1, 1, 9, 0, 0, 123_456, tzinfo=UTC)
    ends = starts + timedelta(hours=1)
    gate, campaign = await loaded(redis_client, redis_prefix, 5, starts, ends)
    script = redis_client.register_script(
        _AT_FIXED_TIME
        + resources.files("coupon.adapters.redis").joinpath("lua", "admit.lua").read_text()
    )

    async def at(instant: datetime, user: str) -> wire.Reply:
        us = wire.micros(instant)
        args = [*admit_args(gate, [user], f"origin.{user}"), us // 1_000_000, us % 1_000_000]
        reply = wire.decode(await script(keys=gate.keys(campaign), args=args))
        assert reply.now_us == us  # the clock the script read
        return reply

    micro = timedelta(microseconds=1)
    assert (await at(starts - micro, "early")).kind is ReplyKind.NOT_STARTED
    first = await at(starts, "first")
    assert first.kind is ReplyKind.DECIDED and list(first.results) == [1]
    last = await at(ends - micro, "last")
    assert last.kind is ReplyKind.DECIDED and list(last.results) == [2]
    late = await at(ends, "late")
    assert late.kind is ReplyKind.DECIDED and list(late.results) == [wire.RESULT_ENDED]
    await gate.close()
