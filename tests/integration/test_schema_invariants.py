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


FORGED = (
    "INSERT INTO coupons (campaign_id, total_coupons, starts_at, ends_at, slot, code, user_id,"
    " issued_at) SELECT $1, t, $2, 'infinity', s, $3 || s, 'u' || s, $2"
    " FROM unnest($4::bigint[], $5::bigint[]) AS r(t, s)"
)


@pytest.mark.parametrize(
    ("totals", "slots"),
    [
        ([1000], [500]),  # alone
        ([2, 1000, 2], [1, 500, 2]),  # one forged row among honest ones in one statement
    ],
)
async def test_a_slot_beyond_the_stock_is_refused_even_with_a_forged_total(
    pg_pool: asyncpg.Pool, totals: list[int], slots: list[int]
) -> None:
    campaign_id = await make_campaign(pg_pool, total=2)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await pg_pool.execute(FORGED, campaign_id, STARTS, uuid.uuid4().hex[:6], totals, slots)
    assert await count(pg_pool, campaign_id) == 0


@pytest.mark.parametrize(
    ("starts_at", "ends_at"),
    [
        (STARTS - timedelta(days=1), None),  # an earlier start: the coupon is in its window
        (STARTS, STARTS + timedelta(days=1)),  # an end where the campaign has none
    ],
)
async def test_a_coupon_with_a_forged_window_is_refused(
    pg_pool: asyncpg.Pool, starts_at: datetime, ends_at: datetime | None
) -> None:
    campaign_id = await make_campaign(pg_pool, total=2)
    with pytest.raises(asyncpg.ForeignKeyViolationError) as refused:
        await pg_pool.execute(
            "INSERT INTO coupons (campaign_id, total_coupons, starts_at, ends_at, slot, code,"
            " user_id, issued_at)"
            " VALUES ($1, 2, $2, coalesce($3, 'infinity'::timestamptz), 1, $4, 'u1', $5)",
            campaign_id,
            starts_at,
            ends_at,
            uuid.uuid4().hex[:8],
            STARTS,
        )
    assert refused.value.constraint_name == "coupons_campaign_match"
    assert await count(pg_pool, campaign_id) == 0


async def test_coupons_of_an_unknown_campaign_are_refused(pg_pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await pg_pool.execute(FORGED, uuid.uuid4(), STARTS, uuid.uuid4().hex[:6], [2], [1])


async def test_a_campaign_with_coupons_keeps_its_stock_window_and_row(
    pg_pool: asyncpg.Pool,
) -> None:
    campaign_id = await make_campaign(pg_pool, total=2)
    assert await insert(pg_pool, campaign_id, 1, uuid.uuid4().hex[:8], "u1") is None
    changes = [
        "UPDATE campaigns SET total_coupons = 1000 WHERE id = $1",
        "UPDATE campaigns SET starts_at = starts_at - interval '1 day' WHERE id = $1",
        "UPDATE campaigns SET ends_at = starts_at + interval '1 day' WHERE id = $1",
        "UPDATE campaigns SET id = gen_random_uuid() WHERE id = $1",
        "DELETE FROM campaigns WHERE id = $1",
        "UPDATE coupons SET total_coupons = 1000 WHERE campaign_id = $1",
        "UPDATE coupons SET starts_at = starts_at - interval '1 day' WHERE campaign_id = $1",
        "UPDATE coupons SET ends_at = starts_at + interval '1 day' WHERE campaign_id = $1",
    ]
    for change in changes:
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await pg_pool.execute(change, campaign_id)
    # What does not touch the copies still works: the name, and a campaign without coupons.
    await pg_pool.execute("UPDATE campaigns SET name = 'renamed' WHERE id = $1", campaign_id)
    empty = await make_campaign(pg_pool, total=2)
    await pg_pool.execute("UPDATE campaigns SET total_coupons = 3 WHERE id = $1", empty)
    await pg_pool.execute("DELETE FROM campaigns WHERE id = $1", empty)
    row = await pg_pool.fetchrow(
        "SELECT total_coupons, issued_count FROM campaigns WHERE id = $1", campaign_id
    )
    assert tuple(row) == (2, 1)


async def test_a_campaign_deleted_while_coupons_are_inserted_leaves_no_orphans(
    pg_pool: asyncpg.Pool,
) -> None:
    """Either the delete wins and no coupon of the campaign exists, or the coupons win and
    the campaign is still there: never coupons without their campaign. The inserts name
    the campaign's copies themselves, so they do not depend on reading its row."""
    for _ in range(20):
        campaign_id = await make_campaign(pg_pool, total=10)
        tag = uuid.uuid4().hex[:6]
        results = await asyncio.gather(
            *(pg_pool.execute(FORGED, campaign_id, STARTS, tag, [10], [s]) for s in range(1, 4)),
            pg_pool.execute("DELETE FROM campaigns WHERE id = $1", campaign_id),
            return_exceptions=True,
        )
        unexpected = [
            r
            for r in results
            if isinstance(r, BaseException) and not isinstance(r, asyncpg.ForeignKeyViolationError)
        ]
        assert not unexpected, unexpected
        exists = await pg_pool.fetchval("SELECT count(*) FROM campaigns WHERE id = $1", campaign_id)
        assert exists == 1 or await count(pg_pool, campaign_id) == 0, results


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


async def add_campaign(pool: asyncpg.Pool, name: str, ends_at: datetime) -> str | None:
    """None when the campaign was stored, else the name of the check that refused it."""
    try:
        await pool.execute(
            "INSERT INTO campaigns (id, name, total_coupons, starts_at, ends_at)"
            " VALUES ($1, $2, 1, $3, $4)",
            uuid.uuid4(),
            name,
            STARTS,
            ends_at,
        )
    except asyncpg.CheckViolationError as exc:
        return str(exc.constraint_name)
    return None


async def test_a_campaign_window_must_not_be_empty(pg_pool: asyncpg.Pool) -> None:
    assert await add_campaign(pg_pool, "w", STARTS) == "campaigns_check"
    assert await add_campaign(pg_pool, "w", STARTS - timedelta(microseconds=1)) == "campaigns_check"
    assert await add_campaign(pg_pool, "w", STARTS + timedelta(microseconds=1)) is None


async def test_campaign_names_are_1_to_200_characters(pg_pool: asyncpg.Pool) -> None:
    end = STARTS + timedelta(days=1)
    assert await add_campaign(pg_pool, "", end) == "campaigns_name_check"
    assert await add_campaign(pg_pool, "쿠" * 201, end) == "campaigns_name_check"
    assert await add_campaign(pg_pool, "쿠" * 200, end) is None
    assert await add_campaign(pg_pool, "x", end) is None


async def test_user_ids_are_1_to_128_characters(pg_pool: asyncpg.Pool) -> None:
    campaign_id = await make_campaign(pg_pool, total=5)
    tag = uuid.uuid4().hex[:6]
    refused = "coupons_user_id_length"
    assert await insert(pg_pool, campaign_id, 1, f"{tag}a", "") == refused
    assert await insert(pg_pool, campaign_id, 1, f"{tag}b", "쿠" * 129) == refused
    assert await insert(pg_pool, campaign_id, 1, f"{tag}c", "쿠" * 128) is None
    assert await insert(pg_pool, campaign_id, 2, f"{tag}d", "u") is None
    assert await count(pg_pool, campaign_id) == 2
