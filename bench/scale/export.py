"""The export of `just bench-scale`: a campaign of --export-rows (10,000,000) coupons filled
with SQL, then streamed whole through ExportCoupons from a fresh server while the RSS of
every server process is sampled: rows/s, and memory that stays flat whatever the size."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from bench.generators import BenchBroke
from bench.scale.database import CODE_MULTIPLIER, CODE_SPACE, DATABASE_URL, FILL_CAMPAIGNS
from bench.scale.paging import say
from bench.scale.sellout import Run, Sampler, server_processes
from coupon.gen.coupon.v1 import coupon_pb
from harness.procstat import memory_mib

EXPORT_COUPONS = "/coupon.v1.CouponService/ExportCoupons"
# A flat export: server RSS growth from before the export to its peak, all processes.
TARGET_EXPORT_GROWTH_MIB = 64.0
# Twice a second: an export of 100,000 rows lasts about a second.
SAMPLE_INTERVAL_S = 0.5

# One campaign's coupons, slots $4..$5, in slot order (so id order is slot order); codes 'E'
# and 9 hex digits, apart from the paging fill's 'S' codes.
EXPORT_FILL = f"""
INSERT INTO coupons (campaign_id, total_coupons, starts_at, ends_at, slot, code, user_id,
                     issued_at)
SELECT $1::uuid, $2::bigint, $3::timestamptz, 'infinity', s,
       'E' || lpad(to_hex((s * {CODE_MULTIPLIER}) % {CODE_SPACE}), 9, '0'),
       'export-' || s, $3::timestamptz + s * interval '1 microsecond'
  FROM generate_series($4::bigint, $5::bigint) AS s
"""
EXPORT_FILL_CHUNK = 1_000_000

# Connect streaming: each message is a flags byte, a 4-byte big-endian length and the
# message; the last one, flagged end-of-stream, is JSON carrying the error if any.
ENVELOPE_HEADER = 5
END_STREAM = 0x02


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


class Envelopes:
    """Connect streaming envelopes out of a byte stream cut anywhere."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """(flags, message) of every envelope `data` completes."""
        self._buffer += data
        while len(self._buffer) >= ENVELOPE_HEADER:
            size = int.from_bytes(self._buffer[1:ENVELOPE_HEADER], "big")
            if len(self._buffer) < ENVELOPE_HEADER + size:
                return
            flags = self._buffer[0]
            message = bytes(self._buffer[ENVELOPE_HEADER : ENVELOPE_HEADER + size])
            del self._buffer[: ENVELOPE_HEADER + size]
            yield flags, message

    @property
    def pending(self) -> int:
        """Bytes of an envelope not complete yet: none once a stream has ended cleanly."""
        return len(self._buffer)


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
    end: bytes | None = None
    envelopes = Envelopes()
    cpu = time.thread_time()
    started = time.perf_counter()
    first_at: float | None = None
    with (
        httpx.Client(timeout=None) as client,
        client.stream("POST", url + EXPORT_COUPONS, content=body, headers=headers) as response,
    ):
        if response.status_code != 200:
            response.read()
            raise BenchBroke(f"ExportCoupons: HTTP {response.status_code} {response.text[:300]}")
        for data in response.iter_raw(1 << 16):
            for flags, payload in envelopes.feed(data):
                if flags & END_STREAM:
                    end = payload
                    continue
                message = coupon_pb.ExportCouponsResponse.from_binary(payload)
                if first_at is None:
                    first_at = time.perf_counter() - started
                messages += 1
                for coupon in message.coupons:
                    received += 1
                    out_of_order += coupon.user_id != f"export-{received}"
    seconds = time.perf_counter() - started
    if end is None:
        error: Any = f"no end of stream ({envelopes.pending} bytes of a message left over)"
    else:
        error = json.loads(end or b"{}").get("error")
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


def rss_during(
    pids: dict[int, str],
    samples: list[dict[str, Any]],
    started: int,
    hwm_before: Mapping[int, float | None],
    hwm_after: Mapping[int, float | None],
) -> tuple[dict[str, dict[str, Any]], float]:
    """Per process: RSS in the last sample before the export (index `started`), its peak
    during the export and at the end; and the growth before -> peak over all processes.

    A peak between two samples is caught by VmHWM: if the high-water mark rose during the
    export, the process's peak during the export is the new mark."""
    processes: dict[str, dict[str, Any]] = {}
    growth = 0.0
    for pid, role in pids.items():
        series = [s["rss"].get(str(pid)) for s in samples]
        before = series[started] if 0 <= started < len(series) else None
        during = [v for v in series[started + 1 :] if v is not None]
        peak = max(during, default=None)
        hwm0, hwm1 = hwm_before.get(pid), hwm_after.get(pid)
        if hwm0 is not None and hwm1 is not None and hwm1 > hwm0:
            peak = hwm1 if peak is None else max(peak, hwm1)
        processes[str(pid)] = {
            "role": role,
            "before": before,
            "peak": peak,
            "end": during[-1] if during else None,
            "hwm_before": hwm0,
            "hwm_after": hwm1,
        }
        if before is not None and peak is not None:
            growth += peak - before
    return processes, growth


def high_water_marks(pids: dict[int, str]) -> dict[int, float | None]:
    return {pid: memory_mib(pid).get("peak") for pid in pids}


async def run_export(run: Run) -> None:
    rows = run.args.export_rows
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        say(f"export: filling a campaign of {rows:,} coupons ...")
        campaign_id, fill_seconds = await fill_export_campaign(conn, rows)
    finally:
        await conn.close()
    server = run.server("export")
    sampler_conn = await asyncpg.connect(DATABASE_URL)
    sampler_task: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(server.wait_ready)
        pids = server_processes(server)
        sampler = Sampler(sampler_conn, campaign_id, pids, interval=SAMPLE_INTERVAL_S)
        sampler_task = asyncio.create_task(sampler.run())
        await asyncio.sleep(1.0)  # a few samples before the export
        sampler.mark("export_start")
        hwm_before = high_water_marks(pids)
        say(f"  ExportCoupons of {campaign_id} from a fresh server on port {server.port} ...")
        streamed = await asyncio.to_thread(stream_export, server.url, run.token, campaign_id, rows)
        sampler.stop()
        await sampler_task
        # At least one sample after, however short the export (the sampler's connection is
        # free again once its task is done).
        await sampler.take()
        hwm_after = high_water_marks(pids)
    finally:
        if sampler_task is not None and not sampler_task.done():
            sampler_task.cancel()
        await sampler_conn.close()
        await asyncio.to_thread(server.stop)
    processes, growth = rss_during(
        pids, sampler.samples, sampler.marks["export_start"], hwm_before, hwm_after
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
        "rss_samples": sampler.samples,
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
        f"server RSS (sampled every {SAMPLE_INTERVAL_S:g} s; VmHWM where it rose): {each}; "
        f"growth {e['rss_growth_mib']:+.1f} MiB",
    ]


def export_target(run: Run) -> tuple[str, bool | None, str]:
    e = run.export
    return (
        f"ExportCoupons of {e['rows']:,} coupons: all, in issue order, server RSS "
        f"growth <= {TARGET_EXPORT_GROWTH_MIB:g} MiB",
        e["complete"] and e["rss_growth_mib"] <= TARGET_EXPORT_GROWTH_MIB,
        f"{e['rows_per_s']:,.0f} rows/s, RSS {e['rss_growth_mib']:+.1f} MiB",
    )
