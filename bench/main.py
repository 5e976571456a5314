"""`just bench`: how fast is IssueCoupon, against what ceilings, how does it behave when far
more arrive than it can take, and does it stay correct?

One run measures, each on servers started here on free loopback ports:

  (a1) the first ceiling: the generated Connect application answering IssueCoupon with a
       constant (bench/noop_app.py --dispatch connect), at saturation, with wrk;
  (a2) the second ceiling: a constant answered behind the same fast dispatch the real
       IssueCoupon takes (`CouponApp` -> `FastIssue`), at saturation, with wrk;
  (b)  IssueCoupon on a fresh 10,000,000-coupon campaign, a new user per request, at
       saturation, with wrk (bench/issue.lua);
  (a1') and (a2') both ceilings again, right after (b), at their first runs' connection
       counts: (b) over a ceiling is taken against the mean of its two runs, so that a
       machine whose speed drifts during the run (a VM's does, by a third within minutes)
       moves both sides of the ratio alike;
  (c)  IssueCoupon at a fixed offered rate (open loop, latency from the intended send
       time), with bench/openloop.c;
  overload: one worker pinned to one core, the generator to the other; the saturation
       rate, then open-loop offered load at 1x, 2x and 4x of it, the sold-out answers'
       rate, and a herd of users (bench/overload.py).

"At saturation" is the peak of throughput over the number of connections: before (a1),
(a2) and (b), short probes at each count of a ladder (64 to 1,024 wrk connections, then
halfway to the best count's neighbours, then the two best once more) find the count at
which that server answers most (bench/search.py), and the measured run uses it.
`--connections N` measures every phase at N instead.

Then it verifies I1-I4 (and "acknowledged <= stored") in PostgreSQL with the load tool's
auditor, prints one table (and the same as Markdown, for docs/performance.md) and writes
the run as JSON to bench/results/ (ignored by git). The CPU each party used (server
workers, load generator, PostgreSQL, Redis, anything else) is measured from /proc for every
phase, so the reader can see whether the generator was the limit.

Everything lives apart from a developer's data: the database `coupon_bench` (dropped at the
start of every run, so runs compare; `coupon serve` recreates it) and the Redis keys under
`coupon-bench:` (deleted with SCAN at the start and the end).

Exit status: 0 when the bench ran (missed targets are reported, not fatal), 1 when an
invariant was violated, 2 when the bench itself broke.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import overload
from bench.generators import REPO, BenchBroke, ensure_wrk, openloop_binary
from bench.phases import AGAIN, Bench
from bench.report import report_lines, run_document
from bench.state import (
    Verdict,
    allow_open_files,
    background_load,
    base_meta,
    bench_state,
    checkout_source,
    git_commit,
    new_token,
    server_env,
    verify,
    write_run,
)

PHASES = ("a", "b", "c", "overload")  # what --only takes; "a" is both ceilings
CONNECTION_LADDER = (64, 128, 256, 512, 1024)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="just bench",
        description="Measure IssueCoupon against two no-op ceilings, and under overload.",
    )
    parser.add_argument("--workers", type=int, default=2, help="server workers (default 2)")
    parser.add_argument("--duration", type=float, help="seconds per phase (default 30)")
    parser.add_argument(
        "--connections",
        default=",".join(map(str, CONNECTION_LADDER)),
        help="wrk connections: a comma-separated ladder, searched for each saturation "
        "phase's peak (default %(default)s), or one count to measure every phase at",
    )
    parser.add_argument(
        "--probe", type=float, help="seconds per step of the saturation search (5; 2 quick)"
    )
    parser.add_argument(
        "--only", default=",".join(PHASES), help="phases to run, e.g. 'b' or 'a,b' or 'overload'"
    )
    parser.add_argument("--quick", action="store_true", help="short phases, a smaller herd")
    parser.add_argument("--rate", type=float, default=1000, help="(c) requests/s (1000)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="wrk threads (cores)"
    )
    parser.add_argument("--warmup", type=float, help="seconds of unmeasured load first (3)")
    parser.add_argument(
        "--ref",
        help="bench the service as committed at this git revision (e.g. HEAD) instead of "
        "the working tree, which others may be editing",
    )
    parser.add_argument(
        "--generator-check",
        action="store_true",
        help="rerun (a1) for 10 s with half the wrk threads and twice the connections",
    )
    overload.add_arguments(parser)
    args = parser.parse_args(argv)
    args.only = sorted({p.strip() for p in args.only.split(",") if p.strip()})
    if not args.only or set(args.only) - set(PHASES):
        parser.error(f"--only takes a comma-separated subset of {','.join(PHASES)}")
    try:
        args.connections = sorted({int(c) for c in args.connections.split(",") if c.strip()})
    except ValueError:
        parser.error("--connections takes whole numbers, e.g. 128 or 64,128,256")
    if not args.connections or args.connections[0] < args.threads:
        parser.error("--connections: wrk needs at least one connection per thread")
    if args.duration is None:
        args.duration = 5.0 if args.quick else 30.0
    if args.probe is None:
        args.probe = 2.0 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 3.0
    overload.settle_arguments(args, parser)
    return args


def run_phases(bench: Bench) -> list[Verdict]:
    args = bench.args
    with bench_state(), ExitStack() as servers:
        ceilings = {}
        if "a" in args.only:
            for key in ("a1", "a2"):
                ceilings[key] = servers.enter_context(bench.ceiling_server(key))
                bench.run_ceiling(ceilings[key], key)
            if args.generator_check:
                bench.check_generator(ceilings["a1"])
        service = [key for key in ("b", "c") if key in args.only]
        if service:

            def again() -> None:
                # The no-op servers idled meanwhile, ready to measure right after (b).
                for key, server in ceilings.items():
                    bench.run_ceiling(server, AGAIN[key])

            bench.run_service(service, again if ceilings else None)
        servers.close()
        if "overload" in args.only:
            overload.run(bench)
        return asyncio.run(verify(bench.campaigns, bench.acks))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    allow_open_files(max(*args.connections, args.overload_connections, 1024))
    log_dir = Path(tempfile.mkdtemp(prefix="coupon-bench-"))
    source = None
    if args.ref:
        try:
            commit, source = checkout_source(args.ref, log_dir)
        except BenchBroke as exc:
            print(f"bench broke: {exc}", file=sys.stderr)
            return 2
        dirty = False
    else:
        commit, dirty = git_commit()
    meta: dict[str, Any] = {
        **base_meta("bench", argv, commit, dirty),
        "workers": args.workers,
        "duration": args.duration,
        "warmup": args.warmup,
        "threads": args.threads,
        "connections": args.connections,
        "rate": args.rate,
        "only": args.only,
        "source": f"git archive {commit}" if source else "working tree",
    }
    meta["background_cores"] = background_load()
    bench = Bench(args, server_env(source, new_token()), log_dir)
    print(
        f"coupon bench: phases {','.join(args.only)}; "
        f"service from {f'commit {commit}' if source else 'the working tree'}; "
        f"server logs in {log_dir}",
        flush=True,
    )
    if meta["background_cores"] > 0.2:
        print(
            f"warning: the machine was already busy ({meta['background_cores']:.2f} cores) "
            "before the bench started: the figures will be lower than on a quiet machine",
            flush=True,
        )
    try:
        if set(args.only) & {"a", "b"}:
            ensure_wrk()
        if set(args.only) & {"c", "overload"}:
            openloop_binary()
        verdicts = run_phases(bench)
    except BenchBroke as exc:
        print(f"\nbench broke: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - anything unexpected is a broken bench, say so
        traceback.print_exc()
        return 2
    lines = report_lines(bench, meta, verdicts)
    lines += overload.report_lines(bench)
    print("\n" + "\n".join(lines))
    path = write_run(run_document(bench, meta, verdicts))
    print(f"\nwrote {path.relative_to(REPO)} (ignored by git)")
    herd_ok = overload.herd_verified(bench)
    return 0 if all(v.ok for v in verdicts) and herd_ok is not False else 1
