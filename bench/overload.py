"""The overload phase of `just bench`: far more requests than the server can take.

The server's capacity is made smaller than the generator's: `coupon serve --workers 1`
pinned to one CPU with `taskset -c` (its processes inherit it), every generator pinned to
the other. Then, on one server:

  saturation  closed loop (bench/openloop.c --rate 0) on a big campaign: the issue rate
              the pinned server sustains;
  1x, 2x, 4x  open loop at those multiples of it, latency from the intended send time, on
              a campaign whose stock never runs out (a new user per request): goodput,
              success p50/p99, excess answers (503 `unavailable`) and their p99, client
              time-outs and connection errors, and whether the generator kept up;
  sold out    closed loop on a small campaign until past its sell-out: the rate of
              sold-out answers against the issue rate of the same run;
  herd        `coupon loadtest --herd`: every user of a crowd presses at the start within
              a spread, honours the retry hint, gives up after a patience; time to
              sell-out, each user's time to a final answer, I1-I6 verified.

and the targets of the flash-crowd issue, PASS or FAIL (bench/figures.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime
from typing import Any

from bench.figures import (
    Level,
    fmt_ms,
    fmt_s,
    herd_cpu_text,
    issued_per_s,
    sold_out_rates,
    targets,
)
from bench.generators import BenchBroke, openloop_argv, pinned, run_generator
from bench.phases import Bench, measure
from bench.state import DATABASE_URL
from harness.procstat import CpuTrace, cpu_list
from harness.server import ServerProcess

FACTORS = (1, 2, 4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("overload")
    group.add_argument("--overload-seconds", type=float, help="seconds per level (10; 3 quick)")
    group.add_argument(
        "--overload-connections",
        type=int,
        default=4096,
        help="open-loop generator connections (4096): enough that the excess reaches the "
        "server rather than queueing in the generator",
    )
    group.add_argument(
        "--saturation-connections",
        type=int,
        default=256,
        help="closed-loop generator connections, saturation and sold-out (256)",
    )
    group.add_argument("--server-cpu", default="0", help="taskset -c list of the server (0)")
    group.add_argument("--generator-cpu", default="1", help="taskset -c list of generators (1)")
    group.add_argument("--sellout-coupons", type=int, help="sold-out phase stock (20000)")
    group.add_argument("--herd-users", type=int, help="users of the herd (100000; 20000 quick)")
    group.add_argument("--herd-coupons", type=int, help="stock of the herd (10000; 2000 quick)")
    group.add_argument(
        "--herd-processes", type=int, default=2, help="load tool processes of the herd (2)"
    )


def settle_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    quick = args.quick
    if args.overload_seconds is None:
        args.overload_seconds = 3.0 if quick else 10.0
    if args.sellout_coupons is None:
        args.sellout_coupons = 5_000 if quick else 20_000
    if args.herd_users is None:
        args.herd_users = 20_000 if quick else 100_000
    if args.herd_coupons is None:
        args.herd_coupons = 2_000 if quick else 10_000
    if args.overload_seconds <= 0 or args.overload_connections < 1:
        parser.error("--overload-seconds and --overload-connections must be positive")
    if min(args.sellout_coupons, args.herd_users, args.herd_coupons, args.herd_processes) < 1:
        parser.error("the sold-out and herd sizes must be at least 1")


# --- the runs ----------------------------------------------------------------------------


def _openloop(
    bench: Bench, server_port: int, campaign: str, users: str, rate: float, seconds: float
) -> list[str]:
    """The generator: open loop at `rate`, or closed loop (rate 0) on fewer connections (a
    closed loop on thousands of connections would measure how fast turned-away requests
    come back, not what the server sustains)."""
    args = bench.args
    connections = args.overload_connections if rate else args.saturation_connections
    return pinned(
        openloop_argv(
            server_port,
            campaign,
            bench.users(users),
            rate=rate,
            seconds=seconds,
            connections=connections,
            drain=10.0,
        ),
        args.generator_cpu,
    )


def run(bench: Bench) -> None:
    args = bench.args
    record: dict[str, Any] = {
        "server": f"coupon serve --workers 1, taskset -c {args.server_cpu}",
        "generator": f"taskset -c {args.generator_cpu}",
        "seconds_per_level": args.overload_seconds,
        "connections": args.overload_connections,
        "saturation_connections": args.saturation_connections,
    }
    bench.extra["overload"] = record
    print(
        f"  overload: 1 worker pinned to CPU {args.server_cpu} (taskset -c {args.server_cpu}), "
        f"generators pinned to CPU {args.generator_cpu} (taskset -c {args.generator_cpu})",
        flush=True,
    )
    seconds = args.overload_seconds
    with bench.coupon_server(workers=1, cpus=args.server_cpu) as server:
        big = bench.create_campaign(server.url, "overload")
        argv = _openloop(bench, server.port, big, "sat", 0, seconds)
        result, cores = measure(server, lambda: run_generator(argv, timeout=seconds + 60))
        bench.acks[big] = bench.acks.get(big, 0) + int(result["answers"]["ok"])
        saturation = issued_per_s(result)
        record["saturation"] = {"issued_per_s": saturation, "cores": cores, "raw": _slim(result)}
        print(f"    saturation (closed loop): {saturation:,.0f} issued/s", flush=True)
        if saturation < 1:
            raise BenchBroke("the pinned server issued nothing at saturation")
        record["levels"] = {}
        for factor in FACTORS:
            rate = saturation * factor
            argv = _openloop(bench, server.port, big, f"x{factor}", rate, seconds)

            def drive(argv: list[str] = argv) -> tuple[dict[str, Any], float]:
                return run_generator(argv, timeout=seconds + 90)

            result, cores = measure(server, drive)
            bench.acks[big] += int(result["answers"]["ok"])
            level = Level.from_result(factor, rate, result)
            record["levels"][str(factor)] = level.__dict__
            record.setdefault("raw_levels", {})[str(factor)] = {**_slim(result), "cores": cores}
            print(
                f"    {factor}x ({rate:,.0f}/s offered): goodput {level.goodput_per_s:,.0f}/s, "
                f"success p99 {fmt_ms(level.success_p99_ms)}, {level.excess} excess (p99 "
                f"{fmt_ms(level.excess_p99_ms)}), {level.timeouts} time-outs, "
                f"{level.connection_errors} connection errors; generator "
                f"{'kept up' if level.kept_up else 'FELL BEHIND'}",
                flush=True,
            )
        record["sold_out"] = sold_out_phase(bench, server.port, server.url, saturation)
        record["herd"] = herd_phase(bench, server)


def sold_out_phase(bench: Bench, port: int, url: str, saturation: float) -> dict[str, Any]:
    args = bench.args
    stock = args.sellout_coupons
    campaign = bench.create_campaign(url, "sold-out", total=stock)
    seconds = stock / saturation + args.overload_seconds
    argv = _openloop(bench, port, campaign, "sold", 0, seconds)
    result, _ = run_generator(argv, timeout=seconds + 60)
    bench.acks[campaign] = bench.acks.get(campaign, 0) + int(result["answers"]["ok"])
    rates = sold_out_rates(result["timeline"], stock)
    print(
        f"    sold out: {stock:,} coupons in {fmt_s(rates.sold_out_after_s)} "
        f"({(rates.issue_per_s or 0):,.0f} issued/s), then "
        f"{(rates.sold_out_answers_per_s or 0):,.0f} sold-out answers/s",
        flush=True,
    )
    return {"stock": stock, "rates": rates.__dict__, "raw": _slim(result)}


def herd_phase(bench: Bench, server: ServerProcess) -> dict[str, Any]:
    args = bench.args
    url = server.url
    report = bench.log_dir / "herd-report.json"
    argv = pinned(
        [
            sys.executable,
            "-m",
            "coupon_loadtest",
            "--url",
            url,
            "--admin-token",
            bench.env["COUPON_ADMIN_TOKEN"],
            "--herd",
            "--users",
            str(args.herd_users),
            "--coupons",
            str(args.herd_coupons),
            "--start-in",
            "3",
            "--spread",
            "1s",
            "--patience",
            "10s",
            "--processes",
            str(args.herd_processes),
            "--database-url",
            DATABASE_URL,
            "--report",
            str(report),
            "--chart",
            str(bench.log_dir / "herd-report.png"),
            "--quiet",
        ],
        args.generator_cpu,
    )
    print(f"    herd: {args.herd_users:,} users on {args.herd_coupons:,} coupons ...", flush=True)
    # The server's CPU and the load tool's core, sampled throughout: which of the two
    # bounded the herd is read over its window (from the start to the last user's end),
    # which only the report says.
    with CpuTrace(server.pids(), cpu_list(args.generator_cpu)) as trace:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if not report.exists():
        raise BenchBroke(
            f"the herd wrote no report (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    document = json.loads(report.read_text())
    campaign = document["target"]["campaign_id"]
    bench.campaigns["herd"] = campaign
    bench.acks[campaign] = int(document["outcomes"].get("ok_new", 0))
    summary = document.get("herd") or {}
    verified = bool(document["verification"]["passed"])
    cpu = herd_cpu(trace, document.get("timeline") or {})
    print(
        f"    herd: exit {done.returncode}; sold out in {fmt_s(summary.get('sell_out_s'))}; "
        f"{'verified' if verified else 'NOT verified'}; chart {bench.log_dir / 'herd-report.png'}",
        flush=True,
    )
    if cpu is not None:
        print(f"    herd: {herd_cpu_text(cpu)}", flush=True)
    return {
        "users": args.herd_users,
        "coupons": args.herd_coupons,
        "exit_code": done.returncode,
        "verified": verified,
        "summary": summary,
        "generator": document.get("generator"),
        "cpu": cpu,
        "report": str(report),
    }


def herd_cpu(trace: CpuTrace, timeline: dict[str, Any]) -> dict[str, float] | None:
    """The server's cores and the load tool's core busy share from the herd's start to the
    end of its last user (the report's `starts_at` and `load_stopped_at`)."""
    try:
        start = datetime.fromisoformat(timeline["starts_at"]).timestamp()
        end = datetime.fromisoformat(timeline["load_stopped_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None
    used = trace.between(start, end)
    if used is None:
        return None
    return {"window_s": end - start, "server_cores": used[0], "generator_busy": used[1]}


def _slim(result: dict[str, Any]) -> dict[str, Any]:
    """A generator's result without its histograms' buckets (kept in the timeline)."""
    out = dict(result)
    out["latency_ms"] = {
        k: {n: v for n, v in h.items() if n != "buckets_us"}
        for k, h in result["latency_ms"].items()
    }
    return out


def herd_verified(bench: Bench) -> bool | None:
    herd = bench.extra.get("overload", {}).get("herd")
    return None if herd is None else bool(herd["verified"])


def report_lines(bench: Bench) -> list[str]:
    record = bench.extra.get("overload")
    if not record or "levels" not in record:
        return []
    lines = [
        "",
        f"overload: server {record['server']}; generators {record['generator']}; "
        f"saturation (closed loop) {record['saturation']['issued_per_s']:,.0f} issued/s",
        "",
        f"{'offered':>14} {'goodput/s':>10} {'ok p50':>11} {'ok p99':>11} {'503s':>8} "
        f"{'503 p99':>11} {'time-outs':>9} {'conn err':>8} {'kept up':>7}",
    ]
    for level in (Level(**v) for v in record["levels"].values()):
        lines.append(
            f"{level.factor:>3g}x {level.offered_per_s:>8,.0f}/s {level.goodput_per_s:>10,.0f} "
            f"{fmt_ms(level.success_p50_ms):>11} {fmt_ms(level.success_p99_ms):>11} "
            f"{level.excess:>8} {fmt_ms(level.excess_p99_ms):>11} {level.timeouts:>9} "
            f"{level.connection_errors:>8} "
            f"{'yes' if level.kept_up else 'NO':>7}"
        )
    lines.append("overload targets (flash crowd):")
    lines += [
        f"  {'n/a' if ok is None else ('PASS' if ok else 'FAIL'):<4} {name}: {value}"
        for name, ok, value in targets(record)
    ]
    return lines
