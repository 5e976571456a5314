"""A worker's connection budget: how many client connections it holds at most, so that idle
ones cannot take every file descriptor it may open.

Each connection is a descriptor, and a worker may open RLIMIT_NOFILE of them (its soft
limit; `coupon serve` raises it to the hard limit at start). Past that, accept() fails
(EMFILE) and new clients, a flash crowd's new users, meet a closed door while the worker
holds connections that send nothing. Some descriptors are the worker's own: its
PostgreSQL pool (COUPON_DB_POOL_SIZE, at most 100), its Redis pool (64 per server), its
listening sockets, event loop, metrics files and logs. A reserve is kept for those, a
tenth of the limit and at least 256 (but never more than half the limit), and the rest is
the budget for connections.

When a connection arrives and the worker holds its budget already, idle connections are
closed to make room, as nginx does when it runs short of connections: first those that
have never sent a byte, then those idle longest between requests (HTTP/1.1 keep-alive,
HTTP/2 with no stream open, which get a GOAWAY). A batch at a time, so that the search
among the connections is made once for many new ones; a connection with a request in
flight, or with a request's bytes arrived and not yet read, is never one of them. With
none idle, the new connection is closed at once, and the next search waits a moment
(SEARCH_PAUSE), so that a flood of new connections against busy ones costs a close each,
not a search each.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import resource

from uvicorn.server import ServerState

from coupon.entrypoints.http.h1 import Http1Protocol, unread_bytes
from coupon.entrypoints.http.h2 import H2Protocol
from coupon.entrypoints.logs import LogQuota
from coupon.entrypoints.metrics import get_metrics

log = logging.getLogger("coupon.http")

RESERVE_MIN = 256
BATCH = 32
SEARCH_PAUSE = 0.1  # seconds after a search that found fewer idle connections than a batch


def open_files_limit() -> int:
    """The soft RLIMIT_NOFILE: descriptors this process may hold (0: no limit)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 0 if soft == resource.RLIM_INFINITY else soft


def reserve_of(limit: int) -> int:
    """Descriptors kept for the worker's own pools, files and sockets."""
    return min(max(RESERVE_MIN, limit // 10), limit // 2)


def raise_open_files_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as Go's runtime does at start): the
    soft one is often a low default (1,024) kept for old select() loops, which this
    server does not use, and its workers inherit the raised one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        # Else kept as it is: the budget follows the soft limit either way.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ConnectionBudget:
    """One per server (per worker process): `size` connections at most."""

    def __init__(self, state: ServerState, limit: int | None = None) -> None:
        self.state = state
        self.limit = open_files_limit() if limit is None else limit
        self.reserve = reserve_of(self.limit)
        self.size = self.limit - self.reserve if self.limit else 1 << 62
        self._search_after = 0.0
        # Since the last log line: idle connections closed, new ones turned away.
        self._closed = 0
        self._refused = 0
        self._quota = LogQuota()
        self._told: asyncio.TimerHandle | None = None
        closes = get_metrics().connection_closes
        self._idle_closed = closes("budget_idle")
        self._new_refused = closes("budget_full")

    def make_room(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Called with the budget held, for a new connection: close a batch of idle ones.
        False when none could be (the new connection is to be closed)."""
        closed = 0
        now = loop.time()
        if now >= self._search_after:
            closed = self._close_idle()
            if closed < BATCH:
                self._search_after = now + SEARCH_PAUSE
        self._closed += closed
        if closed:
            self._idle_closed.inc(closed)
        else:
            self._refused += 1
            self._new_refused.inc()
        self._tell(loop)
        return closed > 0

    def _tell(self, loop: asyncio.AbstractEventLoop) -> None:
        """The warning, once a second at most: what was closed since the last one (counts
        held back meanwhile are told a second later, not lost)."""
        if self._quota.admit() is None:
            if self._told is None:
                self._told = loop.call_later(LogQuota.EVERY_SECONDS, self._tell_rest, loop)
            return
        log.warning(
            "connection budget reached: idle connections closed to make room for new ones, "
            "a new one closed at once when none was idle (raise the open files limit, or "
            "add workers or instances)",
            extra={
                "budget": self.size,
                "open_files_limit": self.limit,
                "reserve": self.reserve,
                "idle_closed": self._closed,
                "new_refused": self._refused,
            },
        )
        self._closed = self._refused = 0

    def _tell_rest(self, loop: asyncio.AbstractEventLoop) -> None:
        self._told = None
        if self._closed or self._refused:
            self._tell(loop)

    def _close_idle(self) -> int:
        """Close up to BATCH idle connections, those that never sent a byte first, then
        those idle longest; the number closed."""
        # Imported here: sniff.py imports this module.
        from coupon.entrypoints.http.sniff import AutoProtocol

        silent: list[tuple[float, int, asyncio.Protocol]] = []
        idle: list[tuple[float, int, asyncio.Protocol]] = []
        for connection in self.state.connections:
            if isinstance(connection, AutoProtocol):
                since = connection.silent_since()
                if since:
                    silent.append((since, id(connection), connection))
            elif isinstance(connection, Http1Protocol):
                since = connection.idle_since()
                if since and not connection.draining_until():
                    idle.append((since, id(connection), connection))
            elif isinstance(connection, H2Protocol):
                since = connection.idle_since()
                if since:
                    idle.append((since, id(connection), connection))
        chosen = heapq.nsmallest(BATCH, silent)
        if len(chosen) < BATCH:
            chosen += heapq.nsmallest(BATCH - len(chosen), idle)
        closed = 0
        for _, _, candidate in chosen:
            transport = getattr(candidate, "transport", None)
            if (
                transport is None
                or transport.is_closing()
                or transport.get_write_buffer_size()  # an answer still going: it frees nothing now
                or unread_bytes(transport)  # a request's bytes are here: it is read and answered
            ):
                continue
            if isinstance(candidate, AutoProtocol):
                candidate.close_idle()
            elif isinstance(candidate, H2Protocol):
                candidate.shutdown()  # GOAWAY: no stream is open, so it closes at once
            else:
                transport.close()
            # Its descriptor is closed now; the protocol hears of it on the next turn.
            self.state.connections.discard(candidate)
            closed += 1
        return closed
