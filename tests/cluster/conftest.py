"""A local 3-master Redis Cluster (harness/redis_cluster.py) for the tests in this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.redis_cluster import LocalRedisCluster, redis_server_path

needs_redis_server = pytest.mark.skipif(
    redis_server_path() is None,
    reason="redis-server is not on PATH: the Redis Cluster tests start their own cluster",
)


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A fresh cluster per test module; a test that kills a node starts its own."""
    if redis_server_path() is None:
        pytest.skip("redis-server is not on PATH: the Redis Cluster tests start their own cluster")
    with LocalRedisCluster(masters=3) as cluster:
        yield cluster
