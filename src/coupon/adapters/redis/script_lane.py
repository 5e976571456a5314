"""Scripts sent on connections set aside from a one-server client's pool."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from coupon.adapters.redis.turns import Turns


def _late(wait: float) -> RedisTimeoutError:
    return RedisTimeoutError(f"no answer from Redis within {wait:g} s")


async def _call(conn: AbstractConnection, give_up: float, wait: float, *command: EncodableT) -> Any:
    """One command on `conn`, bypassing the pool's health check, and its reply, read until
    `give_up` (time.monotonic()) at most. The lane's scripts always return a value."""
    await conn.send_packed_command(conn.pack_command(*command), check_health=False)
    # This read's time-out in place of the socket's (one timer either way); redis-py
    # answers None when it runs out, and leaves the connection to us.
    reply = await conn.read_response(timeout=max(0.0, give_up - time.monotonic()))
    if reply is None:
        raise _late(wait)
    return reply


class ScriptLane:
    """Runs scripts on connections set aside from a one-server client's pool.

    The client's own path (`execute_command`) takes a connection from the pool under a lock
    and a timeout, checks it for unread data, and goes through retry and observability
    hooks on every call: 125 us of CPU per admission batch, against 60 us here. The gate
    has at most one batch in flight per campaign, so a few connections serve them all.

    The lane keeps the connections it took (idle between batches), at most half the pool:
    a burst on many campaigns at once queues its batches for the lane's connections, and
    leaves the rest of the pool to everything else (releases, rebuilds, readiness). Kept
    without a bound, the lane once held every connection of the pool, idle, after such a
    burst, and every other command of the process failed until it restarted.
    """

    ATTEMPTS = 3

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pool = client.connection_pool
        self._idle: list[AbstractConnection] = []
        self._limit = max(1, (self._pool.max_connections or 2) // 2)
        self._held = 0  # taken from the pool, idle or in use
        # Batches waiting for a connection: handed an idle one, or None, room to take one.
        self._turns: Turns[AbstractConnection | None] = Turns()

    async def run(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[EncodableT],
        wait: float,
    ) -> Any:
        """The script's reply, or a failure, within `wait` seconds whatever Redis does:
        taking a connection (waiting for one, connecting), loading the script, sending it
        again, and reading its reply all count. A Redis that hangs otherwise held a call
        for a connection's time-out at each of these steps, and a new connection's set-up
        for several (80 s in all was seen with Redis stopped by SIGSTOP)."""
        give_up = time.monotonic() + wait
        for attempt in range(1, self.ATTEMPTS + 1):
            conn = self._idle.pop() if self._idle else await self._connection(give_up, wait)
            try:
                reply = await self._evalsha(conn, script, keys, args, give_up, wait)
            except (RedisConnectionError, OSError):
                # A connection the server has closed (Redis restarted, or dropped an idle
                # client), kept here or idle in the pool: once more on another, as the
                # client's own retry would. Safe even if the first send ran: the admission
                # script answers a call sent again (same token) with the same admissions.
                await self._drop(conn)
                if attempt == self.ATTEMPTS or time.monotonic() >= give_up:
                    raise
                continue
            except BaseException:
                # A reply may still be on its way: the connection cannot be used again.
                await self._drop(conn)
                raise
            self._hand_over(conn)
            return reply
        raise AssertionError("unreachable")

    async def _evalsha(
        self,
        conn: AbstractConnection,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[EncodableT],
        give_up: float,
        wait: float,
    ) -> Any:
        try:
            return await _call(conn, give_up, wait, "EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            # The server lost its scripts (restarted, flushed): load it and send again.
            try:
                async with asyncio.timeout(give_up - time.monotonic()):
                    script.sha = await self._client.script_load(script.script)
            except TimeoutError:  # the timer's; raised as Redis's, not retried as OSError
                raise _late(wait) from None
        return await _call(conn, give_up, wait, "EVALSHA", script.sha, len(keys), *keys, *args)

    async def _connection(self, give_up: float, wait: float) -> AbstractConnection:
        """A connection to use, by `give_up` at the latest: a turn among the lane's, or a
        new one from the pool (a timer only here: the common call has an idle one)."""
        try:
            async with asyncio.timeout(give_up - time.monotonic()):
                return await self._take()
        except TimeoutError:  # the timer's; raised as Redis's, not retried as OSError
            raise _late(wait) from None

    async def _take(self) -> AbstractConnection:
        if self._held < self._limit:
            self._held += 1
        else:
            handed = await self._turns.wait(self._hand_over)
            if handed is not None:
                return handed
        try:
            conn: AbstractConnection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        except BaseException:
            self._hand_over(None)
            raise
        return conn

    def _hand_over(self, conn: AbstractConnection | None) -> None:
        """A connection done with (None: one given up) goes to the batch that waited
        longest, else back to the idle ones (None: the room it leaves)."""
        if self._turns.hand(conn):
            return
        if conn is None:
            self._held -= 1
        else:
            self._idle.append(conn)

    async def _drop(self, conn: AbstractConnection) -> None:
        try:
            # Not waiting for the socket to close: a hung server's included, at once.
            await conn.disconnect(nowait=True)
        finally:
            self._hand_over(None)
            await self._pool.release(conn)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        self._held -= len(idle)
        for conn in idle:
            await self._pool.release(conn)
