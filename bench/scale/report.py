"""What `just bench-scale` prints."""

from __future__ import annotations

from typing import Any

from bench.phases import fmt_ms as ms
from bench.report import verdict_word
from bench.scale.database import ISSUE_ORDER
from bench.scale.export import export_facts, export_target
from bench.scale.paging import mib
from bench.scale.sellout import Run
from bench.state import commit_label

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
    if run.export:
        rows.append(export_target(run))
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
    paged = (
        f"page_size {meta['page_size']}, {meta['repeats']} fetches per page position; "
        if run.sellout or run.paging
        else ""
    )
    lines = [
        f"coupon bench-scale {meta['date']}  commit {commit_label(meta)}",
        f"{meta['cores']} cores, {meta['workers']} workers, {paged}busy before start: "
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
        lines += ["", "EXPLAIN (ANALYZE, BUFFERS) of the server's page query, custom plans:"]
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
