"""Start-up against Redis Cluster: a URL that names one of its nodes as a single server is
said at once (it would reach only that node's slots)."""

from __future__ import annotations

import pytest

from harness.redis_cluster import LocalRedisCluster
from harness.server import ServerProcess

pytestmark = pytest.mark.e2e


def warnings_about_cluster(server: ServerProcess) -> list[dict[str, object]]:
    lines = server.log_entries()
    return [e for e in lines if e.get("level") == "warning" and "Redis Cluster" in str(e)]


def test_a_redis_url_naming_one_cluster_node_is_said(
    redis_cluster: LocalRedisCluster, server_env: dict[str, str]
) -> None:
    node = redis_cluster.nodes[0]
    one_node = ServerProcess(env={**server_env, "REDIS_URL": f"redis://{node.address}/0"})
    try:
        one_node.wait_serving()
        [warning] = warnings_about_cluster(one_node)
        assert "redis+cluster://" in str(warning["message"]), warning
    finally:
        one_node.stop()
    cluster = ServerProcess(env={**server_env, "REDIS_URL": redis_cluster.url})
    try:
        cluster.wait_serving()
        assert warnings_about_cluster(cluster) == []
    finally:
        cluster.stop()
