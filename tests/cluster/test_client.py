"""`create_client` on Redis Cluster: the gate's commands, its scripts and its clock work
unchanged when every key of a campaign is in one hash slot; a dead master only takes its
own campaigns down."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from coupon.adapters.redis.client import (
    QueueingRedisCluster,
    create_client,
    is_cluster_url,
    parse_cluster_url,
)
from coupon.adapters.redis.clock import RedisClock
from coupon.adapters.redis.live_stats import RedisLiveStats
from coupon.adapters.redis.stock_gate import RedisStockGate
from coupon.application.ports import AdmissionKind
from coupon.domain.campaign import Campaign
from coupon.domain.coupon import Coupon
from coupon.domain.errors import Unavailable
from harness.redis_cluster import LocalRedisCluster
from tests.cluster.conftest import needs_redis_server

PREFIX = "coupon-cluster-test"


# -- the URL ---------------------------------------------------------------------------


def test_cluster_url_lists_startup_nodes_and_keeps_credentials_and_tls() -> None:
    nodes, kwargs = parse_cluster_url("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002")
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002)]
    assert kwargs["username"] == "u" and kwargs["password"] == "p@ss"
    assert "ssl" not in kwargs
    nodes, kwargs = parse_cluster_url("rediss+cluster://:secret@redis.internal:6380/0")
    assert nodes == [("redis.internal", 6380)]
    assert kwargs["ssl"] is True and kwargs["password"] == "secret"
    assert is_cluster_url("redis+cluster://a:1") and not is_cluster_url("redis://a:1/0")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://a:1/3", "only database 0"),
        ("redis+cluster://a:1?db=3", "only database 0"),
        ("redis+cluster://a:1,:2", "empty host"),
        ("redis+cluster://a:port", "bad port"),
        ("redis://a:1", "not a Redis Cluster URL"),
    ],
)
def test_bad_cluster_urls_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_cluster_url(url)


async def test_create_client_picks_the_client_by_scheme() -> None:
    single = create_client("redis://127.0.0.1:6379/0")
    cluster = create_client("redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    try:
        assert type(single) is aioredis.Redis
        assert isinstance(cluster, RedisCluster)
        assert [n.name for n in cluster.startup_nodes] == ["127.0.0.1:7000", "127.0.0.1:7001"]
    finally:
        await single.aclose()
        await cluster.aclose()


# -- on a real cluster -------------------------------------------------------------------


@pytest.fixture
async def cluster_client(redis_cluster: LocalRedisCluster) -> AsyncIterator[RedisCluster]:
    client = create_client(redis_cluster.url)
    assert isinstance(client, RedisCluster)
    try:
        yield client
    finally:
        await client.aclose()


def coupon(c: Campaign, user: str, slot: int) -> Coupon:
    return Coupon(f"code-{slot}", c.id, user, datetime.now(UTC), slot)


def campaign(total: int = 5, starts_in: float = -60.0) -> Campaign:
    now = datetime.now(UTC)
    return Campaign(
        id=str(uuid.uuid4()),
        name="cluster",
        total_coupons=total,
        starts_at=now + timedelta(seconds=starts_in),
        ends_at=None,
        created_at=now,
    )


@needs_redis_server
async def test_a_campaigns_keys_share_one_slot_and_one_master(
    redis_cluster: LocalRedisCluster,
) -> None:
    client = create_client(redis_cluster.url)
    try:
        gate = RedisStockGate(client, prefix=PREFIX)
        owners = set()
        for _ in range(20):
            campaign_id = str(uuid.uuid4())
            keys = [*gate.keys(campaign_id), f"{PREFIX}:{{{campaign_id}}}:loading"]
            slots = {redis_cluster.keyslot(k) for k in keys}
            assert len(slots) == 1, keys
            owners.add(redis_cluster.master_for_slot(slots.pop()))
        assert len(owners) > 1, "20 random campaigns all on one master: hash tag ignored?"
    finally:
        await client.aclose()


@needs_redis_server
async def test_the_gates_commands_work_on_one_slot(
    redis_cluster: LocalRedisCluster, cluster_client: RedisCluster
) -> None:
    tag = f"{PREFIX}:{{{uuid.uuid4()}}}"
    meta, users, free, pending = f"{tag}:meta", f"{tag}:users", f"{tag}:free", f"{tag}:pending"
    c = cluster_client
    assert await c.exists(meta) == 0
    assert await c.set(f"{tag}:loading", "1", nx=True, px=60_000)
    assert not await c.set(f"{tag}:loading", "1", nx=True, px=60_000)
    assert await c.hset(users, mapping={"alice": 1, "bob": 2}) == 2
    assert await c.rpush(free, 3, 4, 5) == 3
    assert await c.zadd(pending, {"alice": 1}) == 1
    assert await c.zrem(pending, "alice") == 1
    assert await c.hset(meta, mapping={"total": 5, "starts": 0, "ends": -1, "next": 2}) == 4
    assert await c.exists(meta) == 1
    assert await c.delete(users, free, meta) == 3  # one slot: one node, one command
    assert await c.delete(f"{tag}:loading") == 1
    script = c.register_script("return {KEYS[1], KEYS[2], ARGV[1]}")
    assert await script(keys=[meta, users], args=["x"]) == [meta.encode(), users.encode(), b"x"]


@needs_redis_server
async def test_time_has_the_single_server_shape(cluster_client: RedisCluster) -> None:
    seconds, micros = await cluster_client.time()
    assert isinstance(seconds, int) and isinstance(micros, int)
    assert 0 <= micros < 1_000_000
    now = await RedisClock(cluster_client).now()
    assert abs((now - datetime.now(UTC)).total_seconds()) < 5  # same machine's clock


async def chunks(*coupons: Coupon) -> AsyncIterator[Sequence[Coupon]]:
    yield list(coupons)


@needs_redis_server
async def test_the_gate_admits_settles_and_reloads_on_the_cluster(
    cluster_client: RedisCluster,
) -> None:
    gate = RedisStockGate(
        cluster_client, prefix=PREFIX, lease_seconds=60, reissue_delay_seconds=0.1
    )
    c = campaign(total=3)
    assert (await gate.admit(c.id, "u0")).kind is AdmissionKind.NOT_LOADED
    await gate.load(c, chunks())
    a1 = await gate.admit(c.id, "u1")
    a2 = await gate.admit(c.id, "u2")
    assert (a1.kind, a1.slot, a2.slot) == (AdmissionKind.ADMITTED, 1, 2)
    held = await gate.admit(c.id, "u1")
    assert (held.kind, held.slot, held.pending) == (AdmissionKind.ALREADY_HELD, 1, True)
    gate.confirm(coupon(c, "u1", 1))
    await gate.close()  # confirms are queued: wait until they are sent
    assert await cluster_client.zscore(gate.keys(c.id)[3], "u1") is None
    repeat = await gate.admit(c.id, "u1")
    assert (repeat.kind, repeat.pending) == (AdmissionKind.ALREADY_HELD, False)
    await gate.release(c.id, "u2", 2)  # the insert failed: slot 2 goes back
    await asyncio.sleep(0.1)
    assert (await gate.admit(c.id, "u3")).slot == 2
    assert (await gate.admit(c.id, "u4")).slot == 3
    assert (await gate.admit(c.id, "u5")).kind is AdmissionKind.SOLD_OUT
    await gate.forget(c.id, "u4", 3)
    # Lose the campaign's state, rebuild it from (what would be) the ledger.
    await cluster_client.delete(*gate.keys(c.id))
    await gate.load(c, chunks(coupon(c, "u1", 1), coupon(c, "u3", 2)))
    assert (await gate.admit(c.id, "u1")).kind is AdmissionKind.ALREADY_HELD
    assert (await gate.admit(c.id, "u6")).slot == 3
    assert (await gate.admit(c.id, "u7")).kind is AdmissionKind.SOLD_OUT
    await cluster_client.delete(*gate.keys(c.id))


@needs_redis_server
async def test_a_burst_on_one_node_queues_for_connections_instead_of_failing(
    redis_cluster: LocalRedisCluster,
) -> None:
    # redis-py's cluster client raises MaxConnectionsError when a node's pool is empty;
    # ours waits, like the single-server blocking pool.
    client = create_client(redis_cluster.url, max_connections=4)
    key = f"{PREFIX}:{{{uuid.uuid4()}}}:counter"
    try:
        await asyncio.gather(*(client.incr(key) for _ in range(500)))
        assert int(await client.get(key)) == 500
        # And the gate's batched admissions on top of it.
        gate = RedisStockGate(client, prefix=PREFIX)
        c = campaign(total=300)
        await gate.load(c, chunks())
        results = await asyncio.gather(*(gate.admit(c.id, f"u{i}") for i in range(600)))
        kinds = [r.kind for r in results]
        assert kinds.count(AdmissionKind.ADMITTED) == 300
        assert kinds.count(AdmissionKind.SOLD_OUT) == 300
        assert sorted(r.slot for r in results if r.slot) == list(range(1, 301))
        await client.delete(*gate.keys(c.id), key)
    finally:
        await client.aclose()


@needs_redis_server
async def test_a_dead_master_fails_only_its_own_campaigns() -> None:
    with LocalRedisCluster(masters=3) as cluster:
        client = create_client(cluster.url)
        try:
            # Scripts are loaded lazily (NOSCRIPT -> SCRIPT LOAD): a fresh gate, so that
            # the first admission on each live node happens after the kill.
            gate = RedisStockGate(client, prefix=PREFIX)
            by_master: dict[int, Campaign] = {}
            while len(by_master) < 3:
                c = campaign(total=10)
                by_master.setdefault(cluster.master_for_key(gate.keys(c.id)[0]), c)
            for c in by_master.values():
                await gate.load(c, chunks())
            cluster.kill_master(0)
            with pytest.raises(Unavailable):
                await gate.admit(by_master[0].id, "alice")
            for index in (1, 2):
                admitted = await gate.admit(by_master[index].id, "alice")
                assert admitted.kind is AdmissionKind.ADMITTED, index
                await gate.release(by_master[index].id, "alice", admitted.slot)
            # Requests for the dead master's campaign fail while those in flight on the
            # live masters go through undisturbed.
            busy = [gate.admit(by_master[i].id, f"user-{n}") for i in (1, 2) for n in range(5)]
            dead, admitted_meanwhile = await asyncio.gather(
                gate.admit(by_master[0].id, "carol"), asyncio.gather(*busy), return_exceptions=True
            )
            assert isinstance(dead, Unavailable)
            assert isinstance(admitted_meanwhile, list)
            assert all(a.kind is AdmissionKind.ADMITTED for a in admitted_meanwhile)
            # The clock moves to a live node.
            assert abs((await RedisClock(client).now() - datetime.now(UTC)).total_seconds()) < 5
            with pytest.raises(RedisConnectionError):
                await client.get(gate.keys(by_master[0].id)[0])
        finally:
            await client.aclose()


@needs_redis_server
async def test_a_hung_master_holds_up_only_its_own_callers() -> None:
    with LocalRedisCluster(masters=3) as cluster:
        # Two commands in flight per master, short timeouts.
        client = create_client(f"{cluster.url}?socket_timeout=1", max_connections=2)
        try:
            keys: dict[int, list[str]] = {0: [], 1: []}
            while min(len(v) for v in keys.values()) < 8:
                key = f"{PREFIX}:{{{uuid.uuid4()}}}:n"
                master = cluster.master_for_key(key)
                if master in keys and len(keys[master]) < 8:
                    keys[master].append(key)
            for key in keys[0] + keys[1]:
                await client.set(key, 1)
            cluster.freeze_master(0)  # accepts connections, never answers
            hung = [asyncio.ensure_future(client.incr(k)) for k in keys[0][:2] for _ in range(2)]
            healthy = await asyncio.gather(*(client.incr(k) for k in keys[1] for _ in range(2)))
            # Every healthy command was answered while the hung master's callers (each
            # holding one of its two slots for a socket timeout per attempt) still wait.
            assert sorted(healthy) == [2] * 8 + [3] * 8
            assert not any(task.done() for task in hung)
            results = await asyncio.gather(*hung, return_exceptions=True)
            assert all(isinstance(value, RedisError) for value in results), results
        finally:
            cluster.thaw_master(0)
            await client.aclose()


@needs_redis_server
async def test_a_call_to_a_hung_master_fails_within_the_command_deadline() -> None:
    """The cluster client retries a time-out on the same hung master, a socket time-out
    each (5 s): the caller is answered within one deadline, not after every retry."""
    with LocalRedisCluster(masters=3) as cluster:
        client = create_client(cluster.url)
        assert isinstance(client, QueueingRedisCluster)
        try:
            key = next(
                k
                for k in (f"{PREFIX}:{{{uuid.uuid4()}}}:n" for _ in range(1000))
                if cluster.master_for_key(k) == 0
            )
            await client.set(key, 1)
            cluster.freeze_master(0)
            started = time.monotonic()
            with pytest.raises(RedisConnectionError):
                await client.incr(key)
            # One deadline (6 s) and some slack, against 20 s for four socket time-outs.
            assert time.monotonic() - started < QueueingRedisCluster.COMMAND_DEADLINE + 3
        finally:
            cluster.thaw_master(0)
            await client.aclose()


@needs_redis_server
async def test_a_hung_default_node_holds_up_neither_readiness_nor_the_clock_nor_rebuilds() -> None:
    """Keyless commands (PING, TIME) go to the client's default node: readiness asks every
    master and moves that role off a node that does not answer; a rebuild reads the time
    of its own campaign's master."""
    with LocalRedisCluster(masters=3) as cluster:
        client = create_client(cluster.url)
        assert isinstance(client, QueueingRedisCluster)
        try:
            await client.ping_any(timeout=1.5)
            default = client.get_default_node()
            frozen = next(n.index for n in cluster.nodes if n.port == default.port)
            gate = RedisStockGate(client, prefix=PREFIX)
            other = campaign(total=10)
            while cluster.master_for_key(gate.keys(other.id)[0]) == frozen:
                other = campaign(total=10)
            cluster.freeze_master(frozen)
            started = time.monotonic()
            await gate.load(other, chunks())  # its TIME from its own master
            assert time.monotonic() - started < 3
            started = time.monotonic()
            await client.ping_any(timeout=1.5)  # ready: two masters of three answer
            assert time.monotonic() - started < 3
            assert client.get_default_node().port != default.port
            started = time.monotonic()
            assert abs((await RedisClock(client).now() - datetime.now(UTC)).total_seconds()) < 5
            assert time.monotonic() - started < 3
            admitted = await gate.admit(other.id, "alice")
            assert admitted.kind is AdmissionKind.ADMITTED
        finally:
            cluster.thaw_master(frozen)
            await client.aclose()


@needs_redis_server
async def test_a_hung_master_delays_no_other_campaigns_live_figures() -> None:
    """One flush adds every campaign's counts at once: those of a hung master's campaign
    are dropped after a short wait, the others are added meanwhile."""
    with LocalRedisCluster(masters=3) as cluster:
        client = create_client(cluster.url)
        stats = RedisLiveStats(client, prefix=PREFIX)
        try:
            by_master: dict[int, str] = {}
            while len(by_master) < 2:
                campaign_id = str(uuid.uuid4())
                master = cluster.master_for_key(stats.key(campaign_id, 0))
                if master in (0, 1):
                    by_master.setdefault(master, campaign_id)
            second = int(time.time())
            await stats.add({(by_master[1], second): {"issued": 1}})  # scripts loaded
            cluster.freeze_master(0)
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await stats.add(
                    {(by_master[0], second): {"issued": 5}, (by_master[1], second): {"issued": 2}}
                )
            assert time.monotonic() - started < RedisLiveStats.ADD_WAIT_SECONDS + 2
            assert await stats.read(by_master[1], [second]) == {second: {"issued": 3}}
        finally:
            cluster.thaw_master(0)
            await client.aclose()
