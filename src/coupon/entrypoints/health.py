"""Readiness: can this process serve? (PostgreSQL and Redis reachable, schema current).

Anyone who can reach the port may ask, so a failing check says which dependency is down
and why in words (the error's kind, the operating system's reason, PostgreSQL's error
class and SQLSTATE), never the error's own text: a driver's message names the address it
tried, and may name the role or database it logged in as."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping


class NotReady(Exception):
    """A check's own finding, worded by the service: shown as it is."""


_WORDS = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _words(kind: type[BaseException]) -> str:
    """`InvalidAuthorizationSpecificationError` -> `invalid authorization specification`."""
    name = kind.__name__.removesuffix("Error").removesuffix("Exception") or kind.__name__
    return _WORDS.sub(" ", name).lower()


def reason(exc: BaseException) -> str:
    """Why a check failed, in words that name no address and no credential."""
    if isinstance(exc, NotReady):
        return str(exc)
    why = _words(type(exc))
    seen: BaseException | None = exc
    for _ in range(5):  # the error and what it was raised from (a driver wraps OSError)
        if seen is None:
            break
        sqlstate = getattr(seen, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.isalnum():
            why = f"{_words(type(seen))} (SQLSTATE {sqlstate})"
            break
        if isinstance(seen, OSError) and isinstance(seen.strerror, str):
            why = seen.strerror.rstrip(".").lower()
            break
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {why}"


class Readiness:
    def __init__(self, checks: Mapping[str, Callable[[], Awaitable[None]]]) -> None:
        self._checks = dict(checks)
        # Checks that did not answer in time, stopped but not waited for.
        self._abandoned: set[asyncio.Future[None]] = set()

    async def check(self, timeout: float = 2.0) -> tuple[bool, dict[str, str]]:
        """Each check's finding, within `timeout` however long a check takes to stop: a
        check cut off is cancelled and left to end by itself (stopping a statement sent to
        a stalled PostgreSQL waits for the pool, seconds more), so that a load balancer
        whose health check waits a little longer sees 503, not a time-out."""

        async def one(check: Callable[[], Awaitable[None]]) -> str:
            task = asyncio.ensure_future(check())
            try:
                done, _ = await asyncio.wait((task,), timeout=timeout)
            except asyncio.CancelledError:
                task.cancel()
                raise
            if not done:
                task.cancel()
                self._abandoned.add(task)
                task.add_done_callback(self._ended)
                return f"error: no answer within {timeout:g} s"
            try:
                task.result()
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
                return f"error: {reason(exc)}"[:300]
            return "ok"

        names = list(self._checks)
        results = await asyncio.gather(*(one(self._checks[n]) for n in names))
        report = dict(zip(names, results, strict=True))
        return all(r == "ok" for r in results), report

    def _ended(self, task: asyncio.Future[None]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: nobody waits for it any more


def refuses_writes(memory: Mapping[str, object]) -> str | None:
    """Why Redis, by its INFO memory, refuses every write, or None: full to its
    `maxmemory` under `noeviction`, it answers PING but refuses each admission (OOM)."""
    limit = int(str(memory.get("maxmemory", 0)))
    used = int(str(memory.get("used_memory", 0)))
    if limit and used >= limit and memory.get("maxmemory_policy") == "noeviction":
        return (
            f"Redis is full: used_memory {used} of maxmemory {limit} (noeviction), so it "
            "refuses writes and no coupon can be admitted; raise maxmemory"
        )
    return None


def read_only_replica(replication: Mapping[str, object]) -> str | None:
    """Why Redis, by its INFO replication, refuses every write, or None: a read-only replica
    (a demoted primary after a failover, a URL that names a replica) answers PING but
    refuses each admission (READONLY)."""
    if replication.get("role") == "slave" and str(replication.get("slave_read_only", 1)) == "1":
        return (
            "Redis is a read-only replica (role:slave), so it refuses writes and no coupon "
            "can be admitted; point REDIS_URL at the primary"
        )
    return None
