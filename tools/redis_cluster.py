"""A local Redis Cluster (harness/redis_cluster.py) kept up until Ctrl-C, for trying the
service on a cluster by hand:

    python -m tools.redis_cluster [--masters N]
"""

from __future__ import annotations

import argparse
import contextlib
import time

from harness.redis_cluster import LocalRedisCluster, redis_server_path


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a local Redis Cluster until Ctrl-C.")
    parser.add_argument("--masters", type=int, default=3)
    args = parser.parse_args()
    if redis_server_path() is None:
        raise SystemExit("redis-server is not on PATH")
    with LocalRedisCluster(masters=args.masters) as cluster:
        print(f"REDIS_URL={cluster.url}", flush=True)
        for (first, last), index in sorted(cluster.slot_owners().items()):
            print(f"  slots {first}-{last}: master {index} ({cluster.nodes[index].address})")
        with contextlib.suppress(KeyboardInterrupt):
            while all(node.alive for node in cluster.nodes):
                time.sleep(0.5)


if __name__ == "__main__":
    main()
