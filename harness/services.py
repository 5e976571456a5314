"""PostgreSQL and Redis for the tests: the machine's own when COUPON_TEST_DATABASE_URL /
COUPON_TEST_REDIS_URL are set, testcontainers otherwise. Every run gets its own database
and Redis key prefix, and removes only what it created."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis


@dataclass(frozen=True)
class TestServices:
    __test__ = False  # not a test class, though its name starts with Test

    database_url: str
    redis_url: str
    redis_prefix: str


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@contextlib.contextmanager
def _containers() -> Iterator[tuple[str, str]]:
    """Start PostgreSQL and Redis containers (only when no URLs were given)."""
    from testcontainers.postgres import PostgresContainer
    from testcontainers.redis import RedisContainer

    with (
        PostgresContainer("postgres:16-alpine", driver=None) as pg,
        RedisContainer("redis:7-alpine") as rd,
    ):
        pg_url = pg.get_connection_url().replace("postgresql+psycopg2", "postgresql")
        redis_url = f"redis://{rd.get_container_host_ip()}:{rd.get_exposed_port(6379)}/0"
        yield pg_url, redis_url


@contextlib.contextmanager
def test_services() -> Iterator[TestServices]:
    server_url = os.environ.get("COUPON_TEST_DATABASE_URL", "")
    redis_url = os.environ.get("COUPON_TEST_REDIS_URL", "")
    with contextlib.ExitStack() as stack:
        if not server_url or not redis_url:
            pg_url, rd_url = stack.enter_context(_containers())
            server_url = server_url or pg_url
            redis_url = redis_url or rd_url
        run = secrets.token_hex(4)
        yield TestServices(
            database_url=with_database(server_url, f"coupon_test_{run}"),
            redis_url=redis_url,
            redis_prefix=f"coupon-test-{run}",
        )


async def create_database(database_url: str) -> None:
    from coupon.adapters.postgres.migrate import migrate

    await migrate(database_url)


async def drop_database(database_url: str, prefix: str = "coupon_test_") -> None:
    """Drop a database this run made (its name says so: it starts with `prefix`)."""
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    assert name.startswith(prefix), name
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def delete_prefix(redis_url: str, prefix: str) -> None:
    assert prefix.startswith("coupon-test-"), prefix
    client = aioredis.Redis.from_url(redis_url)
    try:
        batch = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.delete(*batch)
                batch.clear()
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def table_locked(pool: asyncpg.Pool, table: str, mode: str) -> AsyncIterator[None]:
    """`table` locked in `mode` (`LOCK TABLE table IN mode MODE`) by a transaction of the
    test's own, rolled back when the block ends: what needs that table waits meanwhile."""
    async with pool.acquire() as locker:
        held = locker.transaction()
        await held.start()
        try:
            await locker.execute(f"LOCK TABLE {table} IN {mode} MODE")
            yield
        finally:
            await held.rollback()
