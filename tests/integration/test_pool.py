"""The service's connection pool: releasing a connection costs no round trip, and still
leaves no transaction open for the next user."""

from __future__ import annotations

from coupon.adapters.postgres.pool import create_pool


async def test_release_sends_nothing_to_the_server(database: str) -> None:
    pool = await create_pool(database, 1)
    sent: list[str] = []
    try:
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda record: sent.append(record.query))
            await conn.fetchval("SELECT 1")
            backend = conn.get_server_pid()
        async with pool.acquire() as again:  # the same connection: the pool holds one
            assert again.get_server_pid() == backend
            await again.fetchval("SELECT 2")
    finally:
        await pool.close()
    # asyncpg's default release runs "SELECT pg_advisory_unlock_all(); CLOSE ALL; ..."
    assert sent == ["SELECT 1", "SELECT 2"]


async def test_a_transaction_left_open_is_rolled_back_on_release(database: str) -> None:
    pool = await create_pool(database, 1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("CREATE TEMP TABLE left_open (x int)")
        async with pool.acquire() as again:
            assert not again.is_in_transaction()
            missing = await again.fetchval("SELECT to_regclass('pg_temp.left_open')")
            assert missing is None
    finally:
        await pool.close()
