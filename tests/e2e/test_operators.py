"""The operators' RPCs against real server processes (PostgreSQL, Redis, two workers, an
admin token), through the generated Connect client: listing, the kill switch under a burst,
a user's coupons, the streamed export."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from coupon.domain.times import rfc3339
from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponServiceClient
from harness.burst import Outcome, drive
from harness.client import admin, all_coupons, connect_client, create_campaign, issue_retrying
from harness.server import ServerProcess
from harness.services import table_locked

TOKEN = "operators-token"
BURST_SECONDS = 60
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(server_env: dict[str, str]) -> Iterator[ServerProcess]:
    with ServerProcess(env={**server_env, "COUPON_ADMIN_TOKEN": TOKEN}, workers=2) as proc:
        yield proc


async def issue(client: CouponServiceClient, campaign_id: str, user: str) -> coupon_pb.Coupon:
    """As a well-behaved client: a busy machine may shed it (`unavailable`, nothing done)."""
    reply = await issue_retrying(client, campaign_id, user)
    assert reply.coupon is not None
    return reply.coupon


async def end(client: CouponServiceClient, campaign_id: str) -> coupon_pb.Campaign:
    reply = await end_reply(client, campaign_id)
    assert reply.campaign is not None
    return reply.campaign


async def end_reply(client: CouponServiceClient, campaign_id: str) -> coupon_pb.EndCampaignResponse:
    return await client.end_campaign(
        coupon_pb.EndCampaignRequest(campaign_id=campaign_id), headers=admin(TOKEN)
    )


async def test_every_operator_rpc_needs_the_admin_token(server: ServerProcess) -> None:
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=5, token=TOKEN)
        calls = [
            client.list_campaigns(coupon_pb.ListCampaignsRequest()),
            client.end_campaign(coupon_pb.EndCampaignRequest(campaign_id=campaign.id)),
        ]
        for call in calls:
            with pytest.raises(ConnectError) as refused:
                await call
            assert refused.value.code == Code.UNAUTHENTICATED
        with pytest.raises(ConnectError) as refused:
            stream = client.export_coupons(
                coupon_pb.ExportCouponsRequest(campaign_id=campaign.id),
                headers={"authorization": "Bearer wrong"},
            )
            async for _ in stream:
                pass
        assert refused.value.code == Code.UNAUTHENTICATED
        # Nothing was ended by the refused call.
        await issue(client, campaign.id, "still-open")


async def test_list_campaigns_newest_first_with_status_and_server_time(
    server: ServerProcess,
) -> None:
    async with connect_client(server.url) as client:
        made = []
        for i in range(3):
            made.append(await create_campaign(client, total=5, name=f"list-{i}", token=TOKEN))
            await asyncio.sleep(0.002)
        scheduled = await create_campaign(client, total=5, starts_in=3600, token=TOKEN)
        listed: list[coupon_pb.Campaign] = []
        token = ""
        while True:
            page = await client.list_campaigns(
                coupon_pb.ListCampaignsRequest(page_size=2, page_token=token),
                headers=admin(TOKEN),
            )
            assert page.server_time is not None
            listed.extend(page.campaigns)
            token = page.next_page_token
            if not token:
                break
        ids = [c.id for c in listed]
        assert ids == sorted(ids, reverse=True)
        # The run's database holds other tests' campaigns too, some with ids of their own
        # making (uuid4, which may sort after these): these four, newest first.
        ours = {scheduled.id, *(c.id for c in made)}
        assert [i for i in ids if i in ours] == [scheduled.id, *[c.id for c in reversed(made)]]
        only = await client.list_campaigns(
            coupon_pb.ListCampaignsRequest(
                status=coupon_pb.CampaignStatus.SCHEDULED, page_size=1000
            ),
            headers=admin(TOKEN),
        )
        assert scheduled.id in {c.id for c in only.campaigns}
        assert {c.status for c in only.campaigns} == {coupon_pb.CampaignStatus.SCHEDULED}
        with pytest.raises(ConnectError) as refused:
            await client.list_campaigns(
                coupon_pb.ListCampaignsRequest(page_token="not-a-token"), headers=admin(TOKEN)
            )
        assert refused.value.code == Code.INVALID_ARGUMENT
        assert "page_token" in refused.value.message


@pytest.mark.parametrize(
    ("status", "refused"),
    [
        (99, True),
        (-1, True),
        ("ACTIVE", True),
        ("campaign_status_active", True),
        ("CAMPAIGN_STATUS_SCHEDULED", False),
        (1, False),
        ("CAMPAIGN_STATUS_UNSPECIFIED", False),
        (0, False),
        (None, False),
    ],
    ids=repr,
)
def test_list_campaigns_in_json_refuses_a_status_it_does_not_know(
    server: ServerProcess, status: object, refused: bool
) -> None:
    """A status filter the enum does not have is refused in JSON as in binary, rather than
    read as no filter (which would list every campaign)."""
    for starts_at in ("2026-01-01T00:00:00Z", "2999-01-01T00:00:00Z"):  # active, scheduled
        made = httpx.post(
            f"{server.url}/coupon.v1.CouponService/CreateCampaign",
            json={"name": "by status", "totalCoupons": 5, "startsAt": starts_at},
            headers=admin(TOKEN),
            timeout=10,
        )
        assert made.status_code == 200, made.text
    response = httpx.post(
        f"{server.url}/coupon.v1.CouponService/ListCampaigns",
        json={"status": status, "pageSize": 1000},
        headers=admin(TOKEN),
        timeout=10,
    )
    if refused:
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid_argument"
        assert response.json()["message"].startswith("status: must be one of"), response.text
        return
    assert response.status_code == 200, response.text
    listed = {c["status"] for c in response.json().get("campaigns", [])}
    if status in (1, "CAMPAIGN_STATUS_SCHEDULED"):
        assert listed <= {"CAMPAIGN_STATUS_SCHEDULED"}
    else:
        assert len(listed) > 1  # no filter: campaigns of several statuses


async def test_get_campaign_tells_the_server_time(server: ServerProcess) -> None:
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=5, token=TOKEN)
        before = datetime.now(UTC)
        view = await client.get_campaign(
            coupon_pb.GetCampaignRequest(campaign_id=campaign.id), headers=admin(TOKEN)
        )
        after = datetime.now(UTC)
    assert view.server_time is not None
    # Redis's clock, on this machine: between the two readings of ours (plus rounding).
    server_time = view.server_time.to_datetime()
    assert (before - server_time).total_seconds() < 1 and (server_time - after).total_seconds() < 1


async def test_end_campaign_under_a_burst_issues_nothing_after_the_end(
    server: ServerProcess, pg_pool: asyncpg.Pool
) -> None:
    """Hundreds of concurrent IssueCoupon calls over two workers while EndCampaign runs:
    what was admitted before the end is issued, nothing after it, in PostgreSQL and in what
    the clients received; every request sent after the end's answer is refused."""
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=100_000, name="kill", token=TOKEN)
        requests = [(campaign.id, f"kill-{i}") for i in range(60_000)]
        outcomes: list[Outcome] = []
        burst = asyncio.ensure_future(
            drive(
                [server.url],
                requests,
                outcomes,
                concurrency=200,
                time_limit=BURST_SECONDS,
                retry_unavailable=20,
            )
        )
        deadline = time.monotonic() + BURST_SECONDS
        while sum(1 for o in outcomes if o.code) < 300 and not burst.done():
            await asyncio.sleep(0.05)
        reply = await end_reply(client, campaign.id)
        answered = datetime.now(UTC)
        assert reply.campaign is not None
        ended = reply.campaign
        # The burst goes on against the ended campaign until requests sent after the end's
        # answer have theirs (however long a busy machine takes to answer them).
        while (
            sum(1 for o in outcomes if o.sent_at > answered) < 100
            and not burst.done()
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        burst.cancel()
        await asyncio.gather(burst, return_exceptions=True)
        again = await end(client, campaign.id)

    assert ended.status == coupon_pb.CampaignStatus.ENDED
    assert ended.ended_at is not None
    end_at = ended.ended_at.to_datetime()
    assert again.ended_at == ended.ended_at and again.status == coupon_pb.CampaignStatus.ENDED

    rows = await pg_pool.fetch(
        "SELECT user_id, code, issued_at FROM coupons WHERE campaign_id = $1",
        uuid.UUID(campaign.id),
    )
    stored = {r["user_id"]: r for r in rows}
    assert rows, "coupons were issued before the end"
    assert max(r["issued_at"] for r in rows) < end_at
    # The count EndCampaign answered is final: requests admitted before the end and
    # committed after it were waited for.
    assert (ended.issued_count, reply.still_recording) == (len(rows), 0)
    recorded = await pg_pool.fetchval(
        "SELECT ended_at FROM campaigns WHERE id = $1", uuid.UUID(campaign.id)
    )
    assert recorded == end_at

    successes = [o for o in outcomes if o.code]
    assert successes and all(o.issued_at is not None and o.issued_at < end_at for o in successes)
    assert all(stored[o.user]["code"] == o.code for o in successes)  # I5: every ack stored
    # (Requests in flight when the burst was stopped end as canceled.)
    late = [o for o in outcomes if o.sent_at > answered and o.error != "canceled"]
    assert late, "the burst went on after the end"
    assert Counter(o.error for o in late) == Counter({"failed_precondition": len(late)})
    assert all("ended" in o.message for o in late)
    errors = Counter(o.error for o in outcomes if o.error)
    assert set(errors) <= {"failed_precondition", "canceled", "deadline_exceeded"}, errors


async def test_end_campaign_answers_the_final_count_of_commits_that_end_after_it(
    server: ServerProcess,
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    """Requests admitted before the end whose commits wait on a lock until after the end
    is recorded: EndCampaign's count includes them, as PostgreSQL's does afterwards."""
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=100, name="late commits", token=TOKEN)
        await issue(client, campaign.id, "warm")
        pending_key = f"{redis_prefix}:{{{campaign.id}}}:pending"
        # Inserts wait behind this lock; reads do not.
        async with table_locked(pg_pool, "coupons", "SHARE"):
            issues = [
                asyncio.ensure_future(issue(client, campaign.id, f"late-{i}")) for i in range(20)
            ]
            give_up = time.monotonic() + 30
            while await redis_client.zcard(pending_key) < 20:
                assert time.monotonic() < give_up, "the requests were not admitted"
                await asyncio.sleep(0.02)
            ending = asyncio.ensure_future(end_reply(client, campaign.id))
            recorded = "SELECT ended_at FROM campaigns WHERE id = $1"
            while await pg_pool.fetchval(recorded, uuid.UUID(campaign.id)) is None:
                assert time.monotonic() < give_up, "the end was not recorded"
                await asyncio.sleep(0.02)
        reply = await ending
        coupons = await asyncio.gather(*issues)
    stored = await pg_pool.fetchval(
        "SELECT count(*) FROM coupons WHERE campaign_id = $1", uuid.UUID(campaign.id)
    )
    assert reply.campaign is not None and reply.campaign.ended_at is not None
    assert all(c.issued_at.to_datetime() < reply.campaign.ended_at.to_datetime() for c in coupons)
    assert (reply.campaign.issued_count, reply.still_recording, stored) == (21, 0, 21)


async def test_issue_after_the_end_says_when_it_ended(server: ServerProcess) -> None:
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=5, token=TOKEN)
        await issue(client, campaign.id, "warm")  # both paths have cached the campaign
        ended = await end(client, campaign.id)
        assert ended.ended_at is not None
        stamp = rfc3339(ended.ended_at.to_datetime())
        for user in ("late-1", "late-2", "warm-again"):
            with pytest.raises(ConnectError) as refused:
                await issue(client, campaign.id, user)
            assert refused.value.code == Code.FAILED_PRECONDITION
            assert stamp in refused.value.message
        view = await client.get_campaign(
            coupon_pb.GetCampaignRequest(campaign_id=campaign.id), headers=admin(TOKEN)
        )
        assert view.campaign is not None
        assert view.campaign.status == coupon_pb.CampaignStatus.ENDED
        assert view.campaign.issued_count == 1


async def test_end_campaign_of_an_unknown_campaign_is_not_found(server: ServerProcess) -> None:
    async with connect_client(server.url) as client:
        with pytest.raises(ConnectError) as refused:
            await end(client, str(uuid.uuid4()))
        assert refused.value.code == Code.NOT_FOUND


async def test_a_users_coupons_across_campaigns_without_a_token(server: ServerProcess) -> None:
    user = f"shopper-{uuid.uuid4()}"
    async with connect_client(server.url) as client:
        made = []
        for _ in range(3):
            campaign = await create_campaign(client, total=5, token=TOKEN)
            await asyncio.sleep(0.002)
            made.append((campaign.id, (await issue(client, campaign.id, user)).code))
        first = await client.list_user_coupons(
            coupon_pb.ListUserCouponsRequest(user_id=user, page_size=2)
        )
        rest = await client.list_user_coupons(
            coupon_pb.ListUserCouponsRequest(
                user_id=user, page_size=2, page_token=first.next_page_token
            )
        )
        got = [(c.campaign_id, c.code) for c in [*first.coupons, *rest.coupons]]
        assert got == list(reversed(made)) and not rest.next_page_token
        with pytest.raises(ConnectError) as refused:
            await client.list_user_coupons(coupon_pb.ListUserCouponsRequest(user_id=""))
        assert refused.value.code == Code.INVALID_ARGUMENT and "user_id" in refused.value.message


async def test_export_streams_every_coupon_in_issue_order(server: ServerProcess) -> None:
    async with connect_client(server.url) as client:
        campaign = await create_campaign(client, total=12_000, name="export", token=TOKEN)
        requests = [(campaign.id, f"export-{i}") for i in range(12_000)]
        outcomes: list[Outcome] = []
        await drive([server.url], requests, outcomes, concurrency=100, retry_unavailable=200)
        _, listed = await all_coupons(client, campaign.id, TOKEN)
        exported: list[coupon_pb.Coupon] = []
        messages = 0
        async for message in client.export_coupons(
            coupon_pb.ExportCouponsRequest(campaign_id=campaign.id), headers=admin(TOKEN)
        ):
            messages += 1
            exported.extend(message.coupons)
    assert len(listed) == 12_000
    assert [(c.code, c.user_id) for c in exported] == [(c.code, c.user_id) for c in listed]
    assert messages > 1  # chunks, not one message holding everything


def test_export_over_plain_http_json(server: ServerProcess) -> None:
    """The Connect streaming protocol as any HTTP client speaks it: enveloped JSON messages,
    then an end-of-stream message."""
    with httpx.Client(timeout=10) as http:
        created = http.post(
            f"{server.url}/coupon.v1.CouponService/CreateCampaign",
            json={"name": "curl", "totalCoupons": "3", "startsAt": "2026-01-01T00:00:00Z"},
            headers={"authorization": f"Bearer {TOKEN}"},
        )
        campaign_id = created.json()["campaign"]["id"]
        for user in ("a", "b"):
            http.post(
                f"{server.url}/coupon.v1.CouponService/IssueCoupon",
                json={"campaignId": campaign_id, "userId": user},
            ).raise_for_status()
        body = json_envelope({"campaignId": campaign_id})
        response = http.post(
            f"{server.url}/coupon.v1.CouponService/ExportCoupons",
            content=body,
            headers={
                "content-type": "application/connect+json",
                "authorization": f"Bearer {TOKEN}",
            },
        )
    assert response.status_code == 200
    messages = list(read_envelopes(response.content))
    assert messages[-1][0] & 0x02  # end of stream
    assert messages[-1][1] == {}  # no error
    users = [c["userId"] for flags, m in messages[:-1] for c in m["coupons"]]
    assert users == ["a", "b"]


def json_envelope(message: dict[str, object]) -> bytes:
    import json

    data = json.dumps(message).encode()
    return b"\x00" + len(data).to_bytes(4, "big") + data


def read_envelopes(body: bytes) -> Iterator[tuple[int, dict[str, object]]]:
    import json

    while body:
        flags, size = body[0], int.from_bytes(body[1:5], "big")
        yield flags, json.loads(body[5 : 5 + size])
        body = body[5 + size :]


def test_dashboard_api_needs_the_admin_token(server: ServerProcess) -> None:
    api = f"{server.url}/dashboard/api/campaigns"
    created = httpx.post(
        f"{server.url}/coupon.v1.CouponService/CreateCampaign",
        json={"name": "watched", "totalCoupons": "3", "startsAt": "2026-01-01T00:00:00Z"},
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert created.status_code == 200, created.text
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        refused = httpx.get(api, headers=headers, timeout=10)
        assert refused.status_code == 401 and refused.json()["code"] == "unauthenticated"
    listed = httpx.get(api, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert listed.status_code == 200 and "campaigns" in listed.json()
    campaign_id = listed.json()["campaigns"][0]["id"]
    live = httpx.get(f"{api}/{campaign_id}", timeout=10)
    assert live.status_code == 401
    live = httpx.get(f"{api}/{campaign_id}", headers={"authorization": f"Bearer {TOKEN}"})
    assert live.status_code == 200
    view = live.json()
    assert view["campaign"]["id"] == campaign_id and len(view["seconds"]) == 60
    missing = httpx.get(f"{api}/{uuid.uuid4()}", headers={"authorization": f"Bearer {TOKEN}"})
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    # The page itself holds no data and needs no token.
    page = httpx.get(f"{server.url}/dashboard", timeout=10)
    assert page.status_code == 200 and "/dashboard/dashboard.js" in page.text


def test_dashboard_api_is_open_without_a_configured_token() -> None:
    server = ServerProcess(env={}, in_memory=True)
    try:
        server.wait_ready()
        listed = httpx.get(f"{server.url}/dashboard/api/campaigns", timeout=10)
        assert listed.status_code == 200
        script = httpx.get(f"{server.url}/dashboard/dashboard.js", timeout=10)
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    finally:
        server.stop()
