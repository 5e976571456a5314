from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from coupon.adapters.redis.client import create_client
from harness.private_postgres import PrivatePostgres, postgres_bindir
from harness.private_redis import PrivateRedis
from harness.server import ServerProcess, free_port
from harness.services import (
    TestServices,
    create_database,
    delete_prefix,
    drop_database,
    test_services,
)


@pytest.fixture(scope="session")
def services() -> Iterator[TestServices]:
    with test_services() as found:
        yield found


@pytest.fixture(scope="session")
async def database(services: TestServices) -> AsyncIterator[str]:
    """This run's own database, migrated; dropped at the end."""
    await create_database(services.database_url)
    try:
        yield services.database_url
    finally:
        await drop_database(services.database_url)


@pytest.fixture(scope="session")
async def redis_prefix(services: TestServices) -> AsyncIterator[str]:
    """This run's own Redis key prefix; its keys are deleted at the end."""
    try:
        yield services.redis_prefix
    finally:
        await delete_prefix(services.redis_url, services.redis_prefix)


@pytest.fixture(scope="session")
async def pg_pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database, min_size=1, max_size=20)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(scope="session")
async def redis_client(services: TestServices) -> AsyncIterator[aioredis.Redis]:
    client = create_client(services.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def server_env(services: TestServices, database: str, redis_prefix: str) -> dict[str, str]:
    """Environment for a real server against this run's database and key prefix."""
    return {
        "DATABASE_URL": database,
        "REDIS_URL": services.redis_url,
        "COUPON_REDIS_PREFIX": redis_prefix,
    }


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A Redis of the test's own, which it may stop, pause or fill."""
    redis = PrivateRedis()
    try:
        yield redis
    finally:
        redis.close()


@pytest.fixture
def stallable(
    tmp_path: Path, services: TestServices, redis_prefix: str
) -> Iterator[tuple[PrivatePostgres, ServerProcess]]:
    """A server on a PostgreSQL of the test's own, which the test may pause."""
    if postgres_bindir() is None:
        pytest.skip("PostgreSQL's initdb is not installed: this test starts one of its own")
    postgres = PrivatePostgres(free_port())
    try:
        postgres.start()
        env = {
            "DATABASE_URL": postgres.url.rsplit("/", 1)[0] + "/coupon",
            "REDIS_URL": services.redis_url,
            "COUPON_REDIS_PREFIX": redis_prefix,
        }
        with ServerProcess(env=env, log_dir=tmp_path) as server:
            yield postgres, server
    finally:
        postgres.close()
