"""The flash crowd, against real server processes over real sockets: what the service sheds
it leaves untouched, holders always get their coupons, and "sold out" answered from memory
lasts no longer than it is true and costs no Redis round trip."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from importlib import resources

import asyncpg
import pytest
import redis.asyncio as aioredis
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from coupon.adapters.redis.client import create_client
from coupon.adapters.redis.stock_gate import RedisStockGate
from coupon.gen.coupon.v1 import coupon_pb
from harness.client import connect_client, create_campaign, issue_retrying
from harness.private_redis import PrivateRedis
from harness.raw_http import issue_request, open_connection, read_response
from harness.server import ServerProcess

pytestmark = pytest.mark.e2e
LEASE = 1.0


@pytest.fixture(scope="module")
def server(server_env: dict[str, str]) -> Iterator[ServerProcess]:
    """A server that works on at most 4 IssueCoupon requests at once, with a short lease."""
    with ServerProcess(
        env={
            **server_env,
            "COUPON_MAX_IN_FLIGHT": "4",
            "COUPON_PENDING_LEASE_SECONDS": str(LEASE),
        }
    ) as proc:
        yield proc


async def raw_issue(url: str, campaign_id: str, user: str) -> tuple[int, dict[str, str]]:
    """One request on its own connection, no retry: (HTTP status, headers)."""
    reader, writer = await open_connection(url)
    try:
        writer.write(issue_request(campaign_id, user, close=True))
        response = await read_response(reader)
    finally:
        writer.close()
    return response.status, response.headers


async def test_requests_turned_away_issue_nothing_and_leave_nothing_pending(
    server: ServerProcess, server_env: dict[str, str], pg_pool: asyncpg.Pool
) -> None:
    async with connect_client(server.url) as client:
        c = (await create_campaign(client, total=1_000_000, name="shed")).id
    users = [f"crowd-{i}" for i in range(400)]
    answers = await asyncio.gather(*(raw_issue(server.url, c, u) for u in users))
    statuses = Counter(status for status, _ in answers)
    assert statuses[200] > 0 and statuses[503] > 0, statuses
    assert set(statuses) <= {200, 503}, statuses
    for status, headers in answers:
        if status == 503:
            assert int(headers["retry-after-ms"]) > 0
    served = {u for u, (status, _) in zip(users, answers, strict=True) if status == 200}
    rows = await pg_pool.fetch("SELECT user_id FROM coupons WHERE campaign_id = $1", uuid.UUID(c))
    assert {r["user_id"] for r in rows} == served  # the shed issued nothing
    redis = aioredis.Redis.from_url(server_env["REDIS_URL"])
    try:
        tag = f"{server_env['COUPON_REDIS_PREFIX']}:{{{c}}}"
        deadline = time.monotonic() + 5
        while await redis.zcard(f"{tag}:pending") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # confirms ride with the next call
        assert await redis.zcard(f"{tag}:pending") == 0
        known = {u.decode() for u in await redis.hkeys(f"{tag}:users")}
        assert known == served  # no admission left behind for a shed request
    finally:
        await redis.aclose()


async def test_holders_get_their_coupons_during_and_after_the_sell_out(
    server: ServerProcess,
) -> None:
    async with connect_client(server.url) as client:
        c = (await create_campaign(client, total=50, name="holders")).id
        users = [f"u{i}" for i in range(120)]

        async def ask(user: str) -> str:
            try:
                reply = await issue_retrying(client, c, user)
            except ConnectError as exc:
                assert exc.code is Code.RESOURCE_EXHAUSTED, exc
                return "sold out"
            assert reply.coupon is not None
            return reply.coupon.code

        # Everyone asks, twice at once: during the sell-out.
        first = await asyncio.gather(*(ask(u) for u in users * 2))
        codes = {u: code for u, code in zip(users * 2, first, strict=True) if code != "sold out"}
        assert len(codes) == 50
        assert all(first[i] == first[i + len(users)] for i in range(len(users)))
        # After it, three more rounds: holders always get theirs, the others never anything.
        for _ in range(3):
            again = await asyncio.gather(*(ask(u) for u in users))
            for user, code in zip(users, again, strict=True):
                assert code == codes.get(user, "sold out")


async def test_sold_out_from_memory_ends_when_stock_comes_back(
    server: ServerProcess, server_env: dict[str, str]
) -> None:
    """A process that died after admitting "ghost" leaves its slot pending; the campaign
    looks sold out until the lease settles it, and the slot is issued again soon after
    (the memory of "sold out" does not outlive it)."""
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=3, name="comes back")
        c = campaign.id
        redis = create_client(server_env["REDIS_URL"])
        try:
            dead_process = RedisStockGate(redis, prefix=server_env["COUPON_REDIS_PREFIX"])
            ghost = await dead_process.admit(c, "ghost")  # admitted, never recorded
            assert ghost.slot > 0
            await dead_process.close()
        finally:
            await redis.aclose()
        await issue_retrying(client, c, "a")
        await issue_retrying(client, c, "b")
        started = time.monotonic()
        answers: Counter[str] = Counter()
        while True:
            try:
                reply = await client.issue_coupon(
                    coupon_pb.IssueCouponRequest(campaign_id=c, user_id="late")
                )
            except ConnectError as exc:
                answers[exc.code.value] += 1
                assert time.monotonic() - started < LEASE + 4, answers
                await asyncio.sleep(0.05)
                continue
            break
        assert reply.coupon is not None and not reply.already_issued
        assert answers["resource_exhausted"] > 0  # sold out while the ghost held the slot


async def test_refusals_from_memory_cost_no_redis_round_trip(
    server_env: dict[str, str],
) -> None:
    """After the sell-out the crowd that keeps asking is refused from memory: while the
    memory holds, none of its refusals reaches the gate, and a holder still does. (How long
    a memory holds and how it is renewed is checked against a clock of the test's own, in
    tests/unit/test_refusals.py.)"""
    private = PrivateRedis()
    # Long enough for the crowd to be done well before the memory's renewal is due, from
    # its second half on, however slowly a busy machine serves it.
    memory = 60.0
    proc = ServerProcess(
        env={
            **server_env,
            "REDIS_URL": private.url,
            "COUPON_REFUSAL_MEMORY_MS": str(int(memory * 1000)),
        }
    )
    admin = aioredis.Redis.from_url(private.url)
    try:
        proc.wait_ready()
        async with connect_client(proc.url) as client:
            c = (await create_campaign(client, total=10, name="memory")).id
            for i in range(10):
                await issue_retrying(client, c, f"holder-{i}")
            async with _AdmissionCalls(admin) as admissions:
                sold_out_at = time.monotonic()
                with pytest.raises(ConnectError):
                    await issue_retrying(client, c, "first-refused")
                # The holders are read in the background; until then a refusal asks the
                # gate. Once a refusal is answered without asking, the memory is in use.
                probes = 0
                while True:
                    before = await admissions.count()
                    status, _ = await raw_issue(proc.url, c, f"probe-{probes}")
                    assert status == 429, status
                    if await admissions.count() == before:
                        break
                    probes += 1
                    assert time.monotonic() - sold_out_at < 20, (
                        f"{probes} refusals in a row asked the gate: none from memory"
                    )
                    await asyncio.sleep(0.05)
                before = await admissions.count()
                refused = batches = 0
                # Batches only while the memory is in its first half, with room to spare
                # (a slow machine sends fewer of them).
                while batches < 20 and time.monotonic() - sold_out_at < memory / 2 - 10:
                    results = await asyncio.gather(
                        *(raw_issue(proc.url, c, f"crowd-{batches}-{i}") for i in range(100)),
                    )
                    refused += sum(status == 429 for status, _ in results)
                    batches += 1
                crowd = await admissions.count() - before
                held = await issue_retrying(client, c, "holder-3")
                holder = await admissions.count() - before - crowd
        assert batches > 0 and refused == 100 * batches, (batches, refused)
        assert crowd == 0, f"{crowd} of {refused} refusals reached the gate"
        # A holder is never answered from memory: the gate is asked, and the coupon is theirs.
        assert held.already_issued and held.coupon is not None
        assert holder == 1, holder
    finally:
        await admin.aclose()
        proc.stop()
        private.close()


class _AdmissionCalls:
    """Counts the admission script's calls Redis runs (MONITOR sees every command), apart
    from the other scripts the server runs on its own (live figures, settling)."""

    SHA = hashlib.sha1(
        resources.files("coupon.adapters.redis").joinpath("lua", "admit.lua").read_bytes()
    ).hexdigest()

    def __init__(self, admin: aioredis.Redis) -> None:
        self._admin = admin
        self._monitor = admin.monitor()
        self._watching: asyncio.Task[None] | None = None
        self._calls = 0
        self._marks: dict[str, asyncio.Future[int]] = {}

    async def __aenter__(self) -> _AdmissionCalls:
        await self._monitor.__aenter__()  # MONITOR acknowledged: it sees what follows
        self._watching = asyncio.create_task(self._watch())
        await self.count()
        return self

    async def count(self) -> int:
        """The admission calls Redis has run so far, counted once the watcher has seen a
        command sent now: MONITOR reports commands in the order Redis runs them, so every
        call that came before (say, for a request already answered) is in the count."""
        mark = f"admission-calls-{len(self._marks)}"
        seen = self._marks[mark] = asyncio.get_running_loop().create_future()
        await self._admin.echo(mark)
        return await asyncio.wait_for(seen, 60)

    async def _watch(self) -> None:
        async for command in self._monitor.listen():
            words = command["command"].split()
            if words[:2] == ["EVALSHA", self.SHA] or words[:1] == ["EVAL"]:
                self._calls += 1
            elif words[:1] == ["ECHO"] and len(words) == 2 and words[1] in self._marks:
                self._marks[words[1]].set_result(self._calls)

    async def __aexit__(self, *exc: object) -> None:
        assert self._watching is not None
        self._watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watching
        await self._monitor.__aexit__(*exc)
