"""Campaigns on every shard of a Redis Cluster, a round of load at several API instances,
and the checks of every campaign afterwards: what tests/cluster and `just cluster-demo`
both run."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponServiceClient
from harness.burst import CampaignCheck, Outcome, check_campaign, drive
from harness.client import admin, connect_client, ts
from harness.redis_cluster import LocalRedisCluster

TOKEN = "cluster-demo-token"


# -- campaigns across shards -----------------------------------------------------------


@dataclass(frozen=True)
class PlacedCampaign:
    id: str
    total: int
    starts_at: datetime
    slot: int
    master: int  # index in LocalRedisCluster.nodes of the master that owns the slot


async def create_campaigns_on_every_shard(
    client: CouponServiceClient,
    cluster: LocalRedisCluster,
    *,
    total: int,
    starts_in: float,
    name: str = "cluster",
    token: str = TOKEN,
    at_least: int = 0,
    max_campaigns: int = 40,
) -> list[PlacedCampaign]:
    """Create campaigns until every master owns one (and at least `at_least` exist).

    A campaign's gate keys all carry the hash tag `{campaign_id}`, so CLUSTER KEYSLOT of
    the tag alone gives the slot, and the slot map gives the master."""
    placed: list[PlacedCampaign] = []
    starts = datetime.now(UTC) + timedelta(seconds=starts_in)
    while len({p.master for p in placed}) < len(cluster.nodes) or len(placed) < at_least:
        if len(placed) >= max_campaigns:
            raise RuntimeError(f"{max_campaigns} campaigns did not cover every shard")
        created = await client.create_campaign(
            coupon_pb.CreateCampaignRequest(
                name=f"{name}-{len(placed) + 1}", total_coupons=total, starts_at=ts(starts)
            ),
            headers=admin(token),
        )
        assert created.campaign is not None and created.campaign.starts_at is not None
        slot = cluster.keyslot(f"{{{created.campaign.id}}}")
        placed.append(
            PlacedCampaign(
                id=created.campaign.id,
                total=total,
                starts_at=created.campaign.starts_at.to_datetime(),
                slot=slot,
                master=cluster.master_for_slot(slot),
            )
        )
    return placed


# -- load ------------------------------------------------------------------------------


def plan_requests(
    campaigns: Sequence[PlacedCampaign],
    *,
    users_per_campaign: int,
    requests_per_campaign: int,
    seed: int = 7,
) -> list[tuple[str, str]]:
    """(campaign, user) pairs, campaigns interleaved; users repeat (repeat requests)."""
    rng = random.Random(seed)
    requests = [
        (c.id, f"user-{rng.randrange(users_per_campaign)}")
        for c in campaigns
        for _ in range(requests_per_campaign)
    ]
    rng.shuffle(requests)
    return requests


# -- verification ----------------------------------------------------------------------


def format_table(
    checks: Sequence[CampaignCheck[PlacedCampaign]],
    cluster: LocalRedisCluster,
    dead: Sequence[int] = (),
) -> str:
    codes = sorted({k for c in checks for k in c.outcomes})
    header = (
        f"{'campaign':<36} {'shard':<22} {'total':>5} {'issued':>6} {'dupes':>5} "
        f"{'user max':>8} {'early':>5}  client saw"
    )
    lines = [header, "-" * len(header)]
    for c in checks:
        node = cluster_node_label(cluster, c.campaign.master, dead)
        seen = ", ".join(f"{k} {c.outcomes[k]}" for k in codes if c.outcomes[k])
        lines.append(
            f"{c.campaign.id:<36} {node:<22} {c.campaign.total:>5} {c.issued:>6} "
            f"{c.duplicate_codes:>5} {c.per_user_max:>8} {c.early:>5}  {seen}"
        )
        lines.extend(f"    VIOLATION {text}" for text in c.violations)
    return "\n".join(lines)


def cluster_node_label(cluster: LocalRedisCluster, master: int, dead: Sequence[int]) -> str:
    return f"m{master} :{cluster.nodes[master].port}{' (killed)' if master in dead else ''}"


@dataclass
class RoundResult:
    campaigns: list[PlacedCampaign]
    outcomes: list[Outcome]
    checks: list[CampaignCheck[PlacedCampaign]]
    elapsed: float
    killed: int | None = None
    killed_at: datetime | None = None  # when the master was SIGKILLed


async def run_round(
    urls: Sequence[str],
    cluster: LocalRedisCluster,
    pool: asyncpg.Pool,
    *,
    title: str,
    total: int,
    starts_in: float,
    users: int,
    requests: int,
    concurrency: int,
    pace: float = 0.0,
    kill_master: int | None = None,
    kill_after: float = 0.3,
    early_share: float = 0.1,
    time_limit: float = 30.0,
) -> RoundResult:
    """Campaigns on every shard, then load at every instance, then the checks.

    With `starts_in` > 0, `early_share` of the requests go out at once (long before the
    start: all must be refused), the rest from just before the start, through it. With
    `kill_master`, that master is SIGKILLed once `kill_after` of the responses are in."""
    outcomes: list[Outcome] = []
    result = RoundResult([], outcomes, [], 0.0, kill_master)
    async with connect_client(urls[0]) as api:
        campaigns = await create_campaigns_on_every_shard(
            api, cluster, total=total, starts_in=starts_in, name=title
        )
        result.campaigns = campaigns
        planned = plan_requests(campaigns, users_per_campaign=users, requests_per_campaign=requests)
        print(
            f"\n{title}: {len(campaigns)} campaigns of {total} coupons on "
            f"{len({c.master for c in campaigns})} shards; {len(planned)} requests from "
            f"{concurrency} concurrent clients at {len(urls)} instances"
            + (f"; master m{kill_master} is killed mid-run" if kill_master is not None else ""),
            flush=True,
        )

        async def kill_midway(load: asyncio.Task[None]) -> None:
            if kill_master is None:
                return
            while len(outcomes) < kill_after * len(planned):
                if load.done():  # the run ended first: no kill (killed_at stays None)
                    return
                await asyncio.sleep(0.005)
            result.killed_at = datetime.now(UTC)
            cluster.kill_master(kill_master)

        started = time.monotonic()
        early: list[tuple[str, str]] = []
        if starts_in > 0:
            early = planned[: int(len(planned) * early_share)]
            await drive(urls, early, outcomes, concurrency=concurrency, time_limit=time_limit)
            starts = min(c.starts_at for c in campaigns)
            await asyncio.sleep(max(0.0, (starts - datetime.now(UTC)).total_seconds() - 0.1))
        load = asyncio.ensure_future(
            drive(
                urls,
                planned[len(early) :],
                outcomes,
                concurrency=concurrency,
                pace=pace,
                time_limit=time_limit,
            )
        )
        await asyncio.gather(load, kill_midway(load))
        result.elapsed = time.monotonic() - started
        result.checks = [
            await check_campaign(api, pool, c, outcomes, token=TOKEN) for c in campaigns
        ]
    print(f"{len(outcomes)} responses in {result.elapsed:.1f}s; client saw: {_totals(outcomes)}")
    return result


def split_by_kill(result: RoundResult) -> dict[str, Counter[str]]:
    """What clients saw after the kill, for campaigns on the killed shard and the others
    (requests sent after the kill; those in flight at that moment may have gone either
    way). Errors from the gate's Redis are told apart from the rest by their message, and
    from requests turned away because they waited past their deadline behind a slow call
    ("the gate is slow: ..."), which is shedding, not a failure: the call before was slowed by
    the kill (the cluster client reloads the slot map) or by a busy machine."""
    assert result.killed_at is not None
    dead = {c.id for c in result.campaigns if c.master == result.killed}
    seen: dict[str, Counter[str]] = {"killed shard": Counter(), "other shards": Counter()}
    for o in result.outcomes:
        if o.sent_at < result.killed_at:
            continue
        kind = o.kind
        if kind == "unavailable" and o.message.startswith("the gate is slow"):
            kind = "unavailable (waited too long)"
        elif kind == "unavailable" and o.message.startswith("Redis"):
            kind = "unavailable (Redis)"
        seen["killed shard" if o.campaign_id in dead else "other shards"][kind] += 1
    return seen


def describe_failure(result: RoundResult) -> str:
    lines = ["after the kill, clients saw:"]
    for group, counts in split_by_kill(result).items():
        lines.append(f"  {group}: " + ", ".join(f"{k} {n}" for k, n in counts.most_common()))
    return "\n".join(lines)


def _totals(outcomes: Sequence[Outcome]) -> str:
    counts = Counter(o.kind for o in outcomes)
    return ", ".join(f"{k} {n}" for k, n in counts.most_common())
