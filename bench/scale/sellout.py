"""The sell-out of `just bench-scale` (a million coupons through wrk, the server's memory
sampled every second, I1-I4 audited), the paging at ten million rows, and the run they
share."""

from __future__ import annotations

import argparse
import asyncio
import signal
import tempfile
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench.generators import REPO, BenchBroke, bench_result, children_cpu_seconds, wrk_argv
from bench.phases import cpu_groups
from bench.scale.database import (
    DATABASE_URL,
    REDIS_PREFIX,
    campaign_place,
    explain_page,
    fill,
    server_page_query,
    table_sizes,
)
from bench.scale.paging import Pager, Target, mib, repeat_pages, say, target_rows, targets_of
from bench.state import background_load, post_campaign, server_env
from coupon.gen.coupon.v1 import coupon_pb
from coupon_loadtest import audit
from harness.procstat import CpuSnapshot, descendants, is_resource_tracker, memory_mib
from harness.server import ServerProcess


class Sampler:
    """Every `interval` seconds (one): the campaign's issued_count and the RSS of every
    server process."""

    def __init__(
        self,
        conn: asyncpg.Connection,
        campaign_id: str,
        pids: dict[int, str],
        interval: float = 1.0,
    ) -> None:
        self._conn = conn
        self._interval = interval
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
            tick += self._interval
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


def server_processes(server: ServerProcess) -> dict[int, str]:
    """The server's main process, its workers and multiprocessing's resource tracker, by role."""
    found = {server.process.pid: "main"}
    for pid in descendants(server.process.pid):
        if is_resource_tracker(pid):
            found[pid] = "resource tracker"
    for number, pid in enumerate(server.worker_pids(), 1):
        found[pid] = f"worker {number}"
    return found


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
        return {
            **server_env(None, self.token, DATABASE_URL),
            "COUPON_REDIS_PREFIX": REDIS_PREFIX,
        }

    def server(self, name: str) -> ServerProcess:
        return ServerProcess(
            env=self.env,
            workers=self.args.workers,
            name=name,
            log_dir=self.log_dir,
            inherit_env=True,
        )


async def drive_to_sellout(
    run: Run, server: ServerProcess, campaign_id: str, sampler: Sampler
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
    """I1-I4 of the campaign, sold out, every acknowledged coupon stored: the load tool's
    auditor, in PostgreSQL."""
    found = await audit.audit_campaign(conn, campaign_id, acknowledged=acked)
    checks: list[dict[str, Any]] = [f.__dict__ for f in found.findings(sold_out=True)]
    span = found.sell_out_span_s
    checks.append(
        {
            "name": "sell-out span",
            "rule": "(issued_at of the last coupon - of the first)",
            "ok": True,
            "detail": "-" if span is None else f"{span:.1f} s",
            "seconds": span,
        }
    )
    return checks


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
    say(f"sell-out of {args.coupons:,} coupons, {args.workers} workers ...")
    server = run.server("sellout")
    await asyncio.to_thread(server.wait_ready)
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
        await asyncio.to_thread(server.wait_ready)
        query: str | None = None
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
                query = await server_page_query(conn)
            finally:
                pager.close()
        finally:
            await asyncio.to_thread(server.stop)
        explains = []
        if query is None:
            say("  the server's page query was not seen in pg_stat_activity: no EXPLAIN")
        else:
            say("  EXPLAIN (ANALYZE, BUFFERS) of every measured page ...")
            for target in targets:
                explained = await explain_page(
                    conn, query, target.campaign_id, target.page_number, args.page_size
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
