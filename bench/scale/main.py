"""`just bench-scale`: options, the run, its record."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import traceback
from typing import Any

from bench.generators import REPO, BenchBroke, ensure_wrk
from bench.scale.database import DB_NAME, REDIS_PREFIX, create_database, drop_database, migrate
from bench.scale.export import run_export
from bench.scale.paging import PAGE_SIZE, say
from bench.scale.report import report_lines, targets
from bench.scale.sellout import Run, run_paging, run_sellout
from bench.state import background_load, base_meta, delete_redis_keys, git_commit, write_run

PHASES = ("sellout", "paging", "export")


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
        default=",".join(PHASES),
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
        help="print only: no JSON under bench/results/",
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
        document = {
            **meta,
            "sellout": run.sellout,
            "paging": run.paging,
            "export": run.export,
            "targets": [{"target": n, "met": ok, "value": v} for n, ok, v in targets(run)],
        }
        path = write_run(document, "-scale")
        say(f"\nwrote {path.relative_to(REPO)} (ignored by git)")
    return 1 if run.violations else 0


if __name__ == "__main__":
    sys.exit(main())
