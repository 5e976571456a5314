"""The service's connection pool: releasing a connection costs no round trip, and still
leaves no transaction open for the next user; a connection kept aside for the group
commits is reused, replaced when it broke, and given back; a session a fault left idle
in a transaction is ended by the server."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest
from connectrpc.code import Code

from coupon.adapters.postgres.pool import KeptConnection, create_pool
from coupon.domain.errors import OutcomeUnknown, Unavailable
from coupon.entrypoints.connect_service import connect_error
from harness.server import free_port as a_free_port
from harness.services import drop_database, with_database


async def test_a_session_left_idle_in_a_transaction_is_ended_by_the_server(
    database: str,
) -> None:
    """A backstop for a read of the ledger that a fault left suspended in its transaction:
    PostgreSQL ends the session after a minute, rather than keep its snapshot for good."""
    pool = await create_pool(database, 1)
    try:
        async with pool.acquire() as conn:
            timeout = await conn.fetchval("SHOW idle_in_transaction_session_timeout")
    finally:
        await pool.close()
    assert timeout == "1min"


@pytest.fixture
def free_port() -> int:
    return a_free_port()


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


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database, 2)
    try:
        yield pool
    finally:
        await pool.close()


def seen_closed(conn: asyncpg.Connection) -> bool:
    """Whether the client has noticed that the server closed `conn`."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:  # closed, and taken back by its pool already
        return True


async def test_a_kept_connection_serves_use_after_use_and_goes_back_on_close(
    pool: asyncpg.Pool,
) -> None:
    kept = KeptConnection(pool)
    async with kept.use() as conn:
        first = conn.get_server_pid()
    async with kept.use() as conn:
        assert conn.get_server_pid() == first
    assert pool.get_idle_size() == 0  # kept aside, not in the pool
    await kept.close()
    assert pool.get_idle_size() == 1


async def test_two_uses_at_once_take_two_connections_and_keep_one(pool: asyncpg.Pool) -> None:
    kept = KeptConnection(pool)
    both = asyncio.Event()
    pids: list[int] = []

    async def use() -> None:
        async with kept.use() as conn:
            pids.append(conn.get_server_pid())
            if len(pids) == 2:
                both.set()
            await both.wait()

    await asyncio.gather(use(), use())
    assert len(set(pids)) == 2
    assert pool.get_idle_size() == 1  # the other one went back
    await kept.close()
    assert pool.get_idle_size() == 2


async def test_a_kept_connection_the_server_closed_is_replaced(
    pool: asyncpg.Pool, database: str
) -> None:
    kept = KeptConnection(pool)
    async with kept.use() as conn:
        broken = conn.get_server_pid()
    admin = await asyncpg.connect(database)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", broken)
    finally:
        await admin.close()
    for _ in range(200):  # until the client has read the server's goodbye
        if seen_closed(conn):
            break
        await asyncio.sleep(0.025)
    assert seen_closed(conn)
    async with kept.use() as conn:
        assert conn.get_server_pid() != broken
        assert await conn.fetchval("SELECT 1") == 1
    await kept.close()


async def test_a_kept_connection_broken_in_use_says_the_outcome_is_unknown(
    pool: asyncpg.Pool, database: str
) -> None:
    """A write on its way when the connection broke may have been done: OutcomeUnknown,
    not the plain Unavailable that says nothing was."""
    kept = KeptConnection(pool)
    other = await asyncpg.connect(database)
    try:
        with pytest.raises(OutcomeUnknown) as broken:
            async with kept.use() as conn:
                backend = conn.get_server_pid()
                sleeping = asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)"))
                await asyncio.sleep(0.3)
                await other.execute("SELECT pg_terminate_backend($1)", backend)
                await sleeping
        assert "may have been recorded" in str(broken.value)
        # Marked for programs: the Connect answer's message begins with the words clients
        # look for (docs/clients.md).
        answer = connect_error(broken.value)
        assert answer.code is Code.UNAVAILABLE
        unknown = "outcome unknown: PostgreSQL is unavailable, while recording"
        assert answer.message.startswith(unknown), answer.message
        assert str(broken.value.detail), "the cause, for the log"
    finally:
        await other.close()
        await kept.close()


async def test_a_kept_connection_that_cannot_be_had_says_unavailable(free_port: int) -> None:
    pool = await create_pool(f"postgresql://postgres@127.0.0.1:{free_port}/none", 1)
    kept = KeptConnection(pool)
    try:
        with pytest.raises(Unavailable) as refused:
            async with kept.use():
                pass
        assert not isinstance(refused.value, OutcomeUnknown)
    finally:
        await pool.close()


async def test_commits_wait_for_the_disk_even_where_the_database_says_not_to(
    database: str,
) -> None:
    """I5: with synchronous_commit off (for the database, the role or the server), a
    commit is acknowledged before it is on disk and a crash loses it; the service's own
    sessions turn it back on."""
    async with database_where(database, "synchronous_commit = off") as url:
        plain = await asyncpg.connect(url)
        try:
            assert await plain.fetchval("SHOW synchronous_commit") == "off"
        finally:
            await plain.close()
        pool = await create_pool(url, 2)
        try:
            async with pool.acquire() as conn:
                assert await conn.fetchval("SHOW synchronous_commit") == "on"
        finally:
            await pool.close()


async def test_a_serializable_default_does_not_reach_the_services_sessions(
    database: str,
) -> None:
    """The group commit is written for read committed: a database whose default is
    serializable made concurrent commits fail (and their outcome look unknown)."""
    async with database_where(database, "default_transaction_isolation = serializable") as url:
        pool = await create_pool(url, 1)
        try:
            async with pool.acquire() as conn:
                assert await conn.fetchval("SHOW transaction_isolation") == "read committed"
        finally:
            await pool.close()


@contextlib.asynccontextmanager
async def database_where(database: str, setting: str) -> AsyncIterator[str]:
    """A scratch database beside `database` whose sessions default to `setting` (as an
    operator may have set it), dropped afterwards: its URL."""
    name = urlsplit(database).path.lstrip("/")
    url = with_database(database, f"{name}_{uuid.uuid4().hex[:8]}")
    db = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(with_database(database, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{db}"')
        await admin.execute(f'ALTER DATABASE "{db}" SET {setting}')
        yield url
    finally:
        await admin.close()
        await drop_database(url)


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])  # a deadlock, a serialization failure
async def test_a_transaction_failure_in_use_may_follow_writes_that_were_done(
    pool: asyncpg.Pool, sqlstate: str
) -> None:
    """The group commit's statements each commit on their own: one that fails may follow
    others of the same use that were recorded, so the answer says the outcome is unknown,
    never that nothing was done."""
    kept = KeptConnection(pool)
    try:
        with pytest.raises(OutcomeUnknown):
            async with kept.use() as conn:
                await conn.execute(
                    f"DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{sqlstate}'; END $$"
                )
    finally:
        await kept.close()
