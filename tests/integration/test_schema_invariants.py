"""PostgreSQL alone keeps I1, I2, I3 and I4: these tests insert directly, concurrently,
with no Redis and no application code in the way."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

STARTS = datetime(2026, 1, 1, tzinfo=UTC)


async def make_campaign(
    pool: asyncpg.Pool, total: int, ends_at: datetime | None = None
) -> uuid.UUID:
    campaign_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO campaigns (id, name, total_coupons, starts_at, ends_at) "
        "VALUES ($1, 'schema', $2, $3, coalesce($4, 'infinity'::timestamptz))",
        campaign_id,
        total,
        STARTS,
        ends_at,
    )
    return campaign_id


async def insert(
    pool: asyncpg.Pool,
    campaign_id: uuid.UUID,
    slot: int,
    code: str,
    user: str,
    issued_at: datetime = STARTS,
) -> str | None:
    """Insert one coupon the way any client could, stock and window copied from the campaign.
    None when it was stored, else the name of the constraint that refused it."""
    try:
        await pool.execute(
            "INSERT INTO coupons (campaign_id, total_coupons, starts_at, ends_at, slot, code,"
            " user_id, issued_at)"
            " SELECT id, total_coupons, starts_at, ends_at, $2, $3, $4, $5"
            " FROM campaigns WHERE id = $1",
            campaign_id,
            slot,
            code,
            user,
            issued_at,
        )
    except asyncpg.IntegrityConstraintViolationError as exc:
        return str(exc.constraint_name)
    return None


async def count(pool: asyncpg.Pool, campaign_id: uuid.UUID) -> int:
    return int(
        await pool.fetchval("SELECT count(*) FROM coupons WHERE campaign_id = $1", campaign_id)
    )


async def test_concurrent_inserts_never_exceed_the_stock(pg_pool: asyncpg.Pool) -> None:
    campaign_id = await make_campaign(pg_pool, total=20)
    tag = uuid.uuid4().hex[:6]
    results = await asyncio.gather(
        *(
            insert(pg_pool, campaign_id, slot, f"{tag}{i}", f"user-{i}")
            for i, slot in enumerate(s for s in range(1, 41) for _ in range(3))
        )
    )
    assert results.count(None) == 20
    refused = set(results) - {None}
    assert refused <= {"coupons_slot_in_stock", "coupons_slot_once"}, refused
    assert await count(pg_pool, campaign_id) == 20
    issued = await pg_pool.fetchval("SELECT issued_count FROM campaigns WHERE id = $1", campaign_id)
    assert issued == 20


async def test_a_slot_beyond_the_stock_is_refused_even_with_a_forged_total(
    pg_pool: asyncpg.Pool,
) -> None:
    campaign_id = await make_campaign(pg_pool, total=2)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await pg_pool.execute(
            "INSERT INTO coupons (campaign_id, total_coupons, starts_at, ends_at, slot, code,"
            " user_id, issued_at) VALUES ($1, 1000, $2, 'infinity', 500, 'forged', 'u', $2)",
            campaign_id,
            STARTS,
        )
    assert await count(pg_pool, campaign_id) == 0


async def test_concurrent_inserts_of_one_code_keep_one(pg_pool: asyncpg.Pool) -> None:
    a = await make_campaign(pg_pool, total=100)
    b = await make_campaign(pg_pool, total=100)
    code = f"dup{uuid.uuid4().hex[:6]}"
    results = await asyncio.gather(
        *(insert(pg_pool, a if i % 2 else b, 1 + i // 2, code, f"user-{i}") for i in range(40))
    )
    assert results.count(None) == 1
    assert set(results) == {None, "coupons_code_unique"}
    assert await pg_pool.fetchval("SELECT count(*) FROM coupons WHERE code = $1", code) == 1


async def test_concurrent_inserts_for_one_user_keep_one(pg_pool: asyncpg.Pool) -> None:
    campaign_id = await make_campaign(pg_pool, total=100)
    tag = uuid.uuid4().hex[:6]
    results = await asyncio.gather(
        *(
            insert(pg_pool, campaign_id, slot, f"{tag}{slot}", "the-same-user")
            for slot in range(1, 51)
        )
    )
    assert results.count(None) == 1
    assert set(results) == {None, "coupons_one_per_user"}
    assert await count(pg_pool, campaign_id) == 1


async def test_a_coupon_before_the_start_or_at_the_end_is_refused(pg_pool: asyncpg.Pool) -> None:
    campaign_id = await make_campaign(pg_pool, total=5, ends_at=STARTS + timedelta(hours=1))
    tag = uuid.uuid4().hex[:6]
    early = STARTS - timedelta(microseconds=1)
    window = "coupons_issued_in_window"
    assert await insert(pg_pool, campaign_id, 1, f"{tag}a", "u1", early) == window
    at_end = STARTS + timedelta(hours=1)
    assert await insert(pg_pool, campaign_id, 1, f"{tag}b", "u1", at_end) == window
    assert await insert(pg_pool, campaign_id, 1, f"{tag}c", "u1", STARTS) is None
    assert await count(pg_pool, campaign_id) == 1


async def test_codes_longer_than_ten_characters_are_refused(pg_pool: asyncpg.Pool) -> None:
    campaign_id = await make_campaign(pg_pool, total=5)
    assert await insert(pg_pool, campaign_id, 1, "가" * 11, "u1") == "coupons_code_format"
    tag = uuid.uuid4().hex[:4]
    assert await insert(pg_pool, campaign_id, 2, f"{tag}가나다라마바", "u2") is None
