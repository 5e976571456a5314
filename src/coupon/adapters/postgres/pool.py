"""The asyncpg pool and the mapping of database failures to `Unavailable`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import asyncpg

from coupon.domain.errors import OutcomeUnknown, Unavailable

log = logging.getLogger("coupon")

# Errors after which retrying later can succeed: the server is down, restarting,
# overloaded or the connection broke; or it refuses the role or lacks the database, which
# an operator can mend while the service runs (readiness reports it meanwhile).
TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    # Too many connections, disk full, out of memory: the statement was refused.
    asyncpg.InsufficientResourcesError,
    # A read-only session (a standby after a failover, default_transaction_read_only):
    # the statement was refused; the pool's sessions are replaced (`_refused_read_only`).
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.QueryCanceledError,
    asyncpg.AdminShutdownError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    # asyncpg's own state error when a connection broke in the middle of an operation
    # ("cannot switch to state 12; another operation is in progress").
    asyncpg.InternalClientError,
    # The schema is not applied yet (serve applies it as soon as PostgreSQL answers).
    asyncpg.UndefinedTableError,
)

# Refusals by the server of a statement it did not run: retrying later can succeed, and
# nothing of what was sent was done (not an outcome unknown). Not a serialization failure
# or a deadlock: the group commit's statements each commit on their own, so one that failed
# may follow others of the same use that did.
REFUSED = (asyncpg.InsufficientResourcesError, asyncpg.ReadOnlySQLTransactionError)

COMMAND_TIMEOUT_SECONDS = 10.0
# The only transactions kept open between statements are the reads of a campaign's holders
# in one snapshot; the longest wait between two of their statements is a gate rebuild's,
# loading a chunk into Redis (a few commands, each given up after 5 s). ExportCoupons reads
# page by page outside any transaction, so a slow client holds none. A session idle in a
# transaction far longer was left so by a fault: PostgreSQL ends it, so its snapshot (which
# holds back vacuum) and its place among max_connections are not held until a restart.
IDLE_IN_TRANSACTION_SECONDS = 60.0
# How long a graceful shutdown waits for PostgreSQL to take the connections' close.
CLOSE_WAIT_SECONDS = 2.0
# How long a request waits for a pooled connection (one being opened included).
POOL_TIMEOUT_SECONDS = 5.0
INFINITY = datetime.max.replace(tzinfo=UTC)
# Where each pool of `create_pool` connects (host:port, no password), for the causes logged
# of its failures; until `close_pool` (a pool takes no weak reference).
_ADDRESSES: dict[int, tuple[asyncpg.Pool, str]] = {}


def to_db_end(ends_at: datetime | None) -> datetime:
    return INFINITY if ends_at is None else ends_at


def from_db_end(ends_at: datetime) -> datetime | None:
    return None if ends_at.year == 9999 else ends_at


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's default reset query (`SELECT pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL`): that is one more round trip, parsed afresh, on every
    release, and the group commit answers its requests only after it. Pooled connections
    never take advisory locks, open cursors, LISTEN or SET anything (migrations use a
    connection of their own), so there is nothing to reset; asyncpg still rolls back a
    transaction left open before it calls this. IssueCoupon at saturation: +6-19 %
    (bench/RESULTS.md)."""


async def _durable_commits(conn: asyncpg.Connection) -> None:
    """I5: a coupon acknowledged is committed to disk. With synchronous_commit off (set for
    the database or the role), PostgreSQL acknowledges a commit before it is flushed, and a
    crash loses it: the service's sessions wait for the flush whatever the default."""
    if await conn.fetchval("SHOW synchronous_commit") == "off":
        await conn.execute("SET synchronous_commit = on")


async def create_pool(database_url: str, size: int) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            database_url,
            # Connections open lazily, so start-up does not need PostgreSQL to be up.
            min_size=0,
            max_size=size,
            # A stuck statement must not hold a request (and its Redis slot) for long; nor
            # a stalled or unreachable server, which cannot enforce its statement_timeout:
            # the client gives up after as long (asyncio.TimeoutError, so Unavailable).
            # The isolation the group commit is written for, whatever the database's default
            # (a serializable default made concurrent commits fail, to no purpose).
            server_settings={
                "statement_timeout": f"{COMMAND_TIMEOUT_SECONDS:g}s",
                "idle_in_transaction_session_timeout": f"{IDLE_IN_TRANSACTION_SECONDS:g}s",
                "application_name": "coupon",
                "default_transaction_isolation": "read committed",
            },
            command_timeout=COMMAND_TIMEOUT_SECONDS,
            timeout=POOL_TIMEOUT_SECONDS,
            reset=_keep_session,
            init=_durable_commits,
        )
    except TRANSIENT as exc:
        raise Unavailable(
            "PostgreSQL is unreachable", detail=f"{type(exc).__name__}: {exc}"
        ) from exc
    assert pool is not None
    _ADDRESSES[id(pool)] = (pool, _address(database_url))
    return pool


async def close_pool(pool: asyncpg.Pool, wait: float = CLOSE_WAIT_SECONDS) -> None:
    """Close the connections politely (graceful shutdown), waiting `wait` seconds at most:
    a PostgreSQL that hangs would hold the exit for as long as a command's time-out. Then
    they are dropped without a goodbye, in a warning line. Nothing acknowledged is at
    stake: every coupon answered was committed before its answer (I5)."""
    _ADDRESSES.pop(id(pool), None)
    try:
        await asyncio.wait_for(pool.close(), wait)
    except TRANSIENT as exc:
        pool.terminate()
        log.warning(
            "PostgreSQL connections dropped at shutdown: it did not answer their close",
            extra={"cause": f"{type(exc).__name__}: {str(exc) or f'no answer in {wait:g} s'}"},
        )


async def warm(pool: asyncpg.Pool, count: int) -> None:
    """Open `count` connections ahead of need, so a burst at a campaign's start does not
    wait for connections to be made. Failures are left for the requests to report."""

    async def hold() -> None:
        async with pool.acquire(timeout=5) as conn:
            await conn.execute("SELECT 1")
            await asyncio.sleep(0.05)  # keep it while the others open theirs

    await asyncio.gather(*(hold() for _ in range(count)), return_exceptions=True)


@asynccontextmanager
async def connection(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection; transient database failures become `Unavailable`."""
    acquired = False
    try:
        async with pool.acquire(timeout=POOL_TIMEOUT_SECONDS) as conn:
            acquired = True
            yield conn
    except TRANSIENT as exc:
        await _replace_sessions_after(pool, exc, acquired)
        raise _unavailable(exc, pool) from exc


async def _replace_sessions_after(pool: asyncpg.Pool, exc: BaseException, used: bool) -> None:
    """After these failures every pooled session is replaced as it is next taken:
    - a read-only refusal: a session keeps the read-only state it opened with
      (default_transaction_read_only), and a failover leaves the old ones on the demoted
      server; new sessions find the writable one once there is one;
    - a command on a session that had no answer in time: its peer may be gone while the
      socket stays open (a NAT or firewall that lost the connection's state, an address
      moved by a failover), and so may every session opened alongside it. Found one at a
      time, each would cost a request its command time-out, for minutes; new sessions
      either work at once or fail as fast (a server that is down or stalled fails them
      within the pool's time-out, as the old ones would have)."""
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError) or (
        used and isinstance(exc, asyncio.TimeoutError)
    ):
        with contextlib.suppress(Exception):
            await pool.expire_connections()


def _outcome_unknown(exc: BaseException, pool: asyncpg.Pool | None = None) -> OutcomeUnknown:
    unavailable = _unavailable(exc, pool)
    return OutcomeUnknown(
        f"{unavailable}, while recording: it may have been recorded all the same;"
        " retry (a coupon recorded is returned to its user, never issued twice)",
        detail=unavailable.detail,
    )


def _unavailable(exc: BaseException, pool: asyncpg.Pool | None = None) -> Unavailable:
    known = _ADDRESSES.get(id(pool))
    where = known[1] if known is not None and known[0] is pool else None
    if isinstance(exc, asyncio.TimeoutError) and not str(exc):
        return Unavailable(
            "PostgreSQL is unavailable: it did not answer in time",
            detail=f"no answer in time from {where}" if where else "",
        )
    detail = f"{type(exc).__name__}: {exc}"
    if where and isinstance(exc, OSError):
        # A connection that failed: where it was trying to go, as Redis's client says it
        # (the address only, never the URL: it may hold the password).
        detail = f"{detail} (connecting to {where})"
    return Unavailable("PostgreSQL is unavailable", detail=detail)


def _address(database_url: str) -> str:
    """The host:port (or each of several) a PostgreSQL URL names, without its user or
    password; PostgreSQL's defaults for what it leaves out."""
    parts = urlsplit(database_url)
    hosts = parts.netloc.rpartition("@")[2]
    if not hosts:
        # No host in the URL: a host= parameter (often a Unix socket's folder), or the
        # client's default.
        given = parse_qs(parts.query).get("host", [""])[0]
        return given or "localhost:5432"
    return ",".join(
        host if re.search(r":\d+$", host) else f"{host}:5432" for host in hosts.split(",")
    )


def _open(conn: asyncpg.Connection) -> bool:
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:  # a closed connection was taken back by its pool
        return False


class KeptConnection:
    """A pooled connection kept between uses, for one user that needs a connection again
    and again (the ledger's group commits): the pool's acquire and release cost 20-30 us
    of CPU each time. A connection that failed goes back to the pool, which closes it if it
    is broken; the next use takes a fresh one."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._kept: asyncpg.Connection | None = None
        self._releasing: set[asyncio.Future[None]] = set()

    @asynccontextmanager
    async def use(
        self, acquire_within: float = POOL_TIMEOUT_SECONDS
    ) -> AsyncIterator[asyncpg.Connection]:
        """The kept connection, or one from the pool (waiting at most `acquire_within`
        seconds) when it is in use or gone; transient database failures become
        `Unavailable`, as with `connection` — `OutcomeUnknown` once the connection was in
        use, since what was sent may have been done."""
        conn, self._kept = self._kept, None
        used = False
        try:
            if conn is not None and not _open(conn):  # the server closed it meanwhile
                await self._release_quietly(conn)
                conn = None
            if conn is None:
                conn = await self._pool.acquire(timeout=max(0.001, acquire_within))
            used = True
            yield conn
        except BaseException as exc:
            if conn is not None:
                # Not waited for: the pool waits for a statement's cancellation before it
                # takes the connection back (up to the pool's time-out, asked of a server
                # that may be stalled), and the failure is answered now.
                self._release_later(conn)
            if isinstance(exc, TRANSIENT):
                await _replace_sessions_after(self._pool, exc, used)
                # Failed in use, a write may have reached the server before it broke;
                # not when the server refused it.
                unknown = used and not isinstance(exc, REFUSED)
                failed = (
                    _outcome_unknown(exc, self._pool) if unknown else _unavailable(exc, self._pool)
                )
                raise failed from exc
            raise
        if self._kept is None and _open(conn):
            self._kept = conn
        else:
            await self._release_quietly(conn)

    async def _release_quietly(self, conn: asyncpg.Connection) -> None:
        with contextlib.suppress(Exception):
            await self._pool.release(conn)

    def _release_later(self, conn: asyncpg.Connection) -> None:
        task = asyncio.ensure_future(self._release_quietly(conn))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def close(self) -> None:
        conn, self._kept = self._kept, None
        if conn is not None:
            await self._release_quietly(conn)
        if self._releasing:
            await asyncio.gather(*self._releasing)
