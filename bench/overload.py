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

and the targets of the flash-crowd issue, PASS or FAIL.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from bench.generators import BenchBroke, openloop_argv, pinned, run_generator
from bench.phases import Bench, measure
from bench.state import DATABASE_URL

FACTORS = (1, 2, 4)
# Targets (issue 15). Reported as PASS/FAIL; a miss never fails the run.
GOODPUT_KEPT = 0.9  # goodput at 4x over goodput at 1x
SUCCESS_P99_MS = 250.0
EXCESS_P99_MS = 20.0
SOLD_OUT_OVER_ISSUE = 3.0
HERD_ANSWERED_WITHIN_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("overload")
    group.add_argument("--overload-seconds", type=float, help="seconds per level (10; 3 quick)")
    group.add_argument(
        "--overload-connections", type=int, default=256, help="generator connections (256)"
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


# --- what the generator's results mean (pure) -------------------------------------------


@dataclass(frozen=True)
class Level:
    """One open-loop level, from bench/openloop.c's result."""

    factor: float
    offered_per_s: float
    goodput_per_s: float
    success_p50_ms: float | None
    success_p99_ms: float | None
    excess: int  # 503 `unavailable` answers
    excess_p99_ms: float | None
    sold_out: int
    other: int
    timeouts: int  # no answer within the time-out, in flight or still waiting to be sent
    connection_errors: int
    kept_up: bool

    @classmethod
    def from_result(cls, factor: float, offered: float, result: dict[str, Any]) -> Level:
        answers, latency = result["answers"], result["latency_ms"]
        window = float(result["duration_s"]) or 1.0
        return cls(
            factor=factor,
            offered_per_s=offered,
            goodput_per_s=int(answers["ok"]) / window,
            success_p50_ms=latency["ok"].get("p50"),
            success_p99_ms=latency["ok"].get("p99"),
            excess=int(answers["unavailable"]),
            excess_p99_ms=latency["unavailable"].get("p99"),
            sold_out=int(answers["sold_out"]),
            other=int(answers["other"]),
            timeouts=int(result["timeouts"]) + int(result["expired_in_queue"]),
            connection_errors=int(result["connection_errors"]) + int(result["connect_failures"]),
            kept_up=bool(result["kept_up"]),
        )


@dataclass(frozen=True)
class SoldOutRates:
    sold_out_after_s: float | None  # from the first answer's bucket to the sell-out
    issue_per_s: float | None
    sold_out_answers_per_s: float | None

    @property
    def ratio(self) -> float | None:
        if not self.issue_per_s or self.sold_out_answers_per_s is None:
            return None
        return self.sold_out_answers_per_s / self.issue_per_s


def sold_out_rates(timeline: dict[str, Any], stock: int) -> SoldOutRates:
    """From completions per bucket: the issue rate until the stock was gone (the bucket in
    which the last coupon was answered ends the selling), and the rate of sold-out answers
    in the whole buckets after it, up to the last bucket that answered anything."""
    bucket = float(timeline["bucket_s"])
    ok = list(timeline["ok"])
    sold = list(timeline["sold_out"])
    issued = 0
    end = None
    for index, count in enumerate(ok):
        issued += count
        if issued >= stock:
            end = index
            break
    if end is None:
        return SoldOutRates(None, None, None)
    first = next((i for i, n in enumerate(ok) if n), 0)
    selling_s = (end - first + 1) * bucket
    after = sold[end + 1 :]
    last = max((i for i, n in enumerate(after) if n), default=-1)
    after = after[: last + 1]
    rate = sum(after) / (len(after) * bucket) if after else None
    return SoldOutRates(selling_s, stock / selling_s, rate)


def targets(record: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """The flash-crowd targets: (target, met or None when not measured, measured value)."""
    rows: list[tuple[str, bool | None, str]] = []
    levels = {float(k): Level(**v) for k, v in record.get("levels", {}).items()}
    one, four = levels.get(1.0), levels.get(4.0)
    if one and four:
        kept = four.goodput_per_s / one.goodput_per_s if one.goodput_per_s else 0.0
        rows.append(
            (
                f"goodput at 4x >= {GOODPUT_KEPT:.0%} of 1x",
                kept >= GOODPUT_KEPT,
                f"{four.goodput_per_s:,.0f}/s vs {one.goodput_per_s:,.0f}/s ({kept:.0%})",
            )
        )
    if levels:
        worst = max((lv.success_p99_ms or float("inf")) for lv in levels.values())
        rows.append(
            (
                f"success p99 <= {SUCCESS_P99_MS:g} ms at every level",
                worst <= SUCCESS_P99_MS,
                ", ".join(f"{lv.factor:g}x {_ms(lv.success_p99_ms)}" for lv in levels.values()),
            )
        )
        lost = sum(lv.timeouts + lv.connection_errors for lv in levels.values())
        excess_p99 = [
            lv.excess_p99_ms for lv in levels.values() if lv.excess and lv.excess_p99_ms is not None
        ]
        worst_excess = max(excess_p99, default=None)
        rows.append(
            (
                f"every excess request answered (no time-out or connection error), "
                f"p99 <= {EXCESS_P99_MS:g} ms",
                lost == 0 and (worst_excess is None or worst_excess <= EXCESS_P99_MS),
                f"{lost} time-outs and connection errors; excess p99 "
                + (", ".join(f"{lv.factor:g}x {_ms(lv.excess_p99_ms)}" for lv in levels.values())),
            )
        )
    sold = record.get("sold_out")
    if sold:
        rates = SoldOutRates(**sold["rates"])
        rows.append(
            (
                f"sold-out answers >= {SOLD_OUT_OVER_ISSUE:g}x the issue rate",
                None if rates.ratio is None else rates.ratio >= SOLD_OUT_OVER_ISSUE,
                "-"
                if rates.ratio is None
                else f"{rates.sold_out_answers_per_s:,.0f}/s vs {rates.issue_per_s:,.0f}/s "
                f"({rates.ratio:.1f}x)",
            )
        )
    herd = record.get("herd")
    if herd:
        summary = herd.get("summary") or {}
        within = summary.get("answered_within_s", {}).get(f"{HERD_ANSWERED_WITHIN_S:g}")
        ok = (
            bool(herd.get("verified"))
            and bool(summary.get("sold_out"))
            and within is not None
            and within >= 1.0
        )
        rows.append(
            (
                f"herd of {herd['users']:,} on {herd['coupons']:,} coupons: sold out, I1-I6 "
                f"verified, every user answered within {HERD_ANSWERED_WITHIN_S:g} s",
                ok,
                f"sold out in {_s(summary.get('sell_out_s'))}; "
                f"{'verified' if herd.get('verified') else 'NOT verified'}; "
                + ("-" if within is None else f"{within:.1%} answered within 5 s"),
            )
        )
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


# --- the runs ----------------------------------------------------------------------------


def _openloop(
    bench: Bench, server_port: int, campaign: str, users: str, rate: float, seconds: float
) -> list[str]:
    args = bench.args
    return pinned(
        openloop_argv(
            server_port,
            campaign,
            bench.users(users),
            rate=rate,
            seconds=seconds,
            connections=args.overload_connections,
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
        saturation = int(result["answers"]["ok"]) / (float(result["duration_s"]) or 1.0)
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
                f"success p99 {_ms(level.success_p99_ms)}, {level.excess} excess (p99 "
                f"{_ms(level.excess_p99_ms)}), {level.timeouts} time-outs, "
                f"{level.connection_errors} connection errors; generator "
                f"{'kept up' if level.kept_up else 'FELL BEHIND'}",
                flush=True,
            )
        record["sold_out"] = sold_out_phase(bench, server.port, server.url, saturation)
        record["herd"] = herd_phase(bench, server.url)


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
        f"    sold out: {stock:,} coupons in {_s(rates.sold_out_after_s)} "
        f"({(rates.issue_per_s or 0):,.0f} issued/s), then "
        f"{(rates.sold_out_answers_per_s or 0):,.0f} sold-out answers/s",
        flush=True,
    )
    return {"stock": stock, "rates": rates.__dict__, "raw": _slim(result)}


def herd_phase(bench: Bench, url: str) -> dict[str, Any]:
    args = bench.args
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
    print(
        f"    herd: exit {done.returncode}; sold out in {_s(summary.get('sell_out_s'))}; "
        f"{'verified' if verified else 'NOT verified'}; chart {bench.log_dir / 'herd-report.png'}",
        flush=True,
    )
    return {
        "users": args.herd_users,
        "coupons": args.herd_coupons,
        "exit_code": done.returncode,
        "verified": verified,
        "summary": summary,
        "generator": document.get("generator"),
        "report": str(report),
    }


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
        f"{'offered':>14} {'goodput/s':>10} {'ok p50':>8} {'ok p99':>9} {'503s':>8} "
        f"{'503 p99':>9} {'time-outs':>9} {'conn err':>8} {'kept up':>7}",
    ]
    for level in (Level(**v) for v in record["levels"].values()):
        lines.append(
            f"{level.factor:>3g}x {level.offered_per_s:>8,.0f}/s {level.goodput_per_s:>10,.0f} "
            f"{_ms(level.success_p50_ms):>8} {_ms(level.success_p99_ms):>9} {level.excess:>8} "
            f"{_ms(level.excess_p99_ms):>9} {level.timeouts:>9} {level.connection_errors:>8} "
            f"{'yes' if level.kept_up else 'NO':>7}"
        )
    lines.append("overload targets (flash crowd):")
    lines += [
        f"  {'n/a' if ok is None else ('PASS' if ok else 'FAIL'):<4} {name}: {value}"
        for name, ok, value in targets(record)
    ]
    return lines
