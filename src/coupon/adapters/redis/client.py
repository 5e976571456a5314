"""Redis clients for the gate: one server, or Redis Cluster.

    REDIS_URL=redis://[user:password@]host:port/db            one server
    REDIS_URL=redis+cluster://[user:password@]h1:p1,h2:p2     Redis Cluster

`rediss://` and `rediss+cluster://` are the same over TLS. The nodes of a cluster URL are
startup nodes: any one reachable node is enough, the rest of the cluster (and which node
serves which slot) is discovered from it. Every key of a campaign carries the hash tag
`{campaign_id}`, so all of a campaign's keys live in one slot and each gate script runs on
the one node that owns that slot.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import SLOT_ID
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.typing import ScriptTextT
from redis.utils import str_if_bytes

from coupon.adapters.redis.turns import Turns

# What a Redis call can fail with: the server's errors, the network's, the cluster client's
# (no node reachable, a node not in cluster mode: RedisClusterException, not a RedisError).
FAILURES = (RedisError, OSError, RedisClusterException)

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

RedisClient: TypeAlias = aioredis.Redis | RedisCluster
"""What the gate, the clock and readiness are given: one server or a cluster."""


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def parse_server_url(url: str) -> dict[str, Any]:
    """`redis://`, `rediss://` or `unix://` URL -> client kwargs, as `create_client` reads it.

    redis-py takes a database part that is not a whole number (`/abc`, `/1x`) for database
    0 without a word: the service would then share database 0 with whatever uses it, so such
    a path is refused here. Raises ValueError naming what is wrong (a query value redis-py
    cannot read, `?db=x`, too).
    """
    parts = urlsplit(url)
    if parts.scheme != "unix":  # a unix:// path is the socket's; its database is ?db=N
        db = unquote(parts.path).removeprefix("/")
        if db and not (db.isascii() and db.isdigit()):
            raise ValueError(
                f"the database after the host must be a whole number, 0 or more "
                f"(got {parts.path!r} in {url!r})"
            )
    return dict(parse_url(url))


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """`redis+cluster://[user:pw@]h1:p1,h2:p2[/0][?opts]` -> startup nodes, client kwargs.

    Credentials, TLS and query options are read by redis-py's own URL parser (the same
    that reads `redis://` URLs), so they mean the same for a cluster as for one server.
    Raises ValueError naming what is wrong.
    """
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL (redis+cluster://...): {url!r}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    nodes = [_host_port(item, url) for item in hostlist.split(",")]
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"Redis Cluster has only database 0 (got path {parts.path!r} in {url!r})")
    scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
    first_host, first_port = nodes[0]
    host = f"[{first_host}]" if ":" in first_host else first_host
    auth = f"{userinfo}@" if userinfo else ""
    single = urlunsplit((scheme, f"{auth}{host}:{first_port}", "/0", parts.query, ""))
    kwargs: dict[str, Any] = dict(parse_url(single))
    if int(kwargs.get("db") or 0) != 0:  # ?db=N: the query is read after the path
        raise ValueError(f"Redis Cluster has only database 0 (got db={kwargs['db']} in {url!r})")
    for name in ("host", "port", "db", "path"):
        kwargs.pop(name, None)
    if kwargs.pop("connection_class", None) is SSLConnection:
        kwargs["ssl"] = True
    return nodes, kwargs


def _host_port(item: str, url: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, ""
    if not host:
        raise ValueError(f"Redis Cluster URL has an empty host in {item!r}: {url!r}")
    if port == "":
        return host, 6379
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"Redis Cluster URL has a bad port in {item!r}: {url!r}")
    return host, int(port)


class _WriteFailureIsConnectionError(AbstractConnection):
    """A command written to a connection that is gone is a connection error.

    redis-py reports a failed write as ConnectionError (retried on a new connection, and
    `unavailable` to our callers when that fails too) only for what asyncio's own event
    loop raises. Two other ways escaped every mapping and reached clients as `unknown` when
    a Redis node was killed (the Redis Cluster kill-a-master test, about one run in three):
    uvloop, which `coupon serve` runs on, raises RuntimeError ("unable to perform operation
    on <TCPTransport closed=True>; the handler is closed") for a write to a transport it
    closed when the server reset the connection; and when another task disconnects the
    connection while the write is being scheduled (redis-py's cluster client does, after a
    node's error), the writer is None by the time it is used.
    """

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        # Either way redis-py has disconnected the connection already.
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as exc:
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        except AttributeError as exc:
            if exc.obj is not None:  # not the writer gone: a defect, reported as one
                raise
            raise RedisConnectionError(
                "Error while writing to socket: the connection was closed meanwhile"
            ) from exc


class _TcpConnection(_WriteFailureIsConnectionError, Connection):
    pass


class _SslConnection(_WriteFailureIsConnectionError, SSLConnection):
    pass


class _UnixConnection(_WriteFailureIsConnectionError, UnixDomainSocketConnection):
    pass


def _for_uvloop(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """The class the URL asked for (TCP, TLS, Unix socket), with writes mapped as above."""
    for base, mapped in (
        (SSLConnection, _SslConnection),
        (Connection, _TcpConnection),
        (UnixDomainSocketConnection, _UnixConnection),
    ):
        if connection_class is base:
            return mapped
    return connection_class


class QueueingConnectionPool(aioredis.ConnectionPool):
    """A one-server pool whose callers wait up to `timeout` seconds for a connection, and
    which cannot lose one, whatever is cancelled when.

    redis-py's BlockingConnectionPool hands a connection back under two asyncio locks
    (`release` awaits both): a caller cancelled while it waits for them (a request's
    deadline, `asyncio.wait_for`) loses its connection for good, and a pool that has lost
    them all answers "No connection available." until the process restarts. Here giving a
    connection back is plain bookkeeping, with nothing to wait for, so nothing can
    interrupt it; a connection given back goes straight to the caller that waited longest.
    And a connection its caller dropped without giving it back stops counting as soon as
    it is garbage (the pool holds the connections in use weakly): lost connections cannot
    use the pool up for good either.
    """

    def __init__(self, *, timeout: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeout = timeout
        self._in_use_connections = weakref.WeakSet()  # type: ignore[assignment]
        self._turns: Turns[AbstractConnection] = Turns()

    def _has_room(self) -> bool:
        return bool(self._available_connections) or (
            len(self._in_use_connections) < self.max_connections
        )

    async def get_connection(
        self, command_name: object = None, *keys: object, **options: object
    ) -> AbstractConnection:
        if self._has_room():
            connection: AbstractConnection = self.get_available_connection()  # type: ignore[no-untyped-call]
        else:
            connection = await self._wait_turn()
        try:
            await self.ensure_connection(connection)
        except BaseException:
            self._give_back(connection)
            raise
        return connection

    async def _wait_turn(self) -> AbstractConnection:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._turns.wait(self._give_back)
        except TimeoutError:
            if self._has_room():  # room left by connections lost and collected
                return self.get_available_connection()  # type: ignore[no-any-return,no-untyped-call]
            raise RedisConnectionError("No connection available.") from None

    def _give_back(self, connection: AbstractConnection) -> None:
        if connection not in self._in_use_connections:
            return  # not this pool's (any more): dropped
        if not self._turns.hand(connection):  # else in use still, by the next caller
            self._in_use_connections.discard(connection)
            self._available_connections.append(connection)

    async def release(self, connection: AbstractConnection) -> None:
        self._give_back(connection)


class QueueingRedisCluster(RedisCluster):
    """RedisCluster whose callers queue for a connection instead of failing.

    redis-py's cluster client raises MaxConnectionsError when a node's pool is empty; the
    single-server client waits (a blocking pool). During a burst every request of a hot
    campaign goes to the one node that owns its slot, so without waiting the burst would
    turn into `unavailable`. Here each master has its own limit of `max_connections`
    commands in flight (by the slot of the command's keys; keyless commands such as TIME
    and PING share a small extra limit), below the size of its pool, so no pool runs dry;
    callers wait up to `pool_timeout` seconds, as with the single-server pool. A limit
    per master, not one for the client: a master that hangs holds up only its own
    campaigns' callers, not everyone's.
    """

    KEYLESS_IN_FLIGHT = 8
    # A command's whole time, its retries included: the client retries a time-out on the
    # same hung master, a socket time-out each, which would hold a caller for 20 s.
    COMMAND_DEADLINE = 6.0
    SCRIPT_LOAD_WAIT = 0.5

    def __init__(self, *args: Any, pool_timeout: float = 5.0, in_flight: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Nodes are made from these kwargs as the cluster is discovered; the startup nodes
        # exist already. RedisCluster has no parameter for the connection class.
        manager = self.nodes_manager
        chosen = manager.connection_kwargs.get("connection_class", Connection)
        connection_class = _SslConnection if issubclass(chosen, SSLConnection) else _TcpConnection
        manager.connection_kwargs["connection_class"] = connection_class
        for node in (*manager.startup_nodes.values(), *manager.nodes_cache.values()):
            node.connection_class = connection_class
        self._per_node = in_flight
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._pool_timeout = pool_timeout

    async def _limit_for(self, args: tuple[Any, ...], target: object) -> asyncio.Semaphore:
        name = ""  # keyless, or not known yet: the shared limit
        if isinstance(target, ClusterNode):
            name = target.name
        elif target is None and self.command_flags.get(args[0]) in (None, SLOT_ID):
            try:
                if self._initialize:
                    await self.initialize()
                slot = await self._determine_slot(*args)
                name = self.nodes_manager.get_node_from_slot(slot).name
            except (RedisError, RedisClusterException):
                pass  # execute_command reports it properly
        limit = self._limits.get(name)
        if limit is None:
            size = self._per_node if name else self.KEYLESS_IN_FLIGHT
            limit = self._limits[name] = asyncio.Semaphore(size)
        return limit

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        limit = await self._limit_for(args, kwargs.get("target_nodes"))
        try:
            async with asyncio.timeout(self._pool_timeout):
                await limit.acquire()
        except TimeoutError:
            raise RedisConnectionError(
                f"no Redis Cluster connection free after {self._pool_timeout}s"
            ) from None
        try:
            async with asyncio.timeout(self.COMMAND_DEADLINE):
                return await super().execute_command(*args, **kwargs)
        except TimeoutError:
            raise RedisConnectionError(
                f"no answer from Redis Cluster within {self.COMMAND_DEADLINE:g} s"
            ) from None
        finally:
            limit.release()

    async def ping_any(self, timeout: float) -> None:
        """PING every primary at once: fine when one answers within `timeout` (a master
        down or hung takes only its own campaigns away). Keyless commands (PING, TIME) go
        to the client's default node; when that one did not answer, one that did takes
        its place, so they stop waiting on it."""
        await self.initialize()
        primaries = self.get_primaries()

        async def ping(node: ClusterNode) -> None:
            async with asyncio.timeout(timeout):
                await self.execute_command("PING", target_nodes=node)

        results = await asyncio.gather(*(ping(n) for n in primaries), return_exceptions=True)
        answered = [n for n, r in zip(primaries, results, strict=True) if r is None]
        if not answered:
            failures = [r for r in results if isinstance(r, BaseException)]
            raise failures[0] if failures else RedisConnectionError("Redis Cluster has no primary")
        if self.get_default_node() not in answered:
            self.set_default_node(answered[0])

    async def script_load(self, script: ScriptTextT) -> str:
        """SCRIPT LOAD on every primary that answers within SCRIPT_LOAD_WAIT.

        A script is run by EVALSHA on the node that owns its keys; a node without the
        script (restarted, promoted) answers NOSCRIPT and the script is loaded. redis-py
        loads it on every primary at once and fails if any one is down, which would fail
        requests for campaigns on healthy nodes because of a dead one. Here it fails only
        when no primary took the script, and a hung primary is not waited for: a live one
        loads a script in a millisecond (one that missed it loads it at its next NOSCRIPT).
        """
        await self.initialize()
        calls = [
            asyncio.ensure_future(self.execute_command("SCRIPT LOAD", script, target_nodes=node))
            for node in self.get_primaries()
        ]
        if not calls:
            raise RedisConnectionError("Redis Cluster has no primary")
        done, late = await asyncio.wait(calls, timeout=self.SCRIPT_LOAD_WAIT)
        for call in late:
            call.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        first_error: BaseException | None = None
        for call in calls:
            if call not in done:
                continue
            error = call.exception()
            if error is None:
                return str_if_bytes(call.result())
            first_error = first_error or error
        if first_error is not None:
            raise first_error
        raise RedisConnectionError(
            f"no Redis Cluster primary loaded a script within {self.SCRIPT_LOAD_WAIT:g} s"
        )


async def answers(client: RedisClient, timeout: float) -> None:
    """Whether Redis answers within `timeout` (raises if not): one server's PING, or a
    cluster's, where any primary answering will do (`QueueingRedisCluster.ping_any`)."""
    if isinstance(client, QueueingRedisCluster):
        await client.ping_any(timeout)
    else:
        await asyncio.wait_for(client.ping(), timeout)


def create_client(url: str, max_connections: int = 64) -> RedisClient:
    """A Redis Cluster client for `redis+cluster://` URLs, a one-server client otherwise."""
    if is_cluster_url(url):
        return create_cluster_client(url, max_connections)
    # Under a burst, requests queue for a connection instead of failing.
    pool = QueueingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=5,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=15,
        # After Redis restarts, every idle pooled connection is closed, and the pool's
        # check on checkout does not see it: the first command on each would fail. Retry
        # on a new connection, as the cluster client does (the gate's admissions use
        # their own connections and retry on their own, see ScriptLane). A time-out is
        # not retried: Redis hangs, and retrying it (a new connection's set-up retries
        # too, each step a time-out) held a command for up to 80 s instead of 5.
        retry=Retry(
            ExponentialWithJitterBackoff(base=0.05, cap=0.5),
            retries=3,
            supported_errors=(RedisConnectionError,),
        ),
    )
    pool.connection_class = _for_uvloop(pool.connection_class)
    return aioredis.Redis(connection_pool=pool)


def create_cluster_client(url: str, max_connections: int = 64) -> RedisCluster:
    nodes, kwargs = parse_cluster_url(url)
    options: dict[str, Any] = {
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
        "health_check_interval": 15,
        **kwargs,  # options given in the URL win
    }
    return QueueingRedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        in_flight=max_connections,
        pool_timeout=5.0,
        # Per node. The in-flight limits keep use below it; the margin is for keyless
        # commands and topology refreshes.
        max_connections=max_connections + QueueingRedisCluster.KEYLESS_IN_FLIGHT + 2,
        # Serve the slots that are up even when a master is down and its slots are not.
        require_full_coverage=False,
        # On a connection error or CLUSTERDOWN, refresh the slot map and retry a few
        # times (a failover moves slots); then fail, and the request gets `unavailable`.
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=3),
        **options,
    )
