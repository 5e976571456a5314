"""What the tests, the bench and the tools run against: real server processes (server),
private Redis and Redis Cluster instances (private_redis, redis_cluster), the test
services (services), a cuttable TCP proxy (proxy), the generated client (client), bursts
with their checks (burst) and the cluster rounds (cluster). The checks of PostgreSQL are
the load tool's auditor, coupon_loadtest.audit."""
