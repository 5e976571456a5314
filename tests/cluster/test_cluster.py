"""Scale-out end to end: two API instances on a 3-master Redis Cluster and one PostgreSQL.

Round 1: campaigns on every shard, a burst at both instances at once through the start;
I1-I5 per campaign from GetCampaign and from the database. Round 2: a master is SIGKILLed
mid-run; I1, I2 and I4 (and I5) still hold in the database, campaigns on the dead shard
answer `unavailable`, and campaigns on the other shards keep issuing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import asyncpg
import pytest

from coupon_loadtest.audit import duplicate_codes_anywhere
from harness.burst import ALREADY, ISSUED
from harness.cluster import (
    TOKEN,
    describe_failure,
    format_table,
    run_round,
    split_by_kill,
)
from harness.redis_cluster import LocalRedisCluster
from harness.server import ServerProcess
from tests.cluster.conftest import needs_redis_server

pytestmark = [pytest.mark.e2e, needs_redis_server]

KILLED = 0  # usually also the client's default node (TIME, PING): that moves too
# Each round's bound on driving its requests: a guard against a hang, not a speed check.
# Every request for the killed master's campaigns waits out the client's retries, so a
# round that drew many of them took over 20 s on a busy machine (3.5 s is usual).
ROUND_TIME_LIMIT = 90.0
# Round 1's campaigns start this long after they are created: before that, the campaigns on
# every shard are created and a tenth of the requests sent (all to be refused as too early),
# which took over 1.5 s on a busy machine; the round then waits for the start, so a longer
# lead costs only that wait.
BURST_STARTS_IN = 6.0


@pytest.fixture(scope="module")
def instances(
    server_env: dict[str, str], redis_cluster: LocalRedisCluster
) -> Iterator[list[ServerProcess]]:
    env = {**server_env, "REDIS_URL": redis_cluster.url, "COUPON_ADMIN_TOKEN": TOKEN}
    started: list[ServerProcess] = []
    try:
        # Two cores here: one worker per instance; the point is two processes.
        started = [ServerProcess(env=env, workers=1) for _ in range(2)]
        for server in started:
            server.wait_ready()
        yield started
    finally:
        for server in started:
            server.stop()


async def test_two_instances_on_a_redis_cluster_keep_every_invariant_and_survive_a_dead_master(
    instances: list[ServerProcess],
    redis_cluster: LocalRedisCluster,
    pg_pool: asyncpg.Pool,
) -> None:
    urls = [s.url for s in instances]

    # -- round 1: a burst through the start, every shard -----------------------------
    burst = await run_round(
        urls,
        redis_cluster,
        pg_pool,
        title="burst",
        total=60,
        starts_in=BURST_STARTS_IN,
        users=180,
        requests=300,
        concurrency=48,
        time_limit=ROUND_TIME_LIMIT,
    )
    print(format_table(burst.checks, redis_cluster))
    assert len({c.master for c in burst.campaigns}) == 3, "campaigns on every shard"
    for check in burst.checks:
        assert not check.violations, (check.campaign, check.violations)
        assert check.issued == check.campaign.total, "sold out: no stock left stranded"
        assert check.issued == check.listed == check.issued_count
    kinds = Counter(o.kind for o in burst.outcomes)
    assert kinds[ISSUED] == sum(c.campaign.total for c in burst.checks)
    assert kinds[ALREADY] > 0 and kinds["resource_exhausted"] > 0
    refused_early = [o for o in burst.outcomes if o.kind == "failed_precondition"]
    starts = {c.id: c.starts_at for c in burst.campaigns}
    assert refused_early and all(o.sent_at < starts[o.campaign_id] for o in refused_early)
    # With every master up, nothing is unavailable: not Redis, and not PostgreSQL (group
    # commits of two instances lock campaign rows in one order, so they cannot deadlock).
    expected = {ISSUED, ALREADY, "failed_precondition", "resource_exhausted"}
    assert set(kinds) <= expected, kinds
    assert {o.instance for o in burst.outcomes} == {0, 1}, "both instances took load"

    # -- round 2: a master dies mid-run ----------------------------------------------
    failure = await run_round(
        urls,
        redis_cluster,
        pg_pool,
        title="failure",
        total=150,
        starts_in=-1.0,
        users=300,
        requests=300,
        concurrency=48,
        pace=0.01,
        kill_master=KILLED,
        kill_after=0.3,
        time_limit=ROUND_TIME_LIMIT,
    )
    print(format_table(failure.checks, redis_cluster, dead=[KILLED]))
    print(describe_failure(failure))
    assert failure.killed_at is not None and not redis_cluster.nodes[KILLED].alive
    # I1, I2, I4 from the database (and I3, I5, and GetCampaign agreeing with it).
    for check in failure.checks:
        assert not check.violations, (check.campaign, check.violations)
    assert await duplicate_codes_anywhere(pg_pool) == 0
    seen = split_by_kill(failure)
    dead, alive = seen["killed shard"], seen["other shards"]
    # The dead shard's campaigns: nothing succeeds any more, every answer is `unavailable`.
    assert dead["unavailable (Redis)"] > 0, dead
    assert set(dead) <= {"unavailable (Redis)", "unavailable (waited too long)"}, dead
    # The others keep issuing, and never see the dead node (a request may still be turned
    # away, to retry, for waiting past its deadline behind a call the kill slowed down).
    assert alive[ISSUED] > 0, alive
    assert "unavailable (Redis)" not in alive, alive
    for check in failure.checks:
        if check.campaign.master != KILLED:
            assert check.issued > 0
    # Neither round was cut short by its time limit: every planned request was answered.
    for name, round_ in (("burst", burst), ("failure", failure)):
        assert len(round_.outcomes) == len(round_.campaigns) * 300, name
