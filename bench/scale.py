"""`just bench-scale`: the service at scale: a million-coupon sell-out, paging at 10M rows.

sellout: `coupon serve --workers 2` and a campaign of --coupons (1,000,000)
coupons, driven to sell-out by wrk (bench/issue.lua: binary IssueCoupon, a new user per
request; wrk is stopped with SIGINT once PostgreSQL counts the whole stock). Every second the
RSS of each server process is read from /proc next to the campaign's issued_count, so memory
can be set against the coupons issued. Then I1-I4 are checked in PostgreSQL, and every
GetCampaign page of the campaign (page_size 1000, binary protobuf over HTTP, following
next_page_token) is fetched and timed, checking that the pages list every coupon once.

paging: the coupons table is filled up to --rows (10,000,000) rows with SQL
(INSERT ... SELECT FROM generate_series, through every constraint, index and trigger of the
schema; nothing disabled) across campaigns of --campaign-size coupons, --interleave campaigns
at a time with their rows interleaved, as when campaigns sell at the same time. Then, on a
fresh server, campaigns at the start, middle and end of the table (and the sell-out campaign)
are paged through, their first, middle and last pages fetched --repeats times each, and
EXPLAIN (ANALYZE, BUFFERS) shows the plan of the page query the server runs.

export: a campaign of --export-rows (10,000,000) coupons is filled with SQL (as above), and
ExportCoupons streams all of it from a fresh server (binary Connect streaming over HTTP,
read and decoded as it arrives, each coupon checked to come in issue order): rows/s, and
the RSS of every server process sampled twice a second, which stays flat whatever the
campaign's size (the server reads keyset chunks and sends each before reading the next).

Everything lives apart from a developer's data: the database `coupon_scale`, created here
and marked with a comment (dropped at the end unless --keep; a database of that name without
the mark is never dropped), and the Redis keys under `coupon-scale:` (deleted with SCAN at
the start and the end).

Exit status: 0 when it ran (missed targets are reported, not fatal), 1 when an invariant was
violated, 2 when the bench itself broke.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.procstat import CpuSnapshot, descendants, is_resource_tracker, memory_mib, workers
from bench.run import (
    ADMIN_DATABASE_URL,
    REDIS_URL,
    REPO,
    RESULTS_DIR,
    RESULTS_MD,
    BenchBroke,
    Server,
    background_load,
    base_meta,
    bench_result,
    children_cpu_seconds,
    commit_label,
    cpu_groups,
    delete_redis_keys,
    ensure_wrk,
    git_commit,
    post_campaign,
    verdict_word,
    wrk_argv,
)
from bench.run import fmt_ms as ms
from coupon.adapters.postgres.ledger import _PAGE as PAGE_QUERY
from coupon.gen.coupon.v1 import coupon_pb

DB_NAME = "coupon_scale"
DATABASE_URL = f"postgresql://postgres@127.0.0.1:5432/{DB_NAME}"
REDIS_PREFIX = "coupon-scale"
# The comment that marks the database as this script's: only such a database is dropped.
DB_MARK = "bench/scale.py: scratch database, dropped by bench/scale.py"

GET_CAMPAIGN = "/coupon.v1.CouponService/GetCampaign"
EXPORT_COUPONS = "/coupon.v1.CouponService/ExportCoupons"
# A flat export: server RSS growth from before the export to its peak, all processes.
TARGET_EXPORT_GROWTH_MIB = 64.0
ISSUE_ORDER = "coupons_pkey"  # (campaign_id, id): each campaign in issue order
PAGE_SIZE = 1000
PHASES = ("sellout", "paging", "export")

# Targets. Reported as PASS/FAIL; a miss never fails the run.
TARGET_PAGE_P99_MS = 20.0  # GetCampaign pages of 1,000 coupons
# Flat memory: RSS growth of all server processes between 10 % issued and sold out, per
# coupon issued in between. Any per-coupon state (a code, a user id, a dict entry) costs
# well over 50 bytes; allocator noise stays far below this.
TARGET_BYTES_PER_COUPON = 10.0
# Below this, RSS movements are allocator and page-cache noise whatever the stock (small runs).
MEMORY_NOISE_MIB = 2.0
# Flat paging: the slowest position's p50 within this factor of the fastest's.
TARGET_FLAT_RATIO = 1.5

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
# One campaign's coupons, slots $4..$5, in slot order (so id order is slot order); codes 'E'
# and 9 hex digits, apart from the fill's 'S' codes.
EXPORT_FILL = f"""
INSERT INTO coupons (campaign_id, total_coupons, starts_at, ends_at, slot, code, user_id,
                     issued_at)
SELECT $1::uuid, $2::bigint, $3::timestamptz, 'infinity', s,
       'E' || lpad(to_hex((s * {CODE_MULTIPLIER}) % {CODE_SPACE}), 9, '0'),
       'export-' || s, $3::timestamptz + s * interval '1 microsecond'
  FROM generate_series($4::bigint, $5::bigint) AS s
"""
EXPORT_FILL_CHUNK = 1_000_000
SIZES = """
SELECT pg_total_relation_size('coupons') AS total, pg_relation_size('coupons') AS heap,
       pg_indexes_size('coupons') AS indexes,
       (SELECT json_object_agg(indexrelid::regclass::text, pg_relation_size(indexrelid))
          FROM pg_index WHERE indrelid = 'coupons'::regclass)::text AS each_index,
       (SELECT count(*) FROM coupons) AS rows,
       (SELECT count(*) FROM campaigns) AS campaigns
"""


# --- small helpers -----------------------------------------------------------------------


def stats(samples: list[float]) -> dict[str, float]:
    """n, p50, p99, max and mean (nearest-rank percentiles) of milliseconds."""
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]

    return {
        "n": len(ordered),
        "p50": rank(50),
        "p99": rank(99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


def mib(size: float) -> str:
    return f"{size / 2**20:,.0f} MiB"


def say(text: str) -> None:
    print(text, flush=True)


# --- database and Redis ------------------------------------------------------------------


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
            f"database {DB_NAME} exists but was not created by bench/scale.py "
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
        env=env,
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


# --- the API -----------------------------------------------------------------------------


def server_env(token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": DATABASE_URL,
            "REDIS_URL": REDIS_URL,
            "COUPON_REDIS_PREFIX": REDIS_PREFIX,
            "COUPON_BACKEND": "postgres",
            "COUPON_ADMIN_TOKEN": token,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        }
    )
    return env


@contextmanager
def no_gc() -> Iterator[None]:
    """This process's cyclic GC off while timing: its pauses would be charged to the server."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Pager:
    """GetCampaign in binary protobuf over one keep-alive HTTP/1.1 connection; each call
    timed from sending the request to having the whole body (decoding not included)."""

    def __init__(self, url: str, token: str, page_size: int) -> None:
        self.page_size = page_size
        self._client = httpx.Client(
            base_url=url,
            headers={
                "content-type": "application/proto",
                "connect-protocol-version": "1",
                "authorization": f"Bearer {token}",
            },
            timeout=30,
        )

    def close(self) -> None:
        self._client.close()

    def page(self, campaign_id: str, token: str) -> tuple[float, coupon_pb.GetCampaignResponse]:
        body = coupon_pb.GetCampaignRequest(
            campaign_id=campaign_id, page_size=self.page_size, page_token=token
        ).to_binary()
        started = time.perf_counter()
        answer = self._client.post(GET_CAMPAIGN, content=body)
        elapsed = (time.perf_counter() - started) * 1000
        if answer.status_code != 200:
            raise BenchBroke(f"GetCampaign: HTTP {answer.status_code} {answer.text[:300]}")
        return elapsed, coupon_pb.GetCampaignResponse.from_binary(answer.content)

    def sweep(self, campaign_id: str) -> dict[str, Any]:
        """Every page in order (after one untimed request that opens the connection). The
        page times, the token of every page, and what the pages listed."""
        with no_gc():
            return self._sweep(campaign_id)

    def _sweep(self, campaign_id: str) -> dict[str, Any]:
        self.page(campaign_id, "")
        times: list[float] = []
        tokens: list[str] = []
        codes: set[str] = set()
        listed = 0
        wrong_campaign = 0
        token = ""
        campaign: coupon_pb.Campaign | None = None
        while True:
            elapsed, page = self.page(campaign_id, token)
            times.append(elapsed)
            tokens.append(token)
            campaign = page.campaign or campaign
            listed += len(page.coupons)
            for coupon in page.coupons:
                codes.add(coupon.code)
                wrong_campaign += coupon.campaign_id != campaign_id
            token = page.next_page_token
            if not token:
                break
        first, middle, last = page_indexes(len(times))
        return {
            "pages": len(times),
            "times_ms": times,
            "tokens": tokens,
            "latency_ms": stats(times),
            "first_ms": times[first],
            "middle_ms": times[middle],
            "last_ms": times[last],
            "listed": listed,
            "distinct_codes": len(codes),
            "wrong_campaign": wrong_campaign,
            "issued_count": 0 if campaign is None else campaign.issued_count,
            "total_coupons": 0 if campaign is None else campaign.total_coupons,
            "status": 0 if campaign is None else int(campaign.status),
        }


def page_indexes(pages: int) -> tuple[int, int, int]:
    """0-based indexes of the first, middle and last page."""
    return 0, (pages - 1) // 2, pages - 1


@dataclass
class Target:
    """One page of one campaign, to fetch again and again."""

    label: str  # e.g. "end of table (100,000)"
    campaign_id: str
    page: str  # first / middle / last
    page_number: int
    token: str
    times_ms: list[float] = field(default_factory=list)


def repeat_pages(pager: Pager, targets: list[Target], repeats: int) -> None:
    """Each target `repeats` times, round robin, so drift over time hits all alike."""
    with no_gc():
        for _ in range(repeats):
            for target in targets:
                elapsed, _page = pager.page(target.campaign_id, target.token)
                target.times_ms.append(elapsed)


def targets_of(label: str, campaign_id: str, sweep: dict[str, Any]) -> list[Target]:
    first, middle, last = page_indexes(sweep["pages"])
    return [
        Target(label, campaign_id, name, index + 1, sweep["tokens"][index])
        for name, index in (("first", first), ("middle", middle), ("last", last))
    ]


def target_rows(table_rows: int, targets: list[Target]) -> list[dict[str, Any]]:
    return [
        {
            "table_rows": table_rows,
            "campaign": t.label,
            "campaign_id": t.campaign_id,
            "page": t.page,
            "page_number": t.page_number,
            # The first fetch of a page is the coldest; the rest repeat it.
            "first_fetch_ms": t.times_ms[0] if t.times_ms else None,
            **stats(t.times_ms),
        }
        for t in targets
    ]


# --- memory sampling ---------------------------------------------------------------------


class Sampler:
    """Once a second: the campaign's issued_count and the RSS of every server process."""

    def __init__(self, conn: asyncpg.Connection, campaign_id: str, pids: dict[int, str]) -> None:
        self._conn = conn
        self._campaign = uuid.UUID(campaign_id)
        self.pids = pids
        self.samples: list[dict[str, Any]] = []
        self.marks: dict[str, int] = {}
        self.issued = 0
        self.changed: asyncio.Event = asyncio.Event()
        self._stop = asyncio.Event()
        self._started = time.monotonic()

    def mark(self, name: str) -> None:
        """Name the latest sample (the one taken just before this moment)."""
        self.marks[name] = len(self.samples) - 1

    async def take(self) -> None:
        self.issued = await self._conn.fetchval(
            "SELECT issued_count FROM campaigns WHERE id = $1", self._campaign
        )
        rss = {}
        for pid in self.pids:
            memory = memory_mib(pid)
            rss[str(pid)] = memory.get("rss")
        self.samples.append(
            {"t": round(time.monotonic() - self._started, 3), "issued": self.issued, "rss": rss}
        )
        self.changed.set()

    async def run(self) -> None:
        tick = time.monotonic()
        while not self._stop.is_set():
            await self.take()
            tick += 1.0
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, tick - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()

    def summary(self, total: int) -> dict[str, Any]:
        """Per process: RSS at start, at 10 % issued, peak, at sell-out, after paging."""
        at_tenth = next((i for i, s in enumerate(self.samples) if s["issued"] >= total / 10), None)
        sold = self.marks.get("sold_out", len(self.samples) - 1)
        per: dict[str, dict[str, Any]] = {}
        for pid, role in self.pids.items():
            series = [s["rss"].get(str(pid)) for s in self.samples]
            values = [v for v in series if v is not None]
            if not values:
                continue

            def at(index: int | None, series: list[float | None] = series) -> float | None:
                return None if index is None or index >= len(series) else series[index]

            per[str(pid)] = {
                "role": role,
                "start": at(self.marks.get("load_start", 0)),
                "at_10pct": at(at_tenth),
                "peak": max(values),
                "sold_out": at(sold),
                "after_paging": at(self.marks.get("paged")),
                "end": values[-1],
                "hwm": memory_mib(pid).get("peak"),
            }
        issued_between = (
            total - self.samples[at_tenth]["issued"] if at_tenth is not None else 0
        ) or 1
        growth = sum(
            (p["sold_out"] or 0) - (p["at_10pct"] or 0)
            for p in per.values()
            if p["sold_out"] is not None and p["at_10pct"] is not None
        )
        return {
            "processes": per,
            "growth_10pct_to_sold_out_mib": growth,
            "bytes_per_coupon": growth * 2**20 / issued_between,
            "growth_start_to_sold_out_mib": sum(
                (p["sold_out"] or 0) - (p["start"] or 0) for p in per.values()
            ),
        }


def server_processes(server: Server) -> dict[int, str]:
    """The server's main process and its workers (and any helper process), by role."""
    assert server.proc is not None
    found = {server.proc.pid: "main"}
    for pid in descendants(server.proc.pid):
        if is_resource_tracker(pid):
            found[pid] = "resource tracker"
    for number, pid in enumerate(workers(server.proc.pid), 1):
        found[pid] = f"worker {number}"
    return found


# --- sell-out ---------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="coupon-scale-")))
    sellout: dict[str, Any] = field(default_factory=dict)
    paging: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return server_env(self.token)

    def server(self, name: str) -> Server:
        argv = [sys.executable, "-m", "coupon", "serve", "--workers", str(self.args.workers)]
        return Server(name, argv, self.env, self.log_dir)


async def drive_to_sellout(
    run: Run, server: Server, campaign_id: str, sampler: Sampler
) -> dict[str, Any]:
    """wrk until PostgreSQL holds the whole stock, then SIGINT (wrk reports and exits)."""
    args = run.args
    total = args.coupons
    argv = wrk_argv(
        server.url,
        campaign_id,
        f"sellout-{run.run_id}",
        threads=args.threads,
        connections=args.connections,
        seconds=args.max_sellout_seconds,
    )
    cpu_before = children_cpu_seconds()
    groups = cpu_groups(server)
    start, started = CpuSnapshot.take(groups), time.monotonic()
    wrk = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout_task = asyncio.ensure_future(wrk.communicate())
    last_report = 0.0
    while sampler.issued < total and not stdout_task.done():
        sampler.changed.clear()
        await sampler.changed.wait()
        now = time.monotonic() - started
        if now - last_report >= 10:
            last_report = now
            say(f"    {now:5.0f} s: {sampler.issued:,} of {total:,} issued")
    sold_out_after = time.monotonic() - started
    sampler.mark("sold_out")
    if not stdout_task.done():
        wrk.send_signal(signal.SIGINT)
    out, err = await stdout_task
    wall = time.monotonic() - started
    end = CpuSnapshot.take(groups)
    cores = end.cores_used_since(
        start, wall, extra={"generator": children_cpu_seconds() - cpu_before}
    )
    result = bench_result(out.decode(errors="replace"))
    if result is None:
        raise BenchBroke(
            f"wrk gave no result (exit {wrk.returncode}):\n{out.decode()[-2000:]}\n"
            f"{err.decode()[-2000:]}"
        )
    if sampler.issued < total:
        raise BenchBroke(
            f"not sold out after {args.max_sellout_seconds} s: {sampler.issued:,} of {total:,}"
        )
    errors = result["errors"]
    result["ok"] = result["requests"] - errors["status"]
    result["transport_errors"] = sum(v for k, v in errors.items() if k != "status")
    result["sold_out_seen_after_s"] = sold_out_after
    result["cpu_cores"] = cores
    result["other_cpu_users"] = end.top_others(start, wall)
    return result


async def verify_sellout(
    conn: asyncpg.Connection, campaign_id: str, acked: int
) -> list[dict[str, Any]]:
    """I1-I4 of the campaign, from PostgreSQL."""
    cid = uuid.UUID(campaign_id)
    c = await conn.fetchrow(
        "SELECT total_coupons, issued_count, starts_at, ends_at FROM campaigns WHERE id = $1",
        cid,
    )
    k = await conn.fetchrow(
        "SELECT count(*) AS rows, count(DISTINCT code) AS codes, count(DISTINCT slot) AS slots,"
        "       min(slot) AS min_slot, max(slot) AS max_slot,"
        "       count(DISTINCT user_id) AS users,"
        "       count(*) FILTER (WHERE issued_at < $2 OR issued_at >= $3) AS outside,"
        "       min(issued_at) AS first, max(issued_at) AS last"
        "  FROM coupons WHERE campaign_id = $1",
        cid,
        c["starts_at"],
        c["ends_at"],
    )
    duplicate_codes = await conn.fetchval(
        "SELECT count(*) FROM (SELECT code FROM coupons GROUP BY code HAVING count(*) > 1) d"
    )
    total, rows = c["total_coupons"], k["rows"]
    return [
        {
            "name": "I1",
            "rule": "coupons = issued_count = total_coupons (sold out, not over)",
            "ok": rows == total == c["issued_count"]
            and k["slots"] == rows
            and k["min_slot"] == 1
            and k["max_slot"] == total,
            "detail": f"{rows:,} rows, issued_count {c['issued_count']:,}, total {total:,}, "
            f"{k['slots']:,} distinct slots in {k['min_slot']}..{k['max_slot']}",
        },
        {
            "name": "I2",
            "rule": "no duplicate code",
            "ok": duplicate_codes == 0 and k["codes"] == rows,
            "detail": f"{k['codes']:,} distinct codes in {rows:,} rows; "
            f"{duplicate_codes} duplicated in the table",
        },
        {
            "name": "I3",
            "rule": "issued_at in [starts_at, ends_at)",
            "ok": k["outside"] == 0,
            "detail": f"{k['outside']} outside; first issued {(k['first'] - c['starts_at'])} "
            "after starts_at",
        },
        {
            "name": "I4",
            "rule": "one coupon per user",
            "ok": k["users"] == rows,
            "detail": f"{k['users']:,} users for {rows:,} coupons",
        },
        {
            "name": "acks",
            "rule": "every 2xx answer is stored",
            "ok": acked <= rows,
            "detail": f"{acked:,} acknowledged, {rows:,} stored",
        },
        {
            "name": "sell-out span",
            "rule": "(issued_at of the last coupon - of the first)",
            "ok": True,
            "detail": f"{(k['last'] - k['first']).total_seconds():.1f} s",
            "seconds": (k["last"] - k["first"]).total_seconds(),
        },
    ]


def api_checks(sweep: dict[str, Any], campaign_id: str, total: int) -> list[dict[str, Any]]:
    sold_out = int(coupon_pb.CampaignStatus.SOLD_OUT)
    return [
        {
            "name": "API",
            "rule": "GetCampaign pages list every coupon once, sold out",
            "ok": sweep["listed"] == sweep["distinct_codes"] == total == sweep["issued_count"]
            and sweep["wrong_campaign"] == 0
            and sweep["status"] == sold_out,
            "detail": f"{sweep['pages']:,} pages, {sweep['listed']:,} coupons listed, "
            f"{sweep['distinct_codes']:,} distinct codes, issued_count "
            f"{sweep['issued_count']:,}, status {sweep['status']} (sold out = {sold_out})",
        }
    ]


async def run_sellout(run: Run) -> None:
    args = run.args
    server = run.server("sellout")
    say(f"sell-out of {args.coupons:,} coupons, {args.workers} workers ...")
    await asyncio.to_thread(server.start)
    conn = await asyncpg.connect(DATABASE_URL)
    sampler_conn = await asyncpg.connect(DATABASE_URL)
    sampler_task: asyncio.Task[None] | None = None
    try:
        campaign_id, starts_at = post_campaign(
            server.url, run.token, f"scale sellout {run.run_id}", args.coupons
        )
        pids = server_processes(server)
        say(
            f"  server on port {server.port}; campaign {campaign_id}; processes "
            + ", ".join(f"{role} {pid}" for pid, role in pids.items())
        )
        sampler = Sampler(sampler_conn, campaign_id, pids)
        sampler_task = asyncio.create_task(sampler.run())
        await asyncio.sleep(3)  # a baseline before any load
        sampler.mark("load_start")
        wrk = await drive_to_sellout(run, server, campaign_id, sampler)
        say(
            f"  sold out: wrk {wrk['requests']:,} requests, {wrk['ok']:,} 2xx, "
            f"{wrk['transport_errors']} transport errors"
        )
        await asyncio.sleep(3)  # the last commits, and a few quiet samples
        checks = await verify_sellout(conn, campaign_id, wrk["ok"])
        sizes = await table_sizes(conn)
        say("  paging through every GetCampaign page ...")
        pager = Pager(server.url, run.token, args.page_size)
        try:
            sweep = await asyncio.to_thread(pager.sweep, campaign_id)
            sampler.mark("paged")
            targets = targets_of(f"sell-out ({args.coupons:,})", campaign_id, sweep)
            await asyncio.to_thread(repeat_pages, pager, targets, args.repeats)
        finally:
            pager.close()
        checks += api_checks(sweep, campaign_id, args.coupons)
        await asyncio.sleep(1.5)
        sampler.stop()
        await sampler_task
        span = next(c["seconds"] for c in checks if c["name"] == "sell-out span")
        run.sellout = {
            "campaign_id": campaign_id,
            "coupons": args.coupons,
            "starts_at": starts_at.isoformat(),
            "wrk": wrk,
            "issued_per_s": args.coupons / span if span else None,
            "checks": checks,
            "memory": sampler.summary(args.coupons),
            "memory_samples": sampler.samples,
            "sweep": {k: v for k, v in sweep.items() if k != "tokens"},
            "positions": target_rows(sizes["rows"], targets),
            "table": sizes,
        }
        run.violations += [c["name"] for c in checks if not c["ok"]]
    finally:
        if sampler_task is not None and not sampler_task.done():
            sampler_task.cancel()
        await conn.close()
        await sampler_conn.close()
        await asyncio.to_thread(server.stop)


# --- 10 million rows --------------------------------------------------------------------


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


async def explain_page(
    conn: asyncpg.Connection, campaign_id: str, page_number: int, page_size: int
) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the server's page query (ledger._PAGE) for one page:
    as a custom plan (the values known) and as the generic plan of a prepared statement."""
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
    query = " ".join(PAGE_QUERY.split())
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


async def run_paging(run: Run) -> None:
    args = run.args
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        filled = await fill(conn, args)
        sizes = await table_sizes(conn)
        say(
            f"  {sizes['rows']:,} rows in {sizes['campaigns']:,} campaigns; coupons table + "
            f"indexes {mib(sizes['total_bytes'])} (heap {mib(sizes['heap_bytes'])}, "
            f"indexes {mib(sizes['indexes_bytes'])})"
        )
        chosen: list[tuple[str, str]] = []
        full = [c for c in filled["campaigns"] if c["coupons"] == args.campaign_size]
        if run.sellout:
            chosen.append((f"sell-out ({args.coupons:,})", run.sellout["campaign_id"]))
        if full:
            for where, pick in (
                ("start", full[0]),
                ("middle", full[len(full) // 2]),
                ("end", full[-1]),
            ):
                chosen.append((f"{where} of fill ({pick['coupons']:,})", pick["id"]))
        places = {cid: await campaign_place(conn, cid) for _, cid in chosen}
        busy = await asyncio.to_thread(background_load)
        say(f"  busy before paging: {busy:.2f} cores")
        server = run.server("paging")
        await asyncio.to_thread(server.start)
        try:
            pager = Pager(server.url, run.token, args.page_size)
            try:
                sweeps: dict[str, dict[str, Any]] = {}
                targets: list[Target] = []
                for label, cid in chosen:
                    say(f"  paging through {label} {cid} ...")
                    sweep = await asyncio.to_thread(pager.sweep, cid)
                    sweeps[label] = {k: v for k, v in sweep.items() if k != "tokens"}
                    sweeps[label]["campaign_id"] = cid
                    sweeps[label]["place"] = places[cid]
                    if sweep["listed"] != places[cid]["rows"]:
                        run.violations.append(f"paging {label}")
                        say(
                            f"  VIOLATED: {label} lists {sweep['listed']:,} coupons, "
                            f"the table holds {places[cid]['rows']:,}"
                        )
                    targets += targets_of(label, cid, sweep)
                say(f"  {len(targets)} pages x {args.repeats} fetches, round robin ...")
                await asyncio.to_thread(repeat_pages, pager, targets, args.repeats)
            finally:
                pager.close()
        finally:
            await asyncio.to_thread(server.stop)
        say("  EXPLAIN (ANALYZE, BUFFERS) of every measured page ...")
        explains = []
        for target in targets:
            explained = await explain_page(
                conn, target.campaign_id, target.page_number, args.page_size
            )
            explains.append({"campaign": target.label, "page": target.page, **explained})
        run.paging = {
            "fill": filled,
            "table": sizes,
            "busy_before_paging": busy,
            "sweeps": sweeps,
            "positions": target_rows(sizes["rows"], targets),
            "explain": explains,
        }
    finally:
        await conn.close()


# --- export ------------------------------------------------------------------------------


async def fill_export_campaign(conn: asyncpg.Connection, rows: int) -> tuple[str, float]:
    """A campaign of `rows` coupons, inserted through every constraint and trigger."""
    campaign_id = uuid.uuid4()
    starts_at = datetime.now(UTC) - timedelta(days=1)
    started = time.monotonic()
    await conn.execute(FILL_CAMPAIGNS, [campaign_id], [rows], starts_at)
    for first in range(1, rows + 1, EXPORT_FILL_CHUNK):
        last = min(rows, first + EXPORT_FILL_CHUNK - 1)
        await conn.execute(EXPORT_FILL, campaign_id, rows, starts_at, first, last)
        say(f"  {last:>12,} rows  {time.monotonic() - started:6.0f} s")
    await conn.execute("ANALYZE coupons")
    return str(campaign_id), time.monotonic() - started


def stream_export(url: str, token: str, campaign_id: str, rows: int) -> dict[str, Any]:
    """ExportCoupons over HTTP, binary Connect streaming: each message decoded as it
    arrives, each coupon checked to be the next in issue order."""
    request = coupon_pb.ExportCouponsRequest(campaign_id=campaign_id).to_binary()
    body = b"\x00" + len(request).to_bytes(4, "big") + request
    headers = {
        "content-type": "application/connect+proto",
        "connect-protocol-version": "1",
        "authorization": f"Bearer {token}",
    }
    received = messages = out_of_order = 0
    end_message = b""
    buffer = bytearray()
    cpu = time.thread_time()
    started = time.perf_counter()
    first_at = None
    with (
        httpx.Client(timeout=None) as client,
        client.stream("POST", url + EXPORT_COUPONS, content=body, headers=headers) as response,
    ):
        if response.status_code != 200:
            raise BenchBroke(f"ExportCoupons: HTTP {response.status_code}")
        for data in response.iter_raw(1 << 16):
            buffer += data
            while len(buffer) >= 5:
                size = int.from_bytes(buffer[1:5], "big")
                if len(buffer) < 5 + size:
                    break
                flags, payload = buffer[0], bytes(buffer[5 : 5 + size])
                del buffer[: 5 + size]
                if flags & 0x02:
                    end_message = payload
                    continue
                message = coupon_pb.ExportCouponsResponse.from_binary(payload)
                if first_at is None:
                    first_at = time.perf_counter() - started
                messages += 1
                for coupon in message.coupons:
                    received += 1
                    out_of_order += coupon.user_id != f"export-{received}"
    seconds = time.perf_counter() - started
    error = json.loads(end_message or b"{}").get("error")
    return {
        "rows": rows,
        "received": received,
        "messages": messages,
        "out_of_order": out_of_order,
        "error": error,
        "seconds": seconds,
        "first_message_s": first_at,
        "rows_per_s": received / seconds if seconds else 0.0,
        "client_cpu_s": time.thread_time() - cpu,
    }


async def sample_rss(
    pids: dict[int, str], samples: list[dict[str, Any]], stop: asyncio.Event
) -> None:
    started = time.monotonic()
    while not stop.is_set():
        samples.append(
            {
                "t": round(time.monotonic() - started, 2),
                "rss": {str(pid): memory_mib(pid).get("rss") for pid in pids},
            }
        )
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def run_export(run: Run) -> None:
    rows = run.args.export_rows
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        say(f"export: filling a campaign of {rows:,} coupons ...")
        campaign_id, fill_seconds = await fill_export_campaign(conn, rows)
    finally:
        await conn.close()
    server = run.server("export")
    await asyncio.to_thread(server.start)
    try:
        pids = server_processes(server)
        samples: list[dict[str, Any]] = []
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(sample_rss(pids, samples, stop))
        await asyncio.sleep(1.0)  # a few samples before the export
        before = len(samples)
        say(f"  ExportCoupons of {campaign_id} ...")
        streamed = await asyncio.to_thread(stream_export, server.url, run.token, campaign_id, rows)
        stop.set()
        await sampler
    finally:
        await asyncio.to_thread(server.stop)
    processes = {}
    for pid, role in pids.items():
        series = [x["rss"].get(str(pid)) for x in samples]
        start = next((v for v in series[:before] if v is not None), None)
        during = [v for v in series[before:] if v is not None]
        processes[str(pid)] = {
            "role": role,
            "before": start,
            "peak": max(during, default=None),
            "end": during[-1] if during else None,
        }
    growth = sum(
        (p["peak"] or 0) - (p["before"] or 0)
        for p in processes.values()
        if p["peak"] is not None and p["before"] is not None
    )
    complete = (
        streamed["received"] == rows and not streamed["out_of_order"] and not streamed["error"]
    )
    if not complete:
        run.violations.append("export")
        say(
            f"  VIOLATED: export received {streamed['received']:,} of {rows:,} coupons, "
            f"{streamed['out_of_order']:,} out of issue order, error {streamed['error']}"
        )
    run.export = {
        "campaign_id": campaign_id,
        "fill_seconds": fill_seconds,
        **streamed,
        "complete": complete,
        "rss_processes": processes,
        "rss_growth_mib": growth,
        "rss_samples": samples,
    }


def export_facts(run: Run) -> list[str]:
    e = run.export
    each = ", ".join(
        f"{p['role']} {p['before'] or 0:.1f} -> peak {p['peak'] or 0:.1f} MiB"
        for p in e["rss_processes"].values()
    )
    return [
        f"ExportCoupons of {e['rows']:,} coupons (filled in {e['fill_seconds']:.0f} s): "
        f"{e['received']:,} received in {e['messages']:,} messages in {e['seconds']:.1f} s = "
        f"{e['rows_per_s']:,.0f} rows/s; first message after {e['first_message_s'] or 0:.3f} s; "
        f"{'every coupon once, in issue order' if e['complete'] else 'INCOMPLETE'}; "
        f"client CPU {e['client_cpu_s']:.1f} s (decoding and checking)",
        f"server RSS (sampled twice a second): {each}; growth {e['rss_growth_mib']:+.1f} MiB",
    ]


# --- reporting ---------------------------------------------------------------------------


def targets(run: Run) -> list[tuple[str, bool | None, str]]:
    rows: list[tuple[str, bool | None, str]] = []
    s = run.sellout
    if s:
        sold = all(c["ok"] for c in s["checks"])
        rows.append(
            (
                f"{s['coupons']:,} coupons sold out, I1-I4 hold",
                sold,
                ", ".join(
                    f"{c['name']} {'ok' if c['ok'] else 'VIOLATED'}"
                    for c in s["checks"]
                    if c["name"] != "sell-out span"
                ),
            )
        )
        memory = s["memory"]
        rows.append(
            (
                f"server memory flat (10 %->100 % issued: < {TARGET_BYTES_PER_COUPON:g} B per "
                f"coupon or <= {MEMORY_NOISE_MIB:g} MiB)",
                memory["bytes_per_coupon"] < TARGET_BYTES_PER_COUPON
                or memory["growth_10pct_to_sold_out_mib"] <= MEMORY_NOISE_MIB,
                f"{memory['growth_10pct_to_sold_out_mib']:+.1f} MiB over all processes = "
                f"{memory['bytes_per_coupon']:.1f} B per coupon",
            )
        )
        p99 = s["sweep"]["latency_ms"]["p99"]
        rows.append(
            (
                f"GetCampaign pages of {run.args.page_size:,}: p99 <= {TARGET_PAGE_P99_MS:g} ms",
                p99 <= TARGET_PAGE_P99_MS,
                f"p99 {ms(p99)} ms over {s['sweep']['pages']:,} pages",
            )
        )
    p = run.paging
    if p:
        positions = p["positions"]
        p50s = [r["p50"] for r in positions if r.get("n")]
        p99s = [r["p99"] for r in positions if r.get("n")]
        if p50s:
            ratio = max(p50s) / min(p50s)
            rows.append(
                (
                    f"paging flat at {p['table']['rows']:,} rows: every position's p99 <= "
                    f"{TARGET_PAGE_P99_MS:g} ms and p50 max/min <= {TARGET_FLAT_RATIO:g}",
                    max(p99s) <= TARGET_PAGE_P99_MS and ratio <= TARGET_FLAT_RATIO,
                    f"p50 {ms(min(p50s))}-{ms(max(p50s))} ms (x{ratio:.2f}), "
                    f"p99 at most {ms(max(p99s))} ms",
                )
            )
        if p["explain"]:
            rows.append(
                (
                    "page query uses the (campaign_id, id) index",
                    all(e["uses_issue_order_index"] for e in p["explain"]),
                    f"{sum(e['uses_issue_order_index'] for e in p['explain'])} of "
                    f"{len(p['explain'])} pages (custom and generic plan); otherwise "
                    + (
                        ", ".join(
                            sorted(
                                {str(e["custom"]["index"]) for e in p["explain"]} - {ISSUE_ORDER}
                            )
                        )
                        or "-"
                    ),
                )
            )
    e = run.export
    if e:
        rows.append(
            (
                f"ExportCoupons of {e['rows']:,} coupons: all, in issue order, server RSS "
                f"growth <= {TARGET_EXPORT_GROWTH_MIB:g} MiB",
                e["complete"] and e["rss_growth_mib"] <= TARGET_EXPORT_GROWTH_MIB,
                f"{e['rows_per_s']:,.0f} rows/s, RSS {e['rss_growth_mib']:+.1f} MiB",
            )
        )
    return rows


def position_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            f"{r['table_rows']:,}",
            r["campaign"],
            f"{r['page']} (#{r['page_number']:,})",
            str(r.get("n", 0)),
            ms(r.get("p50")),
            ms(r.get("p99")),
            ms(r.get("max")),
            ms(r.get("first_fetch_ms")),
        ]
        for r in rows
    ]


POSITION_HEADER = [
    "table rows",
    "campaign (coupons)",
    "page",
    "n",
    "p50 ms",
    "p99 ms",
    "max ms",
    "1st fetch ms",
]


def sweep_rows(run: Run) -> list[list[str]]:
    rows = []
    sweeps: list[tuple[int, str, dict[str, Any]]] = []
    if run.sellout:
        sweeps.append(
            (
                run.sellout["table"]["rows"],
                f"sell-out ({run.sellout['coupons']:,})",
                run.sellout["sweep"],
            )
        )
    if run.paging:
        sweeps += [(run.paging["table"]["rows"], k, v) for k, v in run.paging["sweeps"].items()]
    for table_rows, label, sweep in sweeps:
        lat = sweep["latency_ms"]
        place = sweep.get("place")
        where = "" if place is None else f" @ {place['from_pct']:.0f}-{place['to_pct']:.0f} %"
        rows.append(
            [
                f"{table_rows:,}",
                label + where,
                f"{sweep['pages']:,}",
                ms(lat["p50"]),
                ms(lat["p99"]),
                ms(lat["max"]),
                ms(sweep["first_ms"]),
                ms(sweep["middle_ms"]),
                ms(sweep["last_ms"]),
            ]
        )
    return rows


SWEEP_HEADER = [
    "table rows",
    "campaign (coupons) @ id range",
    "pages",
    "p50 ms",
    "p99 ms",
    "max ms",
    "first ms",
    "middle ms",
    "last ms",
]


def memory_rows(run: Run) -> list[list[str]]:
    def f(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return [
        [
            f"{p['role']} ({pid})",
            f(p["start"]),
            f(p["at_10pct"]),
            f(p["peak"]),
            f(p["sold_out"]),
            f(p["after_paging"]),
            f(p["hwm"]),
        ]
        for pid, p in run.sellout["memory"]["processes"].items()
    ]


MEMORY_HEADER = [
    "process",
    "start",
    "at 10 % issued",
    "peak (sampled)",
    "sold out",
    "after paging",
    "VmHWM",
]


EXPLAIN_HEADER = ["campaign", "page", "index", "index cond", "rows filtered out", "buffers", "ms"]


def explain_rows(explains: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            e["campaign"],
            f"{e['page']} (#{e['page_number']:,})",
            str(e["custom"]["index"]),
            str(e["custom"]["index_cond"]),
            f"{e['custom']['rows_removed_by_filter']:,}",
            str(e["custom"]["buffers"]),
            f"{e['custom']['execution_ms']:.2f}",
        ]
        for e in explains
    ]


def text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "-" * len(line)]
    for row in rows:
        out.append(
            "  ".join(
                (c.ljust(w) if i < 2 else c.rjust(w))
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return out


def md_table(header: list[str], rows: list[list[str]], left: int = 2) -> list[str]:
    out = ["| " + " | ".join(header) + " |"]
    out.append("|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|")
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def sellout_facts(run: Run) -> list[str]:
    s = run.sellout
    wrk = s["wrk"]
    c = wrk["cpu_cores"]
    lat = wrk["latency_us"]
    return [
        f"sell-out of {s['coupons']:,} coupons in {s['coupons'] / s['issued_per_s']:.1f} s "
        f"(issued_at span) = {s['issued_per_s']:,.0f} issued/s; wrk -t{run.args.threads} "
        f"-c{run.args.connections}: {wrk['requests']:,} requests, {wrk['ok']:,} 2xx, "
        f"{wrk['requests'] - wrk['ok']:,} non-2xx (sold out, after the end), "
        f"{wrk['transport_errors']} transport errors; latency p50 {lat['p50'] / 1000:.2f} / "
        f"p99 {lat['p99'] / 1000:.2f} ms",
        f"CPU during the sell-out (cores): server {c['server']:.2f}, wrk {c['generator']:.2f}, "
        f"PostgreSQL {c['postgres']:.2f}, Redis {c['redis']:.2f}, other {c['other']:.2f}, "
        f"idle {c['idle']:.2f}",
        f"memory: {s['memory']['growth_10pct_to_sold_out_mib']:+.1f} MiB over all server "
        f"processes from 10 % issued to sold out = {s['memory']['bytes_per_coupon']:.1f} B per "
        f"coupon; {s['memory']['growth_start_to_sold_out_mib']:+.1f} MiB from start to sold out",
        f"coupons table at {s['table']['rows']:,} rows: {mib(s['table']['total_bytes'])} "
        f"(heap {mib(s['table']['heap_bytes'])}, indexes {mib(s['table']['indexes_bytes'])})",
    ]


def paging_facts(run: Run) -> list[str]:
    p = run.paging
    f = p["fill"]
    t = p["table"]
    each = ", ".join(f"{name} {mib(size)}" for name, size in t["index_bytes"].items())
    return [
        f"fill: {f['inserted_rows']:,} rows (from {f['existing_rows']:,}) in {f['seconds']:.0f} s "
        f"= {f['rows_per_s'] or 0:,.0f} rows/s, campaigns of {f['campaign_size']:,}, "
        f"{f['interleave']} interleaved at a time"
        + ("; STOPPED EARLY by --fill-budget" if f["stopped_early"] else "")
        + f"; then VACUUM (ANALYZE) {f['vacuum_analyze_seconds']:.0f} s, "
        f"CHECKPOINT {f['checkpoint_seconds']:.0f} s",
        f"coupons at {t['rows']:,} rows in {t['campaigns']:,} campaigns: "
        f"pg_total_relation_size {mib(t['total_bytes'])} = heap {mib(t['heap_bytes'])} + "
        f"indexes {mib(t['indexes_bytes'])} ({each})",
        f"busy before paging: {p['busy_before_paging']:.2f} cores",
    ]


def report_lines(run: Run, meta: dict[str, Any]) -> list[str]:
    lines = [
        f"coupon bench-scale {meta['date']}  commit {commit_label(meta)}",
        f"{meta['cores']} cores, {meta['workers']} workers, page_size {meta['page_size']}, "
        f"{meta['repeats']} fetches per page position; busy before start: "
        f"{meta['background_cores']:.2f} cores",
    ]
    if run.sellout:
        lines += ["", "sell-out:"]
        lines += [f"  {x}" for x in sellout_facts(run)]
        lines += ["", "server RSS, MiB (sampled every second from /proc):"]
        lines += text_table(MEMORY_HEADER, memory_rows(run))
        lines += ["", "invariants:"]
        lines += [
            f"  {'ok' if c['ok'] else 'VIOLATED':<8} {c['name']}: {c['rule']}  {c['detail']}"
            for c in run.sellout["checks"]
        ]
    if run.paging:
        lines += ["", "paging at scale:"]
        lines += [f"  {x}" for x in paging_facts(run)]
    if run.sellout or run.paging:
        lines += ["", "GetCampaign, every page in order (one request each):"]
        lines += text_table(SWEEP_HEADER, sweep_rows(run))
        lines += ["", "GetCampaign, first/middle/last pages fetched again and again:"]
        positions = (run.sellout.get("positions") or []) + (run.paging.get("positions") or [])
        lines += text_table(POSITION_HEADER, position_table(positions))
    explains = run.paging.get("explain", [])
    if explains:
        lines += ["", "EXPLAIN (ANALYZE, BUFFERS) of the page query (ledger._PAGE), custom plans:"]
        lines += text_table(EXPLAIN_HEADER, explain_rows(explains))
        worst = max(explains, key=lambda e: e["custom"]["execution_ms"])
        lines += ["", f"slowest: {worst['campaign']} {worst['page']} page, custom plan:"]
        lines += [f"  {x}" for x in worst["custom_plan"]]
        lines += ["its generic plan (PREPARE, plan_cache_mode = force_generic_plan):"]
        lines += [f"  {x}" for x in worst["generic_plan"]]
    if run.export:
        lines += ["", "export:"]
        lines += [f"  {x}" for x in export_facts(run)]
    lines += ["", "targets:"]
    lines += [f"  {verdict_word(ok):<4} {name}: {value}" for name, ok, value in targets(run)]
    return lines


def markdown_section(run: Run, meta: dict[str, Any]) -> str:
    out = [
        f"## Scale (`just bench-scale`) · {meta['date']} · commit {commit_label(meta, '`')}",
        "",
        f"`{meta['command']}` · {meta['cores']} cores · {meta['workers']} workers · "
        f"page_size {meta['page_size']} · {meta['repeats']} fetches per page position · "
        f"busy before start: {meta['background_cores']:.2f} cores",
        "",
    ]
    if run.sellout:
        out.append(f"**Sell-out of {run.sellout['coupons']:,} coupons.**")
        out.append("")
        out += [f"- {x}" for x in sellout_facts(run)]
        out.append(
            "- invariants (PostgreSQL, and the API's pages): "
            + "; ".join(
                f"{c['name']} {'ok' if c['ok'] else '**VIOLATED**'} ({c['detail']})"
                for c in run.sellout["checks"]
            )
        )
        out += ["", "Server RSS in MiB, sampled every second from /proc:", ""]
        out += md_table(MEMORY_HEADER, memory_rows(run), left=1)
        out.append("")
    if run.paging:
        out.append(f"**GetCampaign paging at {run.paging['table']['rows']:,} rows.**")
        out.append("")
        out += [f"- {x}" for x in paging_facts(run)]
        out.append("")
    if run.sellout or run.paging:
        out += ["GetCampaign, every page in order (one request each):", ""]
        out += md_table(SWEEP_HEADER, sweep_rows(run))
        out += [
            "",
            "GetCampaign, first/middle/last pages fetched again and again (round robin):",
            "",
        ]
        positions = (run.sellout.get("positions") or []) + (run.paging.get("positions") or [])
        out += md_table(POSITION_HEADER, position_table(positions), left=3)
    explains = run.paging.get("explain", [])
    if explains:
        worst = max(explains, key=lambda e: e["custom"]["execution_ms"])
        out += [
            "",
            "EXPLAIN (ANALYZE, BUFFERS) of the server's page query (ledger._PAGE) for each "
            "measured page (custom plans; the generic plans chose the same index):"
            if all(e["custom"]["index"] == e["generic"]["index"] for e in explains)
            else "EXPLAIN (ANALYZE, BUFFERS) of the server's page query (ledger._PAGE) for each "
            "measured page (custom plans; the generic plans differ, see the JSON):",
            "",
        ]
        out += md_table(EXPLAIN_HEADER, explain_rows(explains), left=4)
        out += [
            "",
            f"The slowest, {worst['campaign']} {worst['page']} page:",
            "",
            "```",
            *worst["custom_plan"],
            "```",
        ]
    if run.export:
        out += ["", "**ExportCoupons.**", ""]
        out += [f"- {x}" for x in export_facts(run)]
    out += [""]
    out += [f"- **{verdict_word(ok)}** {name}: {value}" for name, ok, value in targets(run)]
    return "\n".join(out) + "\n"


def write_outputs(run: Run, meta: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{stamp}-{meta['commit']}-scale.json"
    document = {
        **meta,
        "sellout": run.sellout,
        "paging": run.paging,
        "export": run.export,
        "targets": [{"target": n, "met": ok, "value": v} for n, ok, v in targets(run)],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    with RESULTS_MD.open("a") as md:
        md.write("\n" + markdown_section(run, meta))
    return path


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="just bench-scale",
        description="Sell out a 1,000,000-coupon campaign (memory, I1-I4, paging), page "
        "GetCampaign with 10,000,000 coupon rows in the table, then stream a 10,000,000-coupon "
        "campaign through ExportCoupons (rows/s, server RSS).",
    )
    parser.add_argument("--coupons", type=int, default=1_000_000, help="sell-out stock (1e6)")
    parser.add_argument(
        "--rows", type=int, default=10_000_000, help="coupon rows to fill up to (1e7)"
    )
    parser.add_argument(
        "--only",
        default="sellout,paging,export",
        help="phases to run, of sellout, paging, export (all three)",
    )
    parser.add_argument(
        "--export-rows", type=int, default=10_000_000, help="coupons of the exported campaign (1e7)"
    )
    parser.add_argument("--workers", type=int, default=2, help="server workers (2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="wrk threads")
    parser.add_argument("--connections", type=int, default=128, help="wrk connections (128)")
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE, help="GetCampaign (1000)")
    parser.add_argument(
        "--repeats", type=int, default=100, help="fetches of each first/middle/last page (100)"
    )
    parser.add_argument(
        "--campaign-size", type=int, default=100_000, help="coupons per filled campaign (1e5)"
    )
    parser.add_argument(
        "--interleave", type=int, default=10, help="filled campaigns whose rows interleave (10)"
    )
    parser.add_argument(
        "--fill-budget",
        type=float,
        default=900,
        help="seconds after which no further fill wave starts (900)",
    )
    parser.add_argument(
        "--max-sellout-seconds", type=int, default=900, help="give up selling out after (900)"
    )
    parser.add_argument(
        "--keep", action="store_true", help=f"keep the {DB_NAME} database at the end"
    )
    parser.add_argument(
        "--no-record",
        action="store_true",
        help="print only: no JSON under bench/results/, nothing appended to RESULTS.md",
    )
    args = parser.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    if not args.only or set(args.only) - set(PHASES):
        parser.error("--only takes phases of sellout, paging, export, comma-separated")
    if not 1 <= args.coupons <= 10_000_000:
        parser.error("--coupons must be between 1 and 10,000,000 (the schema's limit)")
    if not 1 <= args.export_rows <= 10_000_000:
        parser.error("--export-rows must be between 1 and 10,000,000 (the schema's limit)")
    if not 1 <= args.campaign_size <= 10_000_000 or args.interleave < 1:
        parser.error("--campaign-size must be in 1..10,000,000 and --interleave >= 1")
    return args


async def run_all(run: Run) -> None:
    await create_database()
    migrate(run.env)
    if "sellout" in run.args.only:
        await run_sellout(run)
    if "paging" in run.args.only:
        await run_paging(run)
    if "export" in run.args.only:
        await run_export(run)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commit, dirty = git_commit()
    meta: dict[str, Any] = {
        **base_meta("bench-scale", argv, commit, dirty),
        "workers": args.workers,
        "page_size": args.page_size,
        "repeats": args.repeats,
        "only": args.only,
        "options": vars(args),
    }
    run = Run(args)
    meta["background_cores"] = background_load()
    say(
        f"coupon bench-scale: {','.join(args.only)}; database {DB_NAME}, Redis prefix "
        f"{REDIS_PREFIX}; busy before start {meta['background_cores']:.2f} cores; server logs "
        f"in {run.log_dir}"
    )
    if meta["background_cores"] > 0.2:
        say(
            f"warning: the machine was already busy ({meta['background_cores']:.2f} cores) "
            "before the bench started: the figures will be worse than on a quiet machine"
        )
    started = time.monotonic()
    try:
        if "sellout" in args.only:
            ensure_wrk()
        delete_redis_keys(REDIS_PREFIX)
        try:
            asyncio.run(run_all(run))
        finally:
            say(f"deleted {delete_redis_keys(REDIS_PREFIX)} Redis keys under '{REDIS_PREFIX}:'")
            if args.keep:
                say(f"kept the {DB_NAME} database (--keep)")
            else:
                asyncio.run(drop_database())
                say(f"dropped the {DB_NAME} database")
    except BenchBroke as exc:
        print(f"\nbench broke: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - anything unexpected is a broken bench, say so
        traceback.print_exc()
        return 2
    meta["seconds"] = time.monotonic() - started
    print("\n" + "\n".join(report_lines(run, meta)), flush=True)
    if not args.no_record:
        path = write_outputs(run, meta)
        say(f"\nwrote {path.relative_to(REPO)} and appended to {RESULTS_MD.relative_to(REPO)}")
    return 1 if run.violations else 0


if __name__ == "__main__":
    sys.exit(main())
