"""`coupon loadtest`: drive a first-come-first-served burst or a flash crowd at a server
and verify it.

Exit codes: 0 every check passed and the asked rate was offered; 1 an invariant was
violated; 2 the run could not be set up (bad option, server unreachable, wrong token);
3 the generator could not offer the asked rate; 4 the issued coupons could not be read
back after the load (the report holds the clients' checks); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import uvloop

from coupon.entrypoints.output_path import cannot_write
from coupon.entrypoints.reach import add_cacert_argument, read_ca_file, url_problem
from coupon.entrypoints.settings import SettingsError, client_url, read_dotenv, redacted
from coupon_loadtest import chart, report
from coupon_loadtest.herd import answered_ns
from coupon_loadtest.runner import Console, RunData, execute
from coupon_loadtest.scenario import LoadConfig, SetupError
from coupon_loadtest.verify import verify

NS_PER_S = 1_000_000_000
DEFAULT_RATE = 1000.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every loadtest option to a (sub)parser."""
    target = parser.add_argument_group("target")
    target.add_argument(
        "--url",
        default=None,
        help="server base URL (default: $COUPON_URL, else http://127.0.0.1:$PORT, else "
        "http://127.0.0.1:8000)",
    )
    target.add_argument(
        "--admin-token",
        default=None,
        help="token for CreateCampaign/GetCampaign (default: $COUPON_ADMIN_TOKEN)",
    )
    add_cacert_argument(target)
    target.add_argument(
        "--campaign-id",
        default=None,
        help="load an existing campaign instead of creating one (this tool must be its only "
        "client during the run)",
    )
    target.add_argument(
        "--database-url",
        default=None,
        help="also verify from PostgreSQL directly (postgresql://...)",
    )

    scenario = parser.add_argument_group("scenario")
    scenario.add_argument(
        "--coupons",
        type=int,
        default=None,
        help="stock N of the campaign created (default 1000; not with --campaign-id)",
    )
    scenario.add_argument(
        "--users", type=int, default=3000, help="distinct users U, may exceed N (default 3000)"
    )
    scenario.add_argument(
        "--start-in",
        type=float,
        default=None,
        help="seconds from creation to starts_at, by the service's clock; load begins at "
        "once, to probe early issuance (default 3; not with --campaign-id)",
    )
    scenario.add_argument(
        "--repeat-fraction",
        type=float,
        default=None,
        help="share of requests that are retries by a user who already asked (default 0.1; "
        "not with --herd)",
    )
    scenario.add_argument(
        "--name",
        default=None,
        help="campaign name (default 'loadtest <time>'; not with --campaign-id)",
    )
    scenario.add_argument("--seed", type=int, default=0, help="seed of the user choice (default 0)")

    load = parser.add_argument_group("load")
    model = load.add_mutually_exclusive_group()
    model.add_argument(
        "--rate",
        type=float,
        default=None,
        help=f"open loop: requests per second over all processes (default {DEFAULT_RATE:g})",
    )
    model.add_argument(
        "--concurrency", type=int, default=None, help="closed loop: virtual users in flight"
    )
    model.add_argument(
        "--herd",
        action="store_true",
        help="flash crowd: every one of --users presses once at the start (within --spread), "
        "presses again as the server hints, gives up after --patience",
    )
    load.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of load from its start (default: until sold out, every user served or "
        "the campaign ended, plus --tail; not with --herd)",
    )
    load.add_argument(
        "--tail",
        type=float,
        default=None,
        help="seconds of load after sell-out or the campaign's end (default 2; not with --herd)",
    )
    load.add_argument(
        "--max-duration",
        type=float,
        default=None,
        help="stop after this many seconds even if never sold out (default 120; not with --herd)",
    )
    load.add_argument(
        "--processes",
        type=int,
        default=None,
        help="load-generating processes (default: min(4, CPUs))",
    )
    load.add_argument("--json", action="store_true", help="Connect JSON instead of binary protobuf")
    load.add_argument(
        "--timeout", type=float, default=10.0, help="per-request timeout, seconds (default 10)"
    )
    load.add_argument(
        "--max-inflight",
        type=int,
        default=None,
        help="open loop: requests in flight per process before sends wait (default 2000)",
    )
    load.add_argument(
        "--max-lag",
        type=float,
        default=None,
        help="open loop: allowed p99 send lag behind schedule, ms (default 50)",
    )

    herd = parser.add_argument_group("herd (with --herd)")
    herd.add_argument(
        "--spread",
        type=duration,
        default=None,
        help="users press at the start plus a random offset up to this (default 1s)",
    )
    herd.add_argument(
        "--patience",
        type=duration,
        default=None,
        help="a user gives up this long after their first press (default 10s)",
    )
    herd.add_argument(
        "--retry-floor",
        type=duration,
        default=None,
        help="least delay before pressing again (default 50ms)",
    )
    herd.add_argument(
        "--retry-cap",
        type=duration,
        default=None,
        help="most delay before pressing again, whatever the hint (default 2s)",
    )
    herd.add_argument(
        "--connections",
        type=int,
        default=None,
        help="keep-alive connections over all processes (default 512)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--report", default="loadtest-report.json", help="JSON report path (default %(default)s)"
    )
    output.add_argument(
        "--chart",
        default="loadtest-report.png",
        help="PNG chart path (default %(default)s)",
    )
    output.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    output.add_argument(
        "--quiet", action="store_true", help="no progress or phase messages, only the summary"
    )


def duration(text: str) -> float:
    """Seconds from '1s', '500ms' or a plain number of seconds."""
    value = text.strip().lower()
    scale = 1.0
    if value.endswith("ms"):
        value, scale = value[:-2], 0.001
    elif value.endswith("s"):
        value = value[:-1]
    try:
        seconds = float(value) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 1s, 500ms)") from None
    # Its range (finite, not negative, not rounding to 0 ns where it must be positive) is
    # checked with the other options', in config_from_args: one line for every mistake.
    return seconds


# Longest time any option may ask for: a week, far beyond any run, and far within the
# 64-bit nanoseconds the tool counts in.
MAX_SECONDS = 7 * 86_400.0
MAX_RATE = 10_000_000.0


def _out_of_range(
    option: str,
    value: float | None,
    *,
    high: float,
    zero: bool = False,
    ns: bool = False,
    unit: str = "seconds",
) -> str | None:
    """Why `value` is not a finite number in (0, high] ([0, high] when `zero`), or, with
    `ns`, a time that rounds to 0 ns while it must be positive; None when it is fine."""
    if value is None:
        return None
    low = "0 or more" if zero else "more than 0"
    if not math.isfinite(value) or not (value >= 0 if zero else value > 0) or value > high:
        return f"{option} must be a number of {unit} {low} and at most {high:g} (got {value!r})"
    if ns and not zero and round(value * NS_PER_S) <= 0:
        return f"{option} must be at least 1 ns (got {value!r} s)"
    return None


# Options that one kind of run only reads, with their defaults: given to another kind of
# run, they would be silently ignored, so they are refused instead.
CREATE_ONLY = {"coupons": 1000, "start_in": 3.0, "name": None}
BURST_ONLY = {"repeat_fraction": 0.1, "duration": None, "tail": 2.0, "max_duration": 120.0}
OPEN_LOOP_ONLY = {"max_inflight": 2000, "max_lag": 50.0}
HERD_ONLY = {
    "spread": 1.0,
    "patience": 10.0,
    "retry_floor": 0.05,
    "retry_cap": 2.0,
    "connections": 512,
}


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _misplaced(args: argparse.Namespace) -> list[str]:
    """Options given to a run that would not read them, each named; then the defaults of
    those not given are filled in."""
    problems: list[str] = []

    def refuse(options: Mapping[str, object], why: str) -> None:
        for dest in options:
            if getattr(args, dest) is not None:
                problems.append(f"{_option(dest)} {why}")

    if args.campaign_id is not None:
        refuse(CREATE_ONLY, "is for a campaign the tool creates, not with --campaign-id")
    if args.herd:
        refuse(BURST_ONLY, "is for a burst (--rate or --concurrency), not with --herd")
        refuse(OPEN_LOOP_ONLY, "is for the open loop (--rate), not with --herd")
    else:
        refuse(HERD_ONLY, "is only for --herd")
        if args.concurrency is not None:
            refuse(OPEN_LOOP_ONLY, "is for the open loop (--rate), not with --concurrency")
    for options in (CREATE_ONLY, BURST_ONLY, OPEN_LOOP_ONLY, HERD_ONLY):
        for dest, default in options.items():
            if getattr(args, dest) is None:
                setattr(args, dest, default)
    return problems


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> LoadConfig:
    """`environ`: where COUPON_URL, COUPON_ADMIN_TOKEN and COUPON_CA_FILE are read (default
    os.environ)."""
    env = os.environ if environ is None else environ
    problems: list[str] = _misplaced(args)
    # As the operators' command line: the option, else COUPON_URL, else the default.
    try:
        url = args.url or client_url(env)
    except SettingsError as exc:
        problems.append(str(exc))
        url = ""
    if args.coupons < 1 and args.campaign_id is None:
        problems.append("--coupons must be at least 1")
    if args.users < 1:
        problems.append("--users must be at least 1")
    if not 0.0 <= args.repeat_fraction <= 1.0:
        problems.append("--repeat-fraction must be between 0 and 1")
    if args.concurrency is not None and args.concurrency < 1:
        problems.append("--concurrency must be at least 1")
    if args.max_inflight < 1:
        problems.append("--max-inflight must be at least 1")
    if args.processes is not None and args.processes < 1:
        problems.append("--processes must be at least 1")
    # Every number of seconds (or of a rate) is finite and within range, and a time that
    # must be positive stays so once rounded to the nanoseconds the tool counts in.
    ranges = [
        _out_of_range("--start-in", args.start_in, high=MAX_SECONDS, zero=True),
        _out_of_range("--rate", args.rate, high=MAX_RATE, unit="requests per second"),
        _out_of_range("--duration", args.duration, high=MAX_SECONDS, ns=True),
        _out_of_range("--tail", args.tail, high=MAX_SECONDS, zero=True),
        _out_of_range("--max-duration", args.max_duration, high=MAX_SECONDS, ns=True),
        _out_of_range("--timeout", args.timeout, high=600.0, ns=True),
        _out_of_range("--max-lag", args.max_lag, high=MAX_SECONDS * 1000, unit="ms"),
        _out_of_range("--spread", args.spread, high=MAX_SECONDS, zero=True),
        _out_of_range("--patience", args.patience, high=MAX_SECONDS, ns=True),
        _out_of_range("--retry-floor", args.retry_floor, high=MAX_SECONDS, ns=True),
        _out_of_range("--retry-cap", args.retry_cap, high=MAX_SECONDS, ns=True),
    ]
    problems += [problem for problem in ranges if problem is not None]
    if args.herd:
        floor, cap = args.retry_floor, args.retry_cap
        if math.isfinite(floor) and math.isfinite(cap) and floor > cap:
            problems.append("--retry-floor must be at most --retry-cap")
        if args.connections < 1:
            problems.append("--connections must be at least 1")
    if args.database_url is not None and not args.database_url.startswith(
        ("postgresql://", "postgres://")
    ):
        problems.append(
            f"--database-url must start with postgresql:// (got {redacted(args.database_url)!r})"
        )
    # As the operators' command line: a URL no call can use is refused before any.
    bad_url = url_problem(url, "--url" if args.url else "COUPON_URL") if url else None
    if bad_url is not None:
        problems.append(bad_url)
    # As the operators' command line: the option, else COUPON_CA_FILE, else the system's.
    ca_file = args.cacert or env.get("COUPON_CA_FILE", "")
    if ca_file:
        try:
            read_ca_file(ca_file, "--cacert" if args.cacert else "COUPON_CA_FILE")
        except ValueError as exc:
            problems.append(str(exc))
    if not args.no_chart:
        # The chart is a PNG, written where asked: a name that says otherwise would be
        # written under another name (matplotlib adds .png) or in another format.
        if not args.chart.lower().endswith(".png"):
            problems.append(f"--chart must name a .png file (got {args.chart!r})")
        elif Path(args.chart).resolve() == Path(args.report).resolve():
            problems.append(f"--report and --chart are the same file ({args.report!r})")
    # Written after the run: a folder that is not there is found now, before any load.
    outputs = {"--report": args.report} | ({} if args.no_chart else {"--chart": args.chart})
    for option, path in outputs.items():
        unwritable = cannot_write(Path(path))
        if unwritable is not None:
            problems.append(f"{option}: {unwritable}")
    if problems:
        raise SetupError("; ".join(problems))
    processes = args.processes or min(4, os.cpu_count() or 1)
    # Every process owns a share of the users and of the virtual users: none may be empty.
    processes = min(processes, args.users, args.concurrency or processes)
    if args.herd:
        processes = min(processes, args.connections)
    chosen = args.rate is not None or args.concurrency is not None or args.herd
    rate = args.rate if chosen else DEFAULT_RATE
    admin_token = args.admin_token
    if admin_token is None:
        admin_token = env.get("COUPON_ADMIN_TOKEN", "")
    return LoadConfig(
        url=url.rstrip("/"),
        coupons=args.coupons,
        users=args.users,
        start_in_s=args.start_in,
        campaign_id=args.campaign_id,
        rate=rate,
        concurrency=args.concurrency,
        duration_s=args.duration,
        tail_s=args.tail,
        max_duration_s=args.max_duration,
        processes=processes,
        json=args.json,
        admin_token=admin_token,
        database_url=args.database_url,
        report_path=args.report,
        chart_path=None if args.no_chart else args.chart,
        quiet=args.quiet,
        repeat_fraction=args.repeat_fraction,
        timeout_s=args.timeout,
        max_inflight=args.max_inflight,
        max_lag_ms=args.max_lag,
        seed=args.seed,
        name=args.name or f"loadtest {time.strftime('%Y-%m-%d %H:%M:%S')}",
        herd=args.herd,
        spread_s=args.spread,
        patience_s=args.patience,
        retry_floor_s=args.retry_floor,
        retry_cap_s=args.retry_cap,
        connections=args.connections,
        ca_file=ca_file or None,
    )


def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Run a load test from parsed options; returns the exit code. `environ`: as for
    `config_from_args`."""
    try:
        config = config_from_args(args, environ)
    except SetupError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return report.EXIT_SETUP
    console = Console(quiet=config.quiet)
    try:
        data = uvloop.run(execute(config, console))
    except SetupError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return report.EXIT_SETUP
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("loadtest: interrupted", file=sys.stderr)
        return report.EXIT_INTERRUPTED

    target = data.target
    verification = verify(data.observations, target.plan, target.clock, data.ledgers, data.unread)
    generator = report.generator_verdict(data)
    verdict = report.decide(
        verification, generator, interrupted=data.interrupted, requests=len(data.observations)
    )
    # starts_at in the client's clock, after the load start: where t = 0 is on the chart.
    starts_rel = target.plan.starts_at_ns - target.clock.offset_ns - data.t0_wall_ns
    timeline = chart.series(data.observations, starts_rel)
    chart_path = _draw(data, timeline, starts_rel, verdict, console)
    document = report.build(data, verification, generator, verdict, timeline, chart_path)
    report_path = Path(config.report_path)
    report_path.write_text(json.dumps(document, indent=2, ensure_ascii=False))
    print(report.summary_text(document))
    console.info(f"report: {config.report_path}" + (f", chart: {chart_path}" if chart_path else ""))
    return verdict.exit_code


def _draw(
    data: RunData,
    timeline: chart.Series,
    starts_rel: int,
    verdict: report.Verdict,
    console: Console,
) -> str | None:
    config = data.config
    if config.chart_path is None:
        return None
    markers = {"starts_at": 0.0}
    sold_out = report.first_sold_out_rel(data)
    if sold_out is not None:
        markers["first sold-out answer"] = (sold_out - starts_rel) / NS_PER_S
    elif data.settled_rel_ns is not None:
        markers[data.settled_by or "every user served"] = (
            data.settled_rel_ns - starts_rel
        ) / NS_PER_S
    markers["load stopped"] = (data.stop_rel_ns - starts_rel) / NS_PER_S
    if config.herd:
        load = f"herd, spread {config.spread_s:g} s, patience {config.patience_s:g} s"
    elif config.open_loop:
        load = f"{config.rate:g}/s open loop"
    else:
        load = f"{config.concurrency} in flight"
    title = (
        f"{data.target.plan.stock} coupons, {config.users} users, {load}, "
        f"{config.processes} processes — {'PASSED' if verdict.passed else 'FAILED'}"
    )
    answers = None
    if data.herd is not None:
        # Every answer (as the summary counts them), in seconds after the start; users
        # never answered keep the curve below 1.
        answers = [(t - starts_rel) / NS_PER_S for t in answered_ns(data.herd)]
    try:
        chart.draw(
            timeline,
            config.chart_path,
            title=title,
            markers=markers,
            answers_s=answers,
            crowd=config.users,
        )
    except Exception as exc:  # noqa: BLE001 - a chart is not worth losing the report over
        console.info(f"could not draw the chart: {type(exc).__name__}: {exc}")
        return None
    return config.chart_path


def main(argv: list[str] | None = None, prog: str = "coupon-loadtest") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Drive a first-come-first-served burst (or, with --herd, a flash crowd) "
        "at a coupon server, then verify that it issued exactly the stock: never more, never "
        "a duplicate, never early, at most one per user, every acknowledged coupon recorded.",
        epilog="Exit codes: 0 passed; 1 invariant violated; 2 setup failed; 3 asked rate not "
        "offered; 4 issued coupons not read back; 130 interrupted.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    # As `coupon campaigns` and `coupon serve`: COUPON_URL and COUPON_ADMIN_TOKEN from the
    # environment, else from ./.env (the same file, read the same way).
    try:
        dotenv = read_dotenv(Path(".env"))
    except SettingsError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return report.EXIT_SETUP
    return run(args, {**dotenv, **os.environ})
