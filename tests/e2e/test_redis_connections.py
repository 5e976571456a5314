"""A burst on many campaigns at once leaves the Redis connection pool as it found it: the
process stays ready, and a campaign created afterwards issues at once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from harness.client import connect_client, create_campaign
from harness.raw_http import issue_request, open_connection, read_response
from harness.server import ServerProcess

pytestmark = pytest.mark.e2e

# More campaigns issuing at once than the worker has Redis connections (64): each has its
# own admission batch in flight.
CAMPAIGNS = 90
PER_CAMPAIGN = 6


@pytest.fixture
def server(server_env: dict[str, str]) -> Iterator[ServerProcess]:
    with ServerProcess(env=server_env, workers=1) as proc:
        yield proc


async def issue(url: str, campaign_id: str, user: str, seen: Counter[str]) -> None:
    reader, writer = await open_connection(url)
    try:
        writer.write(issue_request(campaign_id, user, close=True))
        await writer.drain()
        body = (await asyncio.wait_for(read_response(reader), 30)).json()
        seen["issued" if "coupon" in body else f"{body['code']}: {body['message']}"] += 1
    finally:
        writer.close()


async def test_a_burst_on_many_campaigns_leaves_redis_usable(server: ServerProcess) -> None:
    async with connect_client(server.url) as client:
        campaigns = await asyncio.gather(
            *(create_campaign(client, total=PER_CAMPAIGN - 1) for _ in range(CAMPAIGNS))
        )
        seen: Counter[str] = Counter()
        await asyncio.gather(
            *(
                issue(server.url, campaign.id, f"user-{i}", seen)
                for campaign in campaigns
                for i in range(PER_CAMPAIGN)
            )
        )
        assert seen["unavailable: Redis is unavailable"] == 0, seen

        async with httpx.AsyncClient() as http:
            ready = await http.get(f"{server.url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text

        started = time.monotonic()
        after = await create_campaign(client, total=1)
        late: Counter[str] = Counter()
        await issue(server.url, after.id, "late", late)
        assert late == Counter(issued=1), late
        assert time.monotonic() - started < 3
    assert "No connection available" not in server.log(tail=1_000_000)
