"""A PostgreSQL that stalls — frozen by its host, its connections open and silent, so that
its own statement_timeout cannot fire — holds no request for longer than the client's
command timeout: IssueCoupon and GetCampaign answer `unavailable` within it, and once
PostgreSQL moves again the service serves on, exact. Stock whose commit is stuck in the
stall is not sold out to newcomers. A server stopped during a stall exits within seconds
(a private PostgreSQL, stopped with SIGSTOP; the shared one is never touched)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from connectrpc.errors import ConnectError

from coupon.adapters.postgres.ledger import RECORD_BOUND_SECONDS
from coupon.adapters.postgres.pool import COMMAND_TIMEOUT_SECONDS
from coupon.application.ports import STUCK
from coupon.gen.coupon.v1.coupon_connect import CouponServiceClient
from harness.client import connect_client, create_campaign, issue_retrying
from harness.private_postgres import PrivatePostgres, postgres_bindir
from harness.server import ServerProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        postgres_bindir() is None,
        reason="PostgreSQL's initdb is not installed: this test starts a PostgreSQL of its own",
    ),
]

RPC = "/coupon.v1.CouponService/"
# The command timeout, a pool acquire's 5 s, and room for a slow machine.
BOUND = COMMAND_TIMEOUT_SECONDS + 5 + 5


async def timed_post(url: str, rpc: str, body: dict[str, object]) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=120) as web:
        response = await web.post(f"{url}{RPC}{rpc}", json=body)
    return time.monotonic() - started, response


async def test_a_stalled_postgres_is_answered_unavailable_within_the_command_timeout(
    stallable: tuple[PrivatePostgres, ServerProcess],
) -> None:
    postgres, server = stallable
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=10, name="stall")
        first = await issue_retrying(client, campaign.id, "before")
        assert first.coupon is not None

        postgres.pause()
        try:
            answers = await asyncio.gather(
                timed_post(
                    server.url,
                    "IssueCoupon",
                    {"campaignId": campaign.id, "userId": "during"},
                ),
                timed_post(server.url, "GetCampaign", {"campaignId": campaign.id}),
            )
        finally:
            postgres.resume()
        for elapsed, response in answers:
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "unavailable"
            assert "retry-after-ms" in response.headers
            assert elapsed < BOUND, (elapsed, response.text)

        # PostgreSQL moves again: the service serves on, and stays exact.
        after = await issue_retrying(client, campaign.id, "after")
        during = await issue_retrying(client, campaign.id, "during")
        again = await issue_retrying(client, campaign.id, "before")
    assert after.coupon is not None and during.coupon is not None
    assert again.coupon is not None and again.coupon.code == first.coupon.code
    async with httpx.AsyncClient(timeout=30) as web:
        view = (
            await web.post(f"{server.url}{RPC}GetCampaign", json={"campaignId": campaign.id})
        ).json()
    coupons = view["coupons"]
    assert view["campaign"]["issuedCount"] == "3"
    assert sorted(c["userId"] for c in coupons) == ["after", "before", "during"]
    assert len({c["code"] for c in coupons}) == 3


async def test_each_request_is_answered_within_its_own_bound_through_a_long_stall(
    stallable: tuple[PrivatePostgres, ServerProcess],
) -> None:
    """PostgreSQL stalls for longer than two command timeouts while a new user asks every
    two seconds: each is answered `unavailable` within the bound from its own arrival, not
    after the stuck commits queued before it; a request with a Connect deadline, by then;
    /readyz says 503 within its own 2 s. Afterwards every user's retry gets one coupon."""
    postgres, server = stallable
    users = [f"user-{i}" for i in range(12)]
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=100, name="long stall")
        first = await issue_retrying(client, campaign.id, "before")
        assert first.coupon is not None

        async def ask(user: str, after: float) -> tuple[float, httpx.Response]:
            await asyncio.sleep(after)
            return await timed_post(
                server.url, "IssueCoupon", {"campaignId": campaign.id, "userId": user}
            )

        async def with_deadline(after: float) -> tuple[float, httpx.Response]:
            await asyncio.sleep(after)
            started = time.monotonic()
            async with httpx.AsyncClient(timeout=120) as web:
                response = await web.post(
                    f"{server.url}{RPC}IssueCoupon",
                    json={"campaignId": campaign.id, "userId": "hasty"},
                    headers={"connect-timeout-ms": "3000"},
                )
            return time.monotonic() - started, response

        async def ready(after: float) -> tuple[float, httpx.Response]:
            await asyncio.sleep(after)
            started = time.monotonic()
            async with httpx.AsyncClient(timeout=120) as web:
                response = await web.get(f"{server.url}/readyz")
            return time.monotonic() - started, response

        postgres.pause()
        try:
            answers, hasty, probes = await asyncio.gather(
                asyncio.gather(*(ask(user, 2.0 * i) for i, user in enumerate(users))),
                with_deadline(5.0),
                asyncio.gather(*(ready(after) for after in (3.0, 11.0))),
            )
        finally:
            postgres.resume()
        late = 2.0 * (len(users) - 1)
        assert late > 2 * COMMAND_TIMEOUT_SECONDS  # the last asked long after two timeouts
        for user, (elapsed, response) in zip(users, answers, strict=True):
            assert response.status_code == 503, (user, response.text)
            assert response.json()["code"] == "unavailable", (user, response.text)
            assert "retry-after-ms" in response.headers
            assert elapsed < RECORD_BOUND_SECONDS + 2.5, (user, elapsed, response.text)
        elapsed, response = hasty
        assert response.json()["code"] == "deadline_exceeded", response.text
        assert elapsed < 3.0 + 2.0, (elapsed, response.text)
        for elapsed, response in probes:
            assert response.status_code == 503, response.text
            assert "no answer" in response.json()["checks"]["postgres"], response.text
            assert elapsed < 2.0 + 0.8, (elapsed, response.text)

        # PostgreSQL moves again: each user holds one coupon, whatever was cut off.
        held = {u: await outcome(client, campaign.id, u) for u in [*users, "hasty", "before"]}
    assert all(len(code) == 10 for code in held.values()), held
    assert held["before"] == first.coupon.code
    _, got = await timed_post(server.url, "GetCampaign", {"campaignId": campaign.id})
    view = got.json()
    assert view["campaign"]["issuedCount"] == str(len(users) + 2)
    assert {c["userId"]: c["code"] for c in view["coupons"]} == held


async def outcome(client: CouponServiceClient, campaign_id: str, user: str) -> str:
    """The user's coupon code after retrying `unavailable`, or the final error's code."""
    try:
        reply = await issue_retrying(client, campaign_id, user, give_up_after=60)
    except ConnectError as exc:
        return exc.code.value
    assert reply.coupon is not None
    return reply.coupon.code


async def pending_longer_than_stuck(redis: aioredis.Redis, pending: str, user: str) -> None:
    """Until the gate has held `user`'s admission pending for longer than STUCK, by the
    gate's own clock (Redis's TIME, which scores the pending admissions)."""
    deadline = time.monotonic() + 60
    while (admitted_us := await redis.zscore(pending, user)) is None:
        assert time.monotonic() < deadline, f"{user} was never admitted"
        await asyncio.sleep(0.05)
    past_us = admitted_us + STUCK.total_seconds() * 1_000_000 + 200_000
    while True:
        seconds, micros = await redis.time()
        if seconds * 1_000_000 + micros > past_us:
            return
        await asyncio.sleep(0.05)


async def test_sold_out_behind_a_commit_stuck_in_a_stall_is_not_final(
    stallable: tuple[PrivatePostgres, ServerProcess],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    """The last coupon's commit hangs in a stalled PostgreSQL: a newcomer meanwhile is told
    to retry (the coupon may come back), not sold out; afterwards exactly one of the two
    holds it and the other is sold out."""
    postgres, server = stallable
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=1, name="stuck")
        postgres.pause()
        try:
            first = asyncio.ensure_future(
                timed_post(
                    server.url,
                    "IssueCoupon",
                    {"campaignId": campaign.id, "userId": "first"},
                )
            )
            # However late a busy machine admits it, the newcomer asks once the admission
            # has been pending longer than a commit takes.
            pending = f"{redis_prefix}:{{{campaign.id}}}:pending"
            await pending_longer_than_stuck(redis_client, pending, "first")
            _, newcomer = await timed_post(
                server.url, "IssueCoupon", {"campaignId": campaign.id, "userId": "second"}
            )
        finally:
            postgres.resume()
        await first
        assert newcomer.status_code == 503, newcomer.text
        assert newcomer.json()["code"] == "unavailable"
        # Told when the stuck admission's lease runs out, not the dependency's 1 s.
        assert "may come back" in newcomer.json()["message"], newcomer.text
        assert int(newcomer.headers["retry-after-ms"]) > 1_000
        answers = {u: await outcome(client, campaign.id, u) for u in ("first", "second")}
    assert sorted(len(a) == 10 for a in answers.values()) == [False, True], answers
    assert "resource_exhausted" in answers.values(), answers
    _, got = await timed_post(server.url, "GetCampaign", {"campaignId": campaign.id})
    assert got.json()["campaign"]["issuedCount"] == "1"


async def test_a_server_stopped_during_a_stall_exits_within_seconds(
    stallable: tuple[PrivatePostgres, ServerProcess],
) -> None:
    """The pool's close says goodbye on each connection and waits for the server to hang
    up: a stalled PostgreSQL held the exit for the command timeout (10 s, then a traceback
    and "Application shutdown failed"), on top of the 30 s the requests in flight may take,
    beyond the 40 s compose allows. Now it waits 2 s, then drops them; every coupon
    acknowledged was committed before its answer (I5)."""
    postgres, server = stallable
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=10, name="stall-stop")
        codes = {}
        for user in ("a", "b", "c"):
            reply = await issue_retrying(client, campaign.id, user)
            assert reply.coupon is not None
            codes[user] = reply.coupon.code
    postgres.pause()
    try:
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        status = await asyncio.to_thread(server.process.wait, 60)
        took = time.monotonic() - signalled
    finally:
        postgres.resume()
    log = server.log()
    print(f"stopped during a stall: exit {took:.1f} s after SIGTERM")
    assert status == 0, log
    assert took < 6, log  # the pool's close waits 2 s
    assert "PostgreSQL connections dropped at shutdown" in log, log
    assert "Traceback" not in log, log
    conn = await asyncpg.connect(postgres.url.rsplit("/", 1)[0] + "/coupon")
    try:
        rows = await conn.fetch(
            "SELECT user_id, code FROM coupons WHERE campaign_id = $1", uuid.UUID(campaign.id)
        )
    finally:
        await conn.close()
    assert {row["user_id"]: row["code"] for row in rows} == codes
