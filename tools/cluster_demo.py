"""Two API instances on a local 3-master Redis Cluster: a short burst, then the proof.

`just cluster-demo` (or `python -m tools.cluster_demo`) starts a throwaway Redis Cluster
(harness/redis_cluster.py), a throwaway PostgreSQL database on the local server, and two
`coupon serve` instances against both; creates campaigns until every shard owns at least
one; drives IssueCoupon at both instances at once, through each campaign's start; then
checks I1-I5 per campaign from GetCampaign and from the database and prints a table. Then
a second round of campaigns, with a master SIGKILLed in the middle of it (`--kill-master
N`, 0 by default; `--no-kill` skips the round). Everything is torn down at the end; the
exit code is 1 on any violation.

The rounds and their checks are the harness's (harness/cluster.py), which
tests/cluster/test_cluster.py runs too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from coupon_loadtest.audit import duplicate_codes_anywhere
from harness.cluster import TOKEN, describe_failure, format_table, run_round
from harness.redis_cluster import LocalRedisCluster, redis_server_path
from harness.server import ServerProcess
from harness.services import drop_database, with_database

# -- the demo --------------------------------------------------------------------------


@contextlib.contextmanager
def servers(env: dict[str, str], count: int, log_dir: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        for _ in range(count):
            started.append(ServerProcess(env=env, workers=1, log_dir=log_dir))
        for server in started:
            server.wait_ready(timeout=60)
        yield started
    finally:
        for server in started:
            server.stop()


async def demo(args: argparse.Namespace) -> int:
    database_url = with_database(args.postgres, f"coupon_cluster_demo_{secrets.token_hex(4)}")
    from coupon.adapters.postgres.migrate import migrate

    failures = 0
    with (
        LocalRedisCluster(masters=3) as cluster,
        tempfile.TemporaryDirectory(prefix="coupon-cluster-demo-") as logs,
    ):
        print(f"Redis Cluster up: REDIS_URL={cluster.url}")
        for (first, last), index in sorted(cluster.slot_owners().items()):
            print(f"  m{index} {cluster.nodes[index].address}: slots {first}-{last}")
        try:
            await migrate(database_url)
            env = {
                "DATABASE_URL": database_url,
                "REDIS_URL": cluster.url,
                "COUPON_REDIS_PREFIX": "coupon-demo",
                "COUPON_ADMIN_TOKEN": TOKEN,
                # INFO, not quieter: readiness waits for each worker's "serving" line. The
                # logs go to files under the log directory, not to this terminal.
                "LOG_LEVEL": "INFO",
            }
            with servers(env, 2, Path(logs)) as instances:
                urls = [s.url for s in instances]
                print(f"2 instances: {', '.join(urls)}  (database {urlsplit(database_url).path})")
                pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
                assert pool is not None
                try:
                    burst = await run_round(
                        urls,
                        cluster,
                        pool,
                        title="burst",
                        total=args.total,
                        starts_in=2.0,
                        users=args.total * 3,
                        requests=args.total * 5,
                        concurrency=args.concurrency,
                    )
                    print(format_table(burst.checks, cluster))
                    failures += sum(bool(c.violations) for c in burst.checks)
                    if args.kill_master is not None:
                        failure = await run_round(
                            urls,
                            cluster,
                            pool,
                            title="failure",
                            total=args.total * 2,
                            starts_in=-1.0,
                            users=args.total * 3,
                            requests=args.total * 3,
                            concurrency=args.concurrency,
                            pace=0.01,
                            kill_master=args.kill_master,
                        )
                        print(format_table(failure.checks, cluster, dead=[args.kill_master]))
                        print(describe_failure(failure))
                        failures += sum(bool(c.violations) for c in failure.checks)
                    duplicates = await duplicate_codes_anywhere(pool)
                    print(f"\ncodes stored twice across all campaigns (I2): {duplicates}")
                    failures += bool(duplicates)
                finally:
                    await pool.close()
        finally:
            await drop_database(database_url, prefix="coupon_cluster_demo_")
    print("all invariants hold" if not failures else f"{failures} violation(s)")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server; a database coupon_cluster_demo_<random> is made and dropped",
    )
    parser.add_argument("--total", type=int, default=100, help="coupons per campaign")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients")
    parser.add_argument(
        "--kill-master",
        type=int,
        choices=[0, 1, 2],
        default=0,
        help="the master SIGKILLed in the middle of the second round (default 0)",
    )
    parser.add_argument(
        "--no-kill", action="store_true", help="only the first round: no master is killed"
    )
    args = parser.parse_args(argv)
    if args.no_kill:
        args.kill_master = None
    if redis_server_path() is None:
        print("cluster-demo: redis-server is not on PATH", file=sys.stderr)
        return 2
    return asyncio.run(demo(args))


if __name__ == "__main__":
    sys.exit(main())
