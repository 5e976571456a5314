"""CreateCampaign is safe to retry: a repeat with the same request_id answers the campaign
the first call created and creates nothing, over a real socket, against a real server (the
memory backend, and PostgreSQL/Redis with two worker processes)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponServiceClient
from harness.client import admin, connect_client, in_seconds
from harness.server import ServerProcess

TOKEN = "retry-token"
AUTH = admin(TOKEN)
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["memory", "postgres"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    env = {"COUPON_ADMIN_TOKEN": TOKEN}
    in_memory = request.param == "memory"
    if not in_memory:
        env.update(request.getfixturevalue("server_env"))
    # Two worker processes on PostgreSQL: concurrent repeats meet in the database.
    with ServerProcess(env=env, in_memory=in_memory, workers=1 if in_memory else 2) as proc:
        yield proc


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[CouponServiceClient]:
    async with connect_client(server.url) as c:
        yield c


def request(name: str, request_id: str, total: int = 3, **fields: object) -> object:
    values: dict[str, object] = {
        "name": name,
        "total_coupons": total,
        "starts_at": Timestamp(seconds=1_767_225_600, nanos=123_456_000),  # 2026-01-01
        "request_id": request_id,
    }
    values.update(fields)
    return coupon_pb.CreateCampaignRequest(**values)  # type: ignore[arg-type]


async def create(client: CouponServiceClient, message: object) -> coupon_pb.Campaign:
    response = await client.create_campaign(message, headers=AUTH)  # type: ignore[arg-type]
    assert response.campaign is not None
    return response.campaign


async def named(client: CouponServiceClient, name: str) -> list[coupon_pb.Campaign]:
    """Every campaign of that name, newest first."""
    found: list[coupon_pb.Campaign] = []
    token = ""
    while True:
        page = await client.list_campaigns(
            coupon_pb.ListCampaignsRequest(page_size=1000, page_token=token), headers=AUTH
        )
        found += [c for c in page.campaigns if c.name == name]
        token = page.next_page_token
        if not token:
            return found


def unique(what: str) -> str:
    return f"{what} {uuid.uuid4().hex[:12]}"


async def test_a_retried_create_answers_the_first_campaign_as_it_is_now(
    client: CouponServiceClient,
) -> None:
    name, request_id = unique("retried"), str(uuid.uuid4())
    first = await create(client, request(name, request_id, total=3))
    assert first.status == coupon_pb.CampaignStatus.ACTIVE and first.issued_count == 0
    issued = await client.issue_coupon(
        coupon_pb.IssueCouponRequest(campaign_id=first.id, user_id="u0")
    )
    assert issued.coupon is not None

    # The same request again, and with the start's nanoseconds beyond the microsecond,
    # which are not kept: the same campaign, as it is now.
    again = await create(client, request(name, request_id, total=3))
    finer = await create(
        client,
        request(
            name, request_id, total=3, starts_at=Timestamp(seconds=1_767_225_600, nanos=123_456_789)
        ),
    )
    for answer in (again, finer):
        assert answer.id == first.id and answer.created_at == first.created_at
        assert answer.issued_count == 1 and answer.total_coupons == 3

    # The stock is one stock: total + 1 users across both answers' ids, one refused.
    outcomes = []
    for n, campaign_id in enumerate([first.id, again.id, first.id], start=1):
        try:
            await client.issue_coupon(
                coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id=f"u{n}")
            )
            outcomes.append("issued")
        except ConnectError as exc:
            outcomes.append(exc.code.value)
    assert outcomes == ["issued", "issued", "resource_exhausted"]
    sold = await create(client, request(name, request_id, total=3))
    assert sold.status == coupon_pb.CampaignStatus.SOLD_OUT and sold.issued_count == 3
    assert [c.id for c in await named(client, name)] == [first.id]


@pytest.mark.parametrize(
    ("changed", "named_fields"),
    [
        ({"name": "x"}, "name"),
        ({"total": 4}, "total_coupons"),
        ({"starts_at": Timestamp(seconds=1_767_225_600, nanos=124_000_000)}, "starts_at"),
        ({"ends_at": in_seconds(3600)}, "ends_at"),
    ],
    ids=["name", "total_coupons", "starts_at", "ends_at"],
)
async def test_the_same_request_id_for_another_campaign_is_already_exists(
    client: CouponServiceClient, changed: dict[str, object], named_fields: str
) -> None:
    name, request_id = unique("mismatch"), str(uuid.uuid4())
    first = await create(client, request(name, request_id))
    fields: dict[str, object] = {"name": name, "request_id": request_id, **changed}
    with pytest.raises(ConnectError) as caught:
        await create(client, request(**fields))  # type: ignore[arg-type]
    assert caught.value.code is Code.ALREADY_EXISTS
    message = caught.value.message
    assert message.startswith("request_id: ") and first.id in message, message
    assert f"different {named_fields}" in message, message
    assert [c.id for c in await named(client, name)] == [first.id]
    if "name" in changed:
        assert await named(client, str(changed["name"])) == []


async def test_concurrent_creates_with_one_request_id_make_one_campaign(
    server: ServerProcess,
) -> None:
    """Many clients (connections spread over the worker processes) send one create at
    once: every answer is the one campaign."""
    name, request_id = unique("concurrent"), str(uuid.uuid4())

    async def one_client() -> list[str]:
        async with connect_client(server.url) as own:
            answers = await asyncio.gather(
                *(create(own, request(name, request_id, total=100)) for _ in range(4))
            )
            return [a.id for a in answers]

    ids = [i for batch in await asyncio.gather(*(one_client() for _ in range(12))) for i in batch]
    assert len(ids) == 48 and len(set(ids)) == 1
    async with connect_client(server.url) as own:
        assert [c.id for c in await named(own, name)] == ids[:1]


async def test_different_request_ids_and_none_each_create(client: CouponServiceClient) -> None:
    name = unique("distinct")
    ids = [
        (await create(client, request(name, request_id))).id
        for request_id in (str(uuid.uuid4()), str(uuid.uuid4()), "", "")
    ]
    assert len(set(ids)) == 4
    assert sorted(c.id for c in await named(client, name)) == sorted(ids)


@pytest.mark.parametrize(
    ("request_id", "reason"),
    [
        ("x" * 129, "request_id: must be at most 128 characters (got 129)"),
        ("line\nbreak", "request_id: must not contain control characters (got '\\n' at 4)"),
        ("nul\x00", "request_id: must not contain NUL characters"),
        ("   ", "request_id: must not be blank"),
        ("\u200b", "request_id: must not be blank"),
    ],
    ids=["too-long", "newline", "nul", "spaces", "zero-width"],
)
async def test_a_bad_request_id_is_invalid_argument_and_creates_nothing(
    client: CouponServiceClient, request_id: str, reason: str
) -> None:
    name = unique("bad request id")
    with pytest.raises(ConnectError) as caught:
        await create(client, request(name, request_id))
    assert caught.value.code is Code.INVALID_ARGUMENT
    assert caught.value.message == reason
    assert await named(client, name) == []
    # 128 characters, of any script, are a request id.
    longest = (uuid.uuid4().hex + "가" * 128)[:128]
    first = await create(client, request(name, longest))
    assert (await create(client, request(name, longest))).id == first.id
