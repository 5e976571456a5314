"""The scratch database of `just bench-scale`: made and dropped here, filled to millions
of rows, and the server's page query explained."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.generators import REPO, BenchBroke
from bench.scale.paging import say
from bench.state import ADMIN_DATABASE_URL

DB_NAME = "coupon_scale"
DATABASE_URL = f"postgresql://postgres@127.0.0.1:5432/{DB_NAME}"
REDIS_PREFIX = "coupon-scale"
# The comment that marks the database as this bench's: only such a database is dropped.
# Worded as when the bench was one file, so that a database an earlier run left is known.
DB_MARK = "bench/scale.py: scratch database, dropped by bench/scale.py"

ISSUE_ORDER = "coupons_pkey"  # (campaign_id, id): each campaign in issue order


# Fill codes: 'S' and 9 hex digits of (n * odd) mod 2**36, a bijection on 0..2**36-1, so
# distinct n give distinct codes, scattered over the key space like the service's own codes
# (which are Hangul and digits, so never collide with these).
CODE_MULTIPLIER = 2654435761
CODE_SPACE = 2**36

FILL_CAMPAIGNS = """
INSERT INTO campaigns (id, name, total_coupons, starts_at, created_at)
SELECT id, 'scale fill ' || ord, total, $3, $3
  FROM unnest($1::uuid[], $2::bigint[]) WITH ORDINALITY AS c(id, total, ord)
"""
FILL_COUPONS = f"""
INSERT INTO coupons (campaign_id, total_coupons, starts_at, ends_at, slot, code, user_id,
                     issued_at)
SELECT ($1::uuid[])[s.k + 1], ($2::bigint[])[s.k + 1], $3::timestamptz, 'infinity', s.slot,
       'S' || lpad(to_hex((($4::bigint + g.n) * {CODE_MULTIPLIER}) % {CODE_SPACE}), 9, '0'),
       'scale-' || s.slot, $3::timestamptz + s.slot * interval '1 millisecond'
  FROM generate_series(0::bigint, $5::bigint - 1) AS g(n),
       LATERAL (SELECT g.n % $6::bigint AS k, g.n / $6::bigint + 1 AS slot) AS s
 WHERE s.slot <= ($2::bigint[])[s.k + 1]
"""
SIZES = """
SELECT pg_total_relation_size('coupons') AS total, pg_relation_size('coupons') AS heap,
       pg_indexes_size('coupons') AS indexes,
       (SELECT json_object_agg(indexrelid::regclass::text, pg_relation_size(indexrelid))
          FROM pg_index WHERE indrelid = 'coupons'::regclass)::text AS each_index,
       (SELECT count(*) FROM coupons) AS rows,
       (SELECT count(*) FROM campaigns) AS campaigns
"""


async def database_mark(admin: asyncpg.Connection) -> tuple[bool, str | None]:
    row = await admin.fetchrow(
        "SELECT shobj_description(oid, 'pg_database') AS mark FROM pg_database WHERE datname = $1",
        DB_NAME,
    )
    return row is not None, None if row is None else row["mark"]


async def drop_own_database(admin: asyncpg.Connection) -> bool:
    """Drop `coupon_scale` if it carries our mark; refuse (BenchBroke) if it does not."""
    exists, mark = await database_mark(admin)
    if not exists:
        return False
    if mark != DB_MARK:
        raise BenchBroke(
            f"database {DB_NAME} exists but was not created by just bench-scale "
            f"(comment {mark!r}); not touching it: drop it yourself or free the name"
        )
    await admin.execute(f"DROP DATABASE {DB_NAME} WITH (FORCE)")
    return True


async def create_database() -> None:
    admin = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        if await drop_own_database(admin):
            say(f"dropped the {DB_NAME} database left by an earlier run")
        await admin.execute(f"CREATE DATABASE {DB_NAME}")
        await admin.execute(f"COMMENT ON DATABASE {DB_NAME} IS '{DB_MARK}'")
    finally:
        await admin.close()


async def drop_database() -> None:
    admin = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        await drop_own_database(admin)
    finally:
        await admin.close()


def migrate(env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "coupon", "migrate"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchBroke(f"coupon migrate failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


async def table_sizes(conn: asyncpg.Connection) -> dict[str, Any]:
    row = await conn.fetchrow(SIZES)
    return {
        "total_bytes": row["total"],
        "heap_bytes": row["heap"],
        "indexes_bytes": row["indexes"],
        "index_bytes": json.loads(row["each_index"] or "{}"),
        "rows": row["rows"],
        "campaigns": row["campaigns"],
    }


async def fill(conn: asyncpg.Connection, args: argparse.Namespace) -> dict[str, Any]:
    """Coupon rows up to args.rows, in waves of args.interleave campaigns whose rows are
    interleaved; stops starting waves once args.fill_budget seconds have gone."""
    existing = await conn.fetchval("SELECT count(*) FROM coupons")
    need = max(0, args.rows - existing)
    sizes = [args.campaign_size] * (need // args.campaign_size)
    if need % args.campaign_size:
        sizes.append(need % args.campaign_size)
    starts_at = datetime.now(UTC) - timedelta(days=30)
    code_base = 0
    inserted = 0
    filled: list[dict[str, Any]] = []
    waves: list[dict[str, Any]] = []
    started = time.monotonic()
    say(
        f"filling coupons from {existing:,} to {args.rows:,} rows: {len(sizes)} "
        f"campaigns of up to {args.campaign_size:,}, {args.interleave} at a time ..."
    )
    stopped_early = False
    for first in range(0, len(sizes), args.interleave):
        if time.monotonic() - started > args.fill_budget:
            stopped_early = True
            say(f"  fill budget of {args.fill_budget:g} s spent: stopping at {inserted:,} rows")
            break
        totals = sizes[first : first + args.interleave]
        ids = [uuid.uuid4() for _ in totals]
        span = len(totals) * max(totals)
        wave_started = time.monotonic()
        async with conn.transaction():
            await conn.execute(FILL_CAMPAIGNS, ids, totals, starts_at)
            status = await conn.execute(
                FILL_COUPONS, ids, totals, starts_at, code_base, span, len(totals)
            )
        seconds = time.monotonic() - wave_started
        rows = int(status.split()[-1])
        code_base += span
        inserted += rows
        waves.append({"campaigns": len(totals), "rows": rows, "seconds": seconds})
        filled += [
            {"id": str(cid), "coupons": total, "order": first + i}
            for i, (cid, total) in enumerate(zip(ids, totals, strict=True))
        ]
        elapsed = time.monotonic() - started
        rate = inserted / elapsed
        say(
            f"  {existing + inserted:>12,} rows  {elapsed:6.0f} s  {rows / seconds:8,.0f} rows/s "
            f"this wave  eta {(need - inserted) / rate if rate else 0:5.0f} s"
        )
    fill_seconds = time.monotonic() - started
    say("  VACUUM (ANALYZE) coupons, campaigns; CHECKPOINT ...")
    vacuum_started = time.monotonic()
    await conn.execute("VACUUM (ANALYZE) coupons")
    await conn.execute("VACUUM (ANALYZE) campaigns")
    vacuum_seconds = time.monotonic() - vacuum_started
    checkpoint_started = time.monotonic()
    await conn.execute("CHECKPOINT")
    checkpoint_seconds = time.monotonic() - checkpoint_started
    return {
        "existing_rows": existing,
        "inserted_rows": inserted,
        "seconds": fill_seconds,
        "rows_per_s": inserted / fill_seconds if fill_seconds else None,
        "vacuum_analyze_seconds": vacuum_seconds,
        "checkpoint_seconds": checkpoint_seconds,
        "stopped_early": stopped_early,
        "campaign_size": args.campaign_size,
        "interleave": args.interleave,
        "waves": waves,
        "campaigns": filled,
    }


async def campaign_place(conn: asyncpg.Connection, campaign_id: str) -> dict[str, Any]:
    """Where a campaign's rows lie in the table: its id range as % of the largest id."""
    row = await conn.fetchrow(
        "SELECT min(id) AS lo, max(id) AS hi, count(*) AS n,"
        "       (SELECT max(id) FROM coupons) AS top"
        "  FROM coupons WHERE campaign_id = $1",
        uuid.UUID(campaign_id),
    )
    return {
        "rows": row["n"],
        "from_pct": 100 * row["lo"] / row["top"],
        "to_pct": 100 * row["hi"] / row["top"],
    }


async def server_page_query(conn: asyncpg.Connection) -> str | None:
    """The page query as the server last sent it (campaign, after id, limit as $1..$3):
    pg_stat_activity keeps each backend's latest statement, so while the server that just
    paged is still connected, one of its connections shows it. Read there rather than taken
    from the service's code, so that what is explained is what the server runs."""
    rows = await conn.fetch(
        "SELECT query FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        "   AND query ILIKE '%FROM coupons%' AND query ILIKE '%ORDER BY%' AND query LIKE '%$3%'"
    )
    return str(rows[0]["query"]) if rows else None


async def explain_page(
    conn: asyncpg.Connection, query: str, campaign_id: str, page_number: int, page_size: int
) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the server's page query for one page: as a custom plan
    (the values known) and as the generic plan of a prepared statement."""
    cid = uuid.UUID(campaign_id)
    offset = (page_number - 1) * page_size
    after = 0
    if offset:
        after = await conn.fetchval(
            "SELECT id FROM coupons WHERE campaign_id = $1 ORDER BY id OFFSET $2 LIMIT 1",
            cid,
            offset - 1,
        )
    limit = page_size + 1  # the ledger asks for one more row, to know whether more follow
    query = " ".join(query.split())
    literal = query.replace("$1", f"'{cid}'::uuid").replace("$2", str(int(after)))
    literal = literal.replace("$3", str(limit))
    custom = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {literal}")
    await conn.execute(f"PREPARE scale_page(uuid, bigint, bigint) AS {query}")
    try:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        generic = await conn.fetch(
            f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE scale_page('{cid}', {int(after)}, {limit})"
        )
    finally:
        await conn.execute("RESET plan_cache_mode")
        await conn.execute("DEALLOCATE scale_page")
    custom_text = [r[0] for r in custom]
    generic_text = [r[0] for r in generic]
    return {
        "custom": plan_summary(custom_text),
        "generic": plan_summary(generic_text),
        "campaign_id": campaign_id,
        "page_number": page_number,
        "after_id": after,
        "query": query,
        "custom_plan": custom_text,
        "generic_plan": generic_text,
        "uses_issue_order_index": all(
            any(ISSUE_ORDER in line for line in plan) for plan in (custom_text, generic_text)
        ),
    }


def plan_summary(plan: list[str]) -> dict[str, Any]:
    """The scan's index, rows read and thrown away, buffers and time, from EXPLAIN text."""
    text = "\n".join(plan)

    def first(pattern: str) -> str | None:
        found = re.search(pattern, text)
        return None if found is None else found.group(1)

    buffers = re.search(r"Buffers: shared ([^\n]*)", text)
    return {
        "index": first(r"Index (?:Only )?Scan using (\S+)"),
        "index_cond": first(r"Index Cond: ([^\n]*)"),
        "rows_removed_by_filter": int(first(r"Rows Removed by Filter: (\d+)") or 0),
        "buffers": None if buffers is None else buffers.group(1).strip(),
        "execution_ms": float(first(r"Execution Time: ([\d.]+) ms") or "nan"),
    }
