"""Migrations upgrade a database that already holds coupons, once, keeping every row."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import urlsplit

import asyncpg
import pytest

from coupon.adapters.postgres.migrate import latest_version, migrate
from harness.services import TestServices, drop_database, with_database

STARTS = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def blank_database(services: TestServices) -> AsyncIterator[str]:
    """A database of its own for one test, created by the migration tool, dropped after."""
    name = urlsplit(services.database_url).path.lstrip("/")
    url = with_database(services.database_url, f"{name}_m{uuid.uuid4().hex[:6]}")
    try:
        yield url
    finally:
        await drop_database(url)


async def fill(conn: asyncpg.Connection, campaigns: int, per_campaign: int) -> list[uuid.UUID]:
    """Campaigns whose coupons interleave in id order, as concurrent campaigns do."""
    ids = [uuid.uuid4() for _ in range(campaigns)]
    for campaign_id in ids:
        await conn.execute(
            "INSERT INTO campaigns (id, name, total_coupons, starts_at) VALUES ($1, 'm', $2, $3)",
            campaign_id,
            per_campaign,
            STARTS,
        )
    await conn.execute(
        "INSERT INTO coupons (campaign_id, total_coupons, starts_at, ends_at, slot, code,"
        " user_id, issued_at)"
        " SELECT c.id, c.total_coupons, c.starts_at, c.ends_at, s,"
        "        left(md5(c.id::text || s), 10), 'u' || s, c.starts_at"
        "   FROM generate_series(1, $2) s, campaigns c WHERE c.id = ANY($1::uuid[])"
        "  ORDER BY s, c.id",
        ids,
        per_campaign,
    )
    return ids


async def coupon_rows(conn: asyncpg.Connection) -> list[tuple[object, ...]]:
    rows = await conn.fetch(
        "SELECT id, campaign_id, slot, code, user_id, issued_at FROM coupons ORDER BY id"
    )
    return [tuple(row) for row in rows]


async def test_coupons_rekeyed_by_campaign_keep_every_row_and_page_by_range(
    blank_database: str,
) -> None:
    assert await migrate(blank_database, upto=2) == [1, 2]
    conn = await asyncpg.connect(blank_database)
    try:
        ids = await fill(conn, campaigns=3, per_campaign=400)
        before = await coupon_rows(conn)
        counts = {r["id"]: r["issued_count"] for r in await conn.fetch("SELECT * FROM campaigns")}

        assert await migrate(blank_database) == list(range(3, latest_version() + 1))

        assert await coupon_rows(conn) == before
        assert {
            r["id"]: r["issued_count"] for r in await conn.fetch("SELECT * FROM campaigns")
        } == counts
        key = await conn.fetchval(
            "SELECT array_agg(a.attname ORDER BY k.ord) FROM pg_index i"
            " CROSS JOIN unnest(i.indkey) WITH ORDINALITY k(attnum, ord)"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indrelid = 'coupons'::regclass AND i.indisprimary"
        )
        assert key == ["campaign_id", "id"]
        # No index that starts with id is left for the planner to walk in id order while
        # it filters out the other campaigns' rows.
        leading = await conn.fetch(
            "SELECT indexrelid::regclass::text AS name, a.attname FROM pg_index i"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
            " WHERE i.indrelid = 'coupons'::regclass"
        )
        assert [r["name"] for r in leading if r["attname"] == "id"] == []

        await conn.execute("ANALYZE coupons")
        # A table this small could be read whole; ask how the index would be used.
        await conn.execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
        rows = await conn.fetch(
            "EXPLAIN SELECT id, code FROM coupons"
            " WHERE campaign_id = $1 AND id > $2 ORDER BY id LIMIT 100",
            ids[-1],
            0,
        )
        plan = "\n".join(row[0] for row in rows)
        assert "Index Scan using coupons_pkey" in plan and "Filter" not in plan, plan
        await conn.execute("RESET enable_seqscan; RESET enable_bitmapscan")

        # The constraints that keep I1, I2 and I4 are still there.
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO coupons (campaign_id, total_coupons, starts_at, ends_at, slot,"
                " code, user_id, issued_at)"
                " SELECT id, total_coupons, starts_at, ends_at, 1, 'again', 'new', starts_at"
                " FROM campaigns WHERE id = $1",
                ids[0],
            )
    finally:
        await conn.close()

    assert await migrate(blank_database) == []


async def test_request_ids_come_to_campaigns_already_there_and_each_names_one(
    blank_database: str,
) -> None:
    assert await migrate(blank_database, upto=5) == [1, 2, 3, 4, 5]
    conn = await asyncpg.connect(blank_database)
    try:
        ids = await fill(conn, campaigns=2, per_campaign=10)
        before = await coupon_rows(conn)

        assert await migrate(blank_database) == list(range(6, latest_version() + 1))

        assert await coupon_rows(conn) == before
        kept = await conn.fetch("SELECT id, request_id, issued_count FROM campaigns ORDER BY id")
        assert [(r["id"], r["request_id"], r["issued_count"]) for r in kept] == [
            (campaign_id, None, 10) for campaign_id in sorted(ids)
        ]

        async def add(request_id: str | None) -> None:
            await conn.execute(
                "INSERT INTO campaigns (id, name, total_coupons, starts_at, request_id)"
                " VALUES ($1, 'm', 5, $2, $3)",
                uuid.uuid4(),
                STARTS,
                request_id,
            )

        # Any number without one; one per request id, whatever else they say.
        await add(None)
        await add("first")
        await add("second")
        with pytest.raises(asyncpg.UniqueViolationError):
            await add("first")
        for bad in ("", "x" * 129):
            with pytest.raises(asyncpg.CheckViolationError):
                await add(bad)
        await add("x" * 128)
        assert await conn.fetchval("SELECT count(*) FROM campaigns") == 2 + 4
        # A create that finds its request id taken takes the campaign already there.
        taken = await conn.fetchval(
            "INSERT INTO campaigns (id, name, total_coupons, starts_at, request_id)"
            " VALUES ($1, 'm', 5, $2, 'first') ON CONFLICT (request_id) DO NOTHING RETURNING id",
            uuid.uuid4(),
            STARTS,
        )
        assert taken is None
    finally:
        await conn.close()

    assert await migrate(blank_database) == []
