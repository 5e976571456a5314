"""Every RPC and every error code of the API, through the generated Connect client over
HTTP, against a real server process — with the memory backend and with PostgreSQL/Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from coupon.domain.codes import is_well_formed
from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponServiceClient
from harness.client import (
    admin,
    all_coupons,
    connect_client,
    create_campaign,
    in_seconds,
    issue_retrying,
    ts,
)
from harness.raw_http import head
from harness.server import ServerProcess

TOKEN = "s3cret-admin-token"
AUTH = admin(TOKEN)
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["memory", "postgres"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    env = {"COUPON_ADMIN_TOKEN": TOKEN}
    if request.param == "postgres":
        env.update(request.getfixturevalue("server_env"))
    with ServerProcess(env=env, in_memory=request.param == "memory") as proc:
        yield proc


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[CouponServiceClient]:
    async with connect_client(server.url) as c:
        yield c


async def create(
    client: CouponServiceClient, total: int = 3, starts_in: float = -1, **kw: object
) -> coupon_pb.Campaign:
    return await create_campaign(
        client, total=total, starts_in=starts_in, name="launch", token=TOKEN, **kw
    )


async def error_of(work: object) -> ConnectError:
    with pytest.raises(ConnectError) as caught:
        await work  # type: ignore[misc]
    return caught.value


async def test_create_campaign_returns_the_campaign(client: CouponServiceClient) -> None:
    starts = datetime.now(UTC) + timedelta(hours=1)
    ends = starts + timedelta(hours=2)
    response = await client.create_campaign(
        coupon_pb.CreateCampaignRequest(
            name="봄 세일", total_coupons=1000, starts_at=ts(starts), ends_at=ts(ends)
        ),
        headers=AUTH,
    )
    c = response.campaign
    assert c is not None and c.id and c.name == "봄 세일"
    assert c.total_coupons == 1000 and c.issued_count == 0
    assert c.starts_at is not None and c.starts_at.to_datetime() == starts.replace(
        microsecond=starts.microsecond
    )
    assert c.ends_at is not None and c.created_at is not None
    assert c.status == coupon_pb.CampaignStatus.SCHEDULED


async def test_issue_then_repeat_returns_the_same_coupon(client: CouponServiceClient) -> None:
    c = await create(client)
    first = await client.issue_coupon(
        coupon_pb.IssueCouponRequest(campaign_id=c.id, user_id="alice")
    )
    again = await client.issue_coupon(
        coupon_pb.IssueCouponRequest(campaign_id=c.id, user_id="alice")
    )
    assert first.coupon is not None and again.coupon is not None
    assert not first.already_issued and again.already_issued
    assert again.coupon.code == first.coupon.code
    assert is_well_formed(first.coupon.code) and len(first.coupon.code) <= 10
    assert first.coupon.campaign_id == c.id and first.coupon.user_id == "alice"


async def test_user_ids_are_compared_exactly_as_sent(client: CouponServiceClient) -> None:
    # The proto's promise: no case folding, no Unicode normalization.
    c = await create(client, total=10)
    users = [
        "Jos\u00e9",
        "Jose\u0301",
        "jos\u00e9",
        "\ud64d\uae38\ub3d9",
        "\u1112\u1169\u11bc\u1100\u1175\u11af\u1103\u1169\u11bc",
    ]
    answers = [
        await client.issue_coupon(coupon_pb.IssueCouponRequest(campaign_id=c.id, user_id=u))
        for u in users
    ]
    assert [a.already_issued for a in answers] == [False] * len(users)
    assert [a.coupon.user_id for a in answers] == users
    assert len({a.coupon.code for a in answers}) == len(users)


async def test_get_campaign_pages_through_issued_coupons(client: CouponServiceClient) -> None:
    c = await create(client, total=5)
    codes = []
    for user in ("a", "b", "c", "d"):
        r = await client.issue_coupon(coupon_pb.IssueCouponRequest(campaign_id=c.id, user_id=user))
        assert r.coupon is not None
        codes.append(r.coupon.code)
    page = await client.get_campaign(
        coupon_pb.GetCampaignRequest(campaign_id=c.id, page_size=3), headers=AUTH
    )
    assert [x.code for x in page.coupons] == codes[:3] and page.next_page_token
    rest = await client.get_campaign(
        coupon_pb.GetCampaignRequest(
            campaign_id=c.id, page_size=3, page_token=page.next_page_token
        ),
        headers=AUTH,
    )
    assert [x.code for x in rest.coupons] == codes[3:] and rest.next_page_token == ""
    assert rest.campaign is not None and rest.campaign.issued_count == 4
    assert rest.campaign.status == coupon_pb.CampaignStatus.ACTIVE


async def test_sold_out_is_resource_exhausted(client: CouponServiceClient) -> None:
    c = await create(client, total=1)
    await client.issue_coupon(coupon_pb.IssueCouponRequest(campaign_id=c.id, user_id="a"))
    err = await error_of(
        client.issue_coupon(coupon_pb.IssueCouponRequest(campaign_id=c.id, user_id="b"))
    )
    assert err.code == Code.RESOURCE_EXHAUSTED
    _, coupons = await all_coupons(client, c.id, TOKEN)
    assert len(coupons) == 1
    campaign, _ = await all_coupons(client, c.id, TOKEN)
    assert campaign.status == coupon_pb.CampaignStatus.SOLD_OUT


async def test_before_start_is_failed_precondition_with_the_start(
    client: CouponServiceClient,
) -> None:
    c = await create(client, starts_in=3600)
    err = await error_of(
        client.issue_coupon(coupon_pb.IssueCouponRequest(campaign_id=c.id, user_id="a"))
    )
    assert err.code == Code.FAILED_PRECONDITION
    assert c.starts_at is not None
    # The time as the API's JSON writes every Timestamp: RFC 3339 with Z, to the microsecond.
    start = c.starts_at.to_datetime().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert err.message == f"campaign has not started yet: it starts at {start}"


async def test_after_end_is_failed_precondition(client: CouponServiceClient) -> None:
    c = await create(client, starts_in=-5, ends_at=in_seconds(0.3))

    await asyncio.sleep(0.5)
    err = await error_of(
        client.issue_coupon(coupon_pb.IssueCouponRequest(campaign_id=c.id, user_id="a"))
    )
    assert err.code == Code.FAILED_PRECONDITION and "ended" in err.message


async def test_get_campaign_counts_the_coupons_it_lists_while_they_are_issued(
    server: ServerProcess, client: CouponServiceClient
) -> None:
    """The issued count and the coupons of one answer are read at one moment: a page
    that lists them all says exactly how many there are, also mid-burst."""
    total = 1500
    c = await create(client, total=total)
    users = iter(range(total))

    async def issue_some() -> None:
        async with connect_client(server.url) as own:
            for user in users:
                await own.issue_coupon(
                    coupon_pb.IssueCouponRequest(campaign_id=c.id, user_id=f"u{user}")
                )

    issuing = asyncio.gather(*(issue_some() for _ in range(32)))
    seen: list[tuple[int, int]] = []
    try:
        while not issuing.done():
            page = await client.get_campaign(
                coupon_pb.GetCampaignRequest(campaign_id=c.id, page_size=10_000), headers=AUTH
            )
            assert page.campaign is not None and not page.next_page_token
            seen.append((page.campaign.issued_count, len(page.coupons)))
    finally:
        await issuing
    mid_burst = [pair for pair in seen if 0 < pair[1] < total]
    assert mid_burst, seen
    assert all(count == listed for count, listed in seen), seen


async def test_unknown_campaign_is_not_found(client: CouponServiceClient) -> None:
    missing = "0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50"
    err = await error_of(
        client.issue_coupon(coupon_pb.IssueCouponRequest(campaign_id=missing, user_id="a"))
    )
    assert err.code == Code.NOT_FOUND
    err = await error_of(
        client.get_campaign(coupon_pb.GetCampaignRequest(campaign_id=missing), headers=AUTH)
    )
    assert err.code == Code.NOT_FOUND


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"total_coupons": 0}, "total_coupons"),
        ({"total_coupons": 10_000_001}, "total_coupons"),
        ({"starts_at": None}, "starts_at"),
        ({"ends_at": "before_start"}, "ends_at"),
    ],
)
async def test_bad_campaign_fields_are_invalid_argument_naming_the_field(
    client: CouponServiceClient, request_kw: dict[str, object], field: str
) -> None:
    fields: dict[str, object] = {
        "name": "ok",
        "total_coupons": 10,
        "starts_at": in_seconds(60),
    }
    fields.update(request_kw)
    if fields.get("ends_at") == "before_start":
        fields["ends_at"] = in_seconds(30)
    err = await error_of(
        client.create_campaign(coupon_pb.CreateCampaignRequest(**fields), headers=AUTH)  # type: ignore[arg-type]
    )
    assert err.code == Code.INVALID_ARGUMENT
    assert err.message.startswith(f"{field}: ")


async def test_times_are_kept_to_the_microsecond_and_said_so_when_that_decides(
    client: CouponServiceClient,
) -> None:
    """Nanoseconds beyond the microsecond are dropped, as the proto says; an end that only
    nanoseconds put after the start is refused with a message that says why."""
    seconds = int(datetime.now(UTC).timestamp()) + 3600

    def window(start_ns: int, end_ns: int) -> coupon_pb.CreateCampaignRequest:
        return coupon_pb.CreateCampaignRequest(
            name="ns",
            total_coupons=1,
            starts_at=Timestamp(seconds=seconds, nanos=start_ns),
            ends_at=Timestamp(seconds=seconds, nanos=end_ns),
        )

    kept = await client.create_campaign(window(123_456_789, 123_457_000), headers=AUTH)
    assert kept.campaign is not None and kept.campaign.starts_at is not None
    assert kept.campaign.starts_at.nanos == 123_456_000
    err = await error_of(client.create_campaign(window(0, 1), headers=AUTH))
    assert err.code == Code.INVALID_ARGUMENT
    assert err.message.startswith("ends_at: must be after starts_at")
    assert "kept to the microsecond" in err.message


@pytest.mark.parametrize(
    ("campaign_id", "user_id", "field"),
    [
        ("", "alice", "campaign_id"),
        ("nope", "alice", "campaign_id"),
        ("0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50", "", "user_id"),
        ("0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50", "u" * 129, "user_id"),
        ("0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50", " ", "user_id"),
        ("0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50", "\t\n", "user_id"),
        ("0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50", "a\tb", "user_id"),
        ("0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50", "\x1b[31mred", "user_id"),
        ("0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50", "a\x7f", "user_id"),
        ("0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50", "a\x85", "user_id"),
        ("0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50", "\u200b", "user_id"),  # shows nothing
        ("0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50", "\u3164 \ufeff", "user_id"),
    ],
)
async def test_bad_issue_fields_are_invalid_argument_naming_the_field(
    client: CouponServiceClient, campaign_id: str, user_id: str, field: str
) -> None:
    err = await error_of(
        client.issue_coupon(coupon_pb.IssueCouponRequest(campaign_id=campaign_id, user_id=user_id))
    )
    assert err.code == Code.INVALID_ARGUMENT and err.message.startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("page_size", "page_token", "field"),
    [(-1, "", "page_size"), (10_001, "", "page_size"), (10, "bogus", "page_token")],
)
async def test_bad_page_fields_are_invalid_argument(
    client: CouponServiceClient, page_size: int, page_token: str, field: str
) -> None:
    c = await create(client)
    err = await error_of(
        client.get_campaign(
            coupon_pb.GetCampaignRequest(
                campaign_id=c.id, page_size=page_size, page_token=page_token
            ),
            headers=AUTH,
        )
    )
    assert err.code == Code.INVALID_ARGUMENT and err.message.startswith(f"{field}: ")


@pytest.mark.parametrize(
    "headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}]
)
async def test_admin_rpcs_without_the_token_are_unauthenticated(
    client: CouponServiceClient, headers: dict[str, str]
) -> None:
    err = await error_of(
        client.create_campaign(
            coupon_pb.CreateCampaignRequest(name="x", total_coupons=1, starts_at=in_seconds(1)),
            headers=headers,
        )
    )
    assert err.code == Code.UNAUTHENTICATED
    err = await error_of(
        client.get_campaign(
            coupon_pb.GetCampaignRequest(campaign_id="0192f5e0-7c1a-7b3e-9d2a-5b1c2d3e4f50"),
            headers=headers,
        )
    )
    assert err.code == Code.UNAUTHENTICATED


async def test_rejected_requests_change_nothing(client: CouponServiceClient) -> None:
    c = await create(client, total=2)
    for bad in ("", "u" * 129, "  ", "bob\n"):
        await error_of(
            client.issue_coupon(coupon_pb.IssueCouponRequest(campaign_id=c.id, user_id=bad))
        )
    campaign, coupons = await all_coupons(client, c.id, TOKEN)
    assert campaign.issued_count == 0 and coupons == []
    # Spaces inside an id, and characters beyond ASCII, are an id's own.
    for good in ("a b", "쿠폰 사용자"):
        issued = await client.issue_coupon(
            coupon_pb.IssueCouponRequest(campaign_id=c.id, user_id=good)
        )
        assert issued.coupon is not None and issued.coupon.user_id == good


def test_connect_json_works_with_plain_http(server: ServerProcess) -> None:
    """What the README's curl examples do."""
    response = httpx.post(
        f"{server.url}/coupon.v1.CouponService/CreateCampaign",
        json={"name": "curl", "totalCoupons": "2", "startsAt": "2026-01-01T00:00:00Z"},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    campaign_id = response.json()["campaign"]["id"]
    issued = httpx.post(
        f"{server.url}/coupon.v1.CouponService/IssueCoupon",
        json={"campaignId": campaign_id, "userId": "curl-user"},
    )
    assert issued.status_code == 200 and issued.json()["coupon"]["userId"] == "curl-user"
    bad = httpx.post(
        f"{server.url}/coupon.v1.CouponService/IssueCoupon",
        json={"campaignId": campaign_id, "userId": ""},
    )
    assert bad.status_code == 400
    assert bad.json()["code"] == "invalid_argument"


def test_health_and_readiness(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ok"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_head_on_health_answers_as_get_without_the_body(
    server: ServerProcess, path: str
) -> None:
    """Load balancers and uptime checkers send HEAD (RFC 9110 §9.3.2)."""
    got = httpx.get(server.url + path, timeout=10)
    status, fields, rest = await head(server.url, path)
    assert status.startswith(b"HTTP/1.1 %d" % got.status_code), status
    assert rest == b""
    assert fields["content-length"] == got.headers["content-length"] == str(len(got.content))
    assert fields["content-type"] == got.headers["content-type"]
    # The same over HTTP/2, where no server below the app drops a body.
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as h2:
        response = await h2.head(server.url + path)
    assert response.http_version == "HTTP/2"
    assert response.status_code == got.status_code and response.content == b""
    assert response.headers["content-length"] == got.headers["content-length"]


async def test_thousands_of_concurrent_issues_keep_i1_to_i4(client: CouponServiceClient) -> None:
    import random
    from collections import Counter

    total = 250
    c = await create(client, total=total)
    rng = random.Random(11)
    users = [f"u{rng.randrange(700)}" for _ in range(3000)]
    gate = asyncio.Semaphore(300)

    async def one(user: str) -> tuple[str, str, bool]:
        async with gate:
            try:  # as a well-behaved client: `unavailable` is retried when the answer says
                r = await issue_retrying(client, c.id, user)
            except ConnectError as exc:
                return user, f"error:{exc.code.value}", False
            assert r.coupon is not None
            return user, r.coupon.code, r.already_issued

    results = await asyncio.gather(*(one(u) for u in users))
    errors = Counter(code for _, code, _ in results if code.startswith("error:"))
    assert set(errors) <= {"error:resource_exhausted"}, errors
    campaign, listed = await all_coupons(client, c.id, TOKEN, page_size=100)
    assert len(listed) == total == campaign.issued_count  # I1, and the stock is used up
    assert len({x.code for x in listed}) == total  # I2
    assert len({x.user_id for x in listed}) == total  # I4
    assert all(  # I3
        x.issued_at is not None
        and c.starts_at is not None
        and x.issued_at.to_datetime() >= c.starts_at.to_datetime()
        for x in listed
    )
    by_user = {x.user_id: x.code for x in listed}
    for user, code, _ in results:
        if not code.startswith("error:"):
            assert by_user[user] == code
    first = Counter(user for user, code, again in results if not again and "error" not in code)
    assert max(first.values()) == 1


async def test_compressed_requests_with_deadlines_are_served_by_the_full_protocol(
    server: ServerProcess, client: CouponServiceClient
) -> None:
    c = await create(client)
    plain = await client.issue_coupon(
        coupon_pb.IssueCouponRequest(campaign_id=c.id, user_id="both-ways")
    )
    async with CouponServiceClient(server.url) as gzip_client:  # gzip request bodies
        again = await gzip_client.issue_coupon(
            coupon_pb.IssueCouponRequest(campaign_id=c.id, user_id="both-ways"),
            timeout_ms=5000,
        )
    assert again.already_issued and again.coupon == plain.coupon


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/proto", b"\xff\xff\xff\x0f"),
        ("application/json", b"{not json"),
        ("application/json", b'{"campaignId": 42}'),
    ],
)
def test_undecodable_issue_bodies_are_invalid_argument(
    server: ServerProcess, content_type: str, body: bytes
) -> None:
    response = httpx.post(
        f"{server.url}/coupon.v1.CouponService/IssueCoupon",
        content=body,
        headers={"content-type": content_type},
    )
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_argument"
