"""Versioned SQL migrations, applied in order, once, under an advisory lock."""

from __future__ import annotations

import functools
import logging
import re
import socket
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger("coupon")

# Any constant shared by all server processes: several workers may start at once.
_LOCK_ID = 0x636F75706F6E  # "coupon"


@functools.cache
def migrations() -> tuple[tuple[int, str, str], ...]:
    """(version, name, sql) of every migration shipped with the package, in order (read
    once: readiness probes ask for the latest version)."""
    found = []
    for entry in resources.files("coupon.adapters.postgres.migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text()))
    return tuple(sorted(found))


def latest_version() -> int:
    return migrations()[-1][0]


# Bounds each connection attempt: an address that swallows packets would otherwise hold
# start-up for asyncpg's default of a minute.
CONNECT_TIMEOUT = 10.0


async def ensure_database(database_url: str, timeout: float = CONNECT_TIMEOUT) -> bool:
    """Create the database named in the URL when it does not exist. True if created."""
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    if not name:
        return False
    try:
        conn = await asyncpg.connect(database_url, timeout=timeout)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    admin = await asyncpg.connect(admin_url, timeout=timeout)
    try:
        quoted = '"' + name.replace('"', '""') + '"'
        await admin.execute(f"CREATE DATABASE {quoted}")
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    log.info("database created", extra={"database": name})
    return True


async def current_version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


def newer_than_release(version: int) -> str | None:
    """What to say of a schema at `version` when it is newer than this release's migrations
    (a rollback after a newer release migrated); None when it is not. Such a schema is
    left as it is and served: in expand/contract deploys a release runs on the schema of
    the next one, and Flyway, for one, ignores such migrations by default."""
    if version <= latest_version():
        return None
    return f"schema is at {version}, newer than this release's {latest_version()}"


@dataclass(frozen=True, slots=True)
class Migrated:
    found: int  # the schema's version before (0: none)
    applied: list[int]


async def migrate(
    database_url: str,
    *,
    create_database: bool = True,
    upto: int | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> list[int]:
    """Apply pending migrations (those up to version `upto`, when given); returns the
    versions applied."""
    migrated = await migrate_schema(
        database_url, create_database=create_database, upto=upto, timeout=timeout
    )
    return migrated.applied


async def migrate_schema(
    database_url: str,
    *,
    create_database: bool = True,
    upto: int | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> Migrated:
    """`migrate`, saying also the version the schema was at."""
    if create_database:
        await ensure_database(database_url, timeout)
    conn = await asyncpg.connect(database_url, timeout=timeout)
    applied: list[int] = []
    done = 0
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version int PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = await current_version(conn)
            for version, name, sql in migrations():
                if version <= done or (upto is not None and version > upto):
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                applied.append(version)
                log.info("migration applied", extra={"version": version, "migration": name})
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    finally:
        await conn.close()
    return Migrated(done, applied)


def describe_failure(exc: BaseException, database_url: str) -> str | None:
    """What went wrong reaching or migrating PostgreSQL, in a few words for an operator; None
    for a failure that is not about the database (a bug, to be reported in full). Never
    the password: the host and port alone."""
    try:
        parts = urlsplit(database_url)
        host = parts.hostname or "localhost"
        where = f"{host}:{parts.port or 5432}"
    except ValueError:  # no URL to read (an unclosed IPv6 bracket, a port that is no number)
        host, where = "?", "its host"
    if isinstance(exc, socket.gaierror):
        return f"unknown host {host!r} ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where}"
    if isinstance(exc, TimeoutError):
        return f"no answer from {where} (timed out)"
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"authentication failed: {exc}"
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return f"permission denied: {exc}"
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return f"PostgreSQL at {where} is starting or stopping: {exc}"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError)):
        return f"{type(exc).__name__}: {exc}"
    return None
