"""/metrics stays true when callers leave or a dependency hangs, through real server
processes and a PostgreSQL or Redis of the test's own (paused with SIGSTOP; the shared
ones are never touched):

* a coupon committed after its caller's deadline passed is counted as issued, once, and
  the request is counted `deadline_exceeded`;
* an ExportCoupons ended by its deadline midway is counted `deadline_exceeded`;
* requests queued behind an admission call that a hung Redis held up are told what that
  call was told (`unavailable`, Redis named, the dependency's retry hint), and counted as
  `unavailable`, not as the process being overloaded.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from coupon.gen.coupon.v1 import coupon_pb
from harness.client import connect_client, create_campaign, in_seconds, issue_retrying
from harness.private_postgres import PrivatePostgres
from harness.private_redis import PrivateRedis
from harness.server import ServerProcess
from harness.server import metric_value as metric
from tests.clients.h2client import H2Client, Response, grpc_frame, grpc_headers

pytestmark = pytest.mark.e2e

RPC = "/coupon.v1.CouponService/"
# The service's retry hint when a dependency failed (connect_service.DEPENDENCY_RETRY_MS).
DEPENDENCY_RETRY_MS = 1_000


def counts(server: ServerProcess, *wanted: tuple[str, dict[str, str]]) -> list[float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return [metric(text, name, **labels) for name, labels in wanted]


async def metric_reaches(server: ServerProcess, name: str, value: float, **labels: str) -> float:
    """The metric once it reaches `value` (or what it is after 30 s)."""
    give_up = time.monotonic() + 30
    while True:
        [found] = counts(server, (name, labels))
        if found >= value or time.monotonic() > give_up:
            return found
        await asyncio.sleep(0.05)


async def post(
    url: str, rpc: str, body: bytes, content_type: str, timeout_ms: int
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as web:
        return await web.post(
            f"{url}{RPC}{rpc}",
            content=body,
            headers={"content-type": content_type, "connect-timeout-ms": str(timeout_ms)},
        )


async def test_coupons_committed_after_their_callers_deadline_are_counted_once(
    stallable: tuple[PrivatePostgres, ServerProcess],
) -> None:
    """PostgreSQL stalls while four users ask with a 1-s deadline: each is answered
    `deadline_exceeded`, and each coupon is committed once PostgreSQL moves again. All five
    coupons are counted as issued, and every request by the code it was answered with."""
    postgres, server = stallable
    users = [f"hasty-{i}" for i in range(4)]
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=10, name="stall counting")
        first = await issue_retrying(client, campaign.id, "before")
        assert first.coupon is not None and not first.already_issued

        postgres.pause()
        try:
            answers = await asyncio.gather(
                *(
                    post(
                        server.url,
                        "IssueCoupon",
                        json.dumps({"campaignId": campaign.id, "userId": user}).encode(),
                        "application/json",
                        1000,
                    )
                    for user in users
                )
            )
        finally:
            postgres.resume()
        for user, answer in zip(users, answers, strict=True):
            assert answer.json()["code"] == "deadline_exceeded", (user, answer.text)

        # PostgreSQL moves again: each stalled commit goes through, and each user holds a
        # coupon nobody was told of.
        for user in users:
            give_up = time.monotonic() + 30
            while not (
                held := (
                    await client.list_user_coupons(coupon_pb.ListUserCouponsRequest(user_id=user))
                ).coupons
            ):
                assert time.monotonic() < give_up, f"{user} holds no coupon"
                await asyncio.sleep(0.05)
            assert [c.campaign_id for c in held] == [campaign.id]

    issued = await metric_reaches(server, "coupon_coupons_issued_total", 5, campaign_id=campaign.id)
    assert issued == 5
    issue = {"rpc": "IssueCoupon"}
    ok, late, answered = counts(
        server,
        ("coupon_rpc_requests_total", {**issue, "code": "ok"}),
        ("coupon_rpc_requests_total", {**issue, "code": "deadline_exceeded"}),
        ("coupon_rpc_duration_seconds_count", issue),
    )
    assert (ok, late, answered) == (1, 4, 5)


def test_an_export_its_deadline_ends_midway_is_counted_deadline_exceeded(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    """A gRPC client that never opens its window takes the stream's headers and no chunk:
    the server is midway, waiting to send, when the deadline passes. The export is counted
    `deadline_exceeded`, and timed."""
    with ServerProcess(env=server_env, log_dir=tmp_path) as server:
        with H2Client(server.port) as setup:
            made = setup.call(
                "CreateCampaign",
                coupon_pb.CreateCampaignRequest(
                    name="export midway", total_coupons=5, starts_at=in_seconds(-60)
                ),
                coupon_pb.CreateCampaignResponse,
            )
            campaign_id = made.campaign.id
            setup.call(
                "IssueCoupon",
                coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id="held"),
                coupon_pb.IssueCouponResponse,
            )
        body = grpc_frame(coupon_pb.ExportCouponsRequest(campaign_id=campaign_id))
        reader = H2Client(server.port, window=0)
        reader.sock.settimeout(30)
        try:
            timed = reader.conn.get_next_available_stream_id()
            reader.responses[timed] = Response()
            reader.conn.send_headers(
                timed,
                grpc_headers("ExportCoupons", (b"te", b"trailers"), (b"grpc-timeout", b"1000m")),
            )
            reader.send(timed, body)
            response = reader.responses[timed]
            while not response.headers:
                reader.read()  # the stream has begun: its chunk waits for the window
            [ended] = reader.wait(timed)
            assert ended.grpc_status == b"4" or ended.reset is not None, ended
        finally:
            reader.close()
        give_up = time.monotonic() + 30
        export = {"rpc": "ExportCoupons"}
        while True:
            found = counts(
                server,
                ("coupon_rpc_requests_total", {**export, "code": "deadline_exceeded"}),
                ("coupon_rpc_requests_total", {**export, "code": "canceled"}),
                ("coupon_rpc_duration_seconds_count", export),
                ("coupon_rpc_requests_total", {**export, "code": "ok"}),
            )
            if found[0] or time.monotonic() > give_up:
                break
            time.sleep(0.05)
    assert found == [1, 0, 1, 0]


async def test_requests_behind_a_call_a_hung_redis_held_get_the_dependency_s_answer(
    server_env: dict[str, str], private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """Redis hangs: the request whose admission call faces it and those that queued for the
    next call while it hung are all answered `unavailable` naming Redis, with the hint for a
    dependency that failed, and counted as `unavailable`; none is said to be turned away
    for load."""
    env = {**server_env, "REDIS_URL": private_redis.url, "COUPON_REDIS_PREFIX": "counting"}
    with ServerProcess(env=env, log_dir=tmp_path) as server:
        async with connect_client(server.url) as client:
            campaign = await create_campaign(client, total=10, name="hung gate")
            assert (await issue_retrying(client, campaign.id, "warm")).coupon is not None
        before = counts(
            server,
            ("coupon_issue_rejections_total", {"reason": "overloaded"}),
            ("coupon_issue_rejections_total", {"reason": "unavailable"}),
        )

        async def ask(user: str) -> httpx.Response:
            async with httpx.AsyncClient(timeout=60) as web:
                return await web.post(
                    f"{server.url}{RPC}IssueCoupon",
                    json={"campaignId": campaign.id, "userId": user},
                )

        private_redis.pause()
        try:
            facing = asyncio.ensure_future(ask("facing"))
            # The others come once the first one's call is out (its 500-ms deadline to
            # join a call is long past when that call is given up, 4.5 s after).
            await asyncio.sleep(0.3)
            behind = await asyncio.gather(*(ask(f"behind-{i}") for i in range(3)))
            answers = [await facing, *behind]
        finally:
            private_redis.resume()
        after = counts(
            server,
            ("coupon_issue_rejections_total", {"reason": "overloaded"}),
            ("coupon_issue_rejections_total", {"reason": "unavailable"}),
        )
    for answer in answers:
        body = answer.json()
        assert answer.status_code == 503, answer.text
        assert body["code"] == "unavailable" and "Redis" in body["message"], answer.text
        assert int(answer.headers["retry-after-ms"]) >= DEPENDENCY_RETRY_MS, answer.text
    assert after[0] == before[0], "none counted as overloaded"
    assert after[1] == before[1] + 4
