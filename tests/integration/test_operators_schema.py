"""PostgreSQL alone keeps the kill switch: nothing is stored as issued at or after a
campaign's recorded end, the end never moves once recorded, and a user's coupons are one
range of the one-per-user index. Direct SQL, no application code in the way."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from typing import Any

import asyncpg

from tests.integration.test_schema_invariants import STARTS, count, insert, make_campaign

INDEX = "coupons_one_per_user"


async def test_a_coupon_issued_at_or_after_the_end_is_refused(pg_pool: asyncpg.Pool) -> None:
    campaign_id = await make_campaign(pg_pool, total=5)
    end = STARTS + timedelta(minutes=5)
    await pg_pool.execute("UPDATE campaigns SET ended_at = $2 WHERE id = $1", campaign_id, end)
    tag = uuid.uuid4().hex[:6]
    refused = "coupons_issued_before_end"
    assert await insert(pg_pool, campaign_id, 1, f"{tag}a", "u1", end) == refused
    assert await insert(pg_pool, campaign_id, 1, f"{tag}b", "u1", end + timedelta(1)) == refused
    just_before = end - timedelta(microseconds=1)
    assert await insert(pg_pool, campaign_id, 1, f"{tag}c", "u1", just_before) is None
    assert await count(pg_pool, campaign_id) == 1


async def test_a_batch_with_one_late_coupon_is_refused_whole(pg_pool: asyncpg.Pool) -> None:
    campaign_id = await make_campaign(pg_pool, total=5)
    end = STARTS + timedelta(minutes=5)
    await pg_pool.execute("UPDATE campaigns SET ended_at = $2 WHERE id = $1", campaign_id, end)
    tag = uuid.uuid4().hex[:6]
    try:
        await pg_pool.execute(
            "INSERT INTO coupons (campaign_id, total_coupons, starts_at, ends_at, slot, code,"
            " user_id, issued_at)"
            " SELECT c.id, c.total_coupons, c.starts_at, c.ends_at, s, $2 || s, 'u' || s,"
            "        CASE WHEN s = 3 THEN $3 ELSE c.starts_at END"
            "   FROM campaigns c, generate_series(1, 4) s WHERE c.id = $1",
            campaign_id,
            tag,
            end,
        )
    except asyncpg.CheckViolationError as exc:
        assert exc.constraint_name == "coupons_issued_before_end"
    else:
        raise AssertionError("a batch holding a coupon issued at the end went in")
    assert await count(pg_pool, campaign_id) == 0


async def test_an_insert_waiting_on_the_end_sees_it(pg_pool: asyncpg.Pool) -> None:
    """An insert in flight while the end is being recorded waits for it (the trigger locks
    the campaign row, which the end's update holds), then compares against it: a coupon
    issued before the end goes in, one issued after it does not."""
    campaign_id = await make_campaign(pg_pool, total=5)
    end = STARTS + timedelta(minutes=5)
    tag = uuid.uuid4().hex[:6]
    async with pg_pool.acquire() as ender:
        transaction = ender.transaction()
        await transaction.start()
        await ender.execute("UPDATE campaigns SET ended_at = $2 WHERE id = $1", campaign_id, end)
        late = asyncio.ensure_future(
            insert(pg_pool, campaign_id, 1, f"{tag}a", "late", end + timedelta(seconds=1))
        )
        honoured = asyncio.ensure_future(
            insert(pg_pool, campaign_id, 2, f"{tag}b", "early", end - timedelta(seconds=1))
        )
        await asyncio.sleep(0.3)
        assert not late.done() and not honoured.done()  # both wait for the end's commit
        await transaction.commit()
    assert await late == "coupons_issued_before_end"
    assert await honoured is None
    rows = await pg_pool.fetch("SELECT user_id FROM coupons WHERE campaign_id = $1", campaign_id)
    assert [r["user_id"] for r in rows] == ["early"]


async def test_the_end_once_recorded_never_moves(pg_pool: asyncpg.Pool) -> None:
    campaign_id = await make_campaign(pg_pool, total=5)
    end = STARTS + timedelta(minutes=5)
    await pg_pool.execute("UPDATE campaigns SET ended_at = $2 WHERE id = $1", campaign_id, end)
    for other in (end + timedelta(minutes=1), end - timedelta(minutes=1), None):
        try:
            await pg_pool.execute(
                "UPDATE campaigns SET ended_at = $2 WHERE id = $1", campaign_id, other
            )
        except asyncpg.CheckViolationError as exc:
            assert exc.constraint_name == "campaigns_end_once"
        else:
            raise AssertionError(f"the end moved to {other}")
    stored = await pg_pool.fetchval("SELECT ended_at FROM campaigns WHERE id = $1", campaign_id)
    assert stored == end


async def plan(pool: asyncpg.Pool, query: str, *args: object) -> list[dict[str, Any]]:
    """The nodes of the query's plan, outermost first."""
    async with pool.acquire() as conn, conn.transaction():
        # A planner that may not scan the table shows which index the query can use.
        await conn.execute("SET LOCAL enable_seqscan = off")
        found = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}", *args))
    nodes, todo = [], [found[0]["Plan"]]
    while todo:
        node = todo.pop(0)
        nodes.append(node)
        todo.extend(node.get("Plans", []))
    return nodes


def reads_of(nodes: list[dict[str, Any]], index: str) -> list[str]:
    """The index conditions of the plan's reads of `index`; a scan of the table fails."""
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], nodes
    return [n["Index Cond"] for n in nodes if n.get("Index Name") == index]


async def test_user_and_issue_path_lookups_use_the_one_per_user_index(
    pg_pool: asyncpg.Pool,
) -> None:
    """What matters is the index, not the plan's shape around it: whether the planner walks
    it backwards or gathers a bitmap and sorts the user's few rows depends on the
    statistics, which other tests' rows move. A user's coupons are one range of the index
    (the user leads it), and the issue path finds a user's coupon by it."""
    from coupon.adapters.postgres.ledger import _BY_USER, _BY_USERS, _USER_COUPONS

    campaign_id = await make_campaign(pg_pool, total=5)
    user = f"plan-{uuid.uuid4().hex}"
    user_coupons = reads_of(await plan(pg_pool, _USER_COUPONS, user, None, 10), INDEX)
    assert user_coupons and all(c.startswith("((user_id = ") for c in user_coupons)
    assert reads_of(await plan(pg_pool, _BY_USER, campaign_id, user), INDEX)
    assert reads_of(await plan(pg_pool, _BY_USERS, [campaign_id], [user]), INDEX)
