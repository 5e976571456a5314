"""CreateCampaign is safe to retry: a repeat with the same request_id answers the campaign
the first call created and creates nothing, over a real socket, against a real server (the
memory backend, and PostgreSQL/Redis with two worker processes); the operators' command
line sends a request id with every create and retries, with it, a create whose answer was
lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from coupon.gen.coupon.v1 import coupon_pb
from coupon.gen.coupon.v1.coupon_connect import CouponServiceClient
from harness.client import admin, connect_client, in_seconds
from harness.proxy import LoopProxy
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
        ({"name": "another name"}, "name"),
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
    if "name" in changed:
        changed = {**changed, "name": unique(str(changed["name"]))}
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


# --- the operators' command line ----------------------------------------------------------


class LosesAnswers(LoopProxy):
    """A TCP proxy in front of the server that loses the answers to CreateCampaign calls:
    the first `lose` connections that carry one are reset once the server has answered
    (`how="reset"`: the call was done, its answer never arrives), or their answers are
    held back (`how="silent"`: the caller's time-out ends the wait). Everything else goes
    through. It keeps the bytes each connection sent."""

    def __init__(self, target_port: int, *, lose: int, how: str) -> None:
        self.target_port = target_port
        self.url = ""
        self._lose = lose
        self._how = how
        self.sent: list[bytes] = []
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.sent)
        self.sent.append(b"")
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def upward() -> None:
            with contextlib.suppress(Exception):
                while data := await reader.read(65536):
                    self.sent[index] += data
                    up_writer.write(data)
                    await up_writer.drain()
            up_writer.close()

        async def downward() -> None:
            with contextlib.suppress(Exception):
                while data := await up_reader.read(65536):
                    if b"/CreateCampaign" in self.sent[index] and self._lose > 0:
                        self._lose -= 1
                        if self._how == "reset":
                            writer.transport.abort()
                            up_writer.transport.abort()
                            return
                        self._hold(writer)
                        return
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(upward(), downward())

    def _hold(self, writer: asyncio.StreamWriter) -> None:
        """The answer goes nowhere; the connection stays open until the caller leaves."""

    def creates(self) -> list[coupon_pb.CreateCampaignRequest]:
        """The CreateCampaign requests sent through, in order (HTTP/1.1, binary protobuf)."""
        found = []
        for sent in self.sent:
            rest = sent
            while b"\r\n\r\n" in rest:
                head, _, rest = rest.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body, rest = rest[:length], rest[length:]
                if b"/CreateCampaign " in head.split(b"\r\n", 1)[0]:
                    found.append(coupon_pb.CreateCampaignRequest.from_binary(body))
        return found


@contextlib.contextmanager
def losing(server: ServerProcess, *, lose: int, how: str = "reset") -> Iterator[LosesAnswers]:
    proxy = LosesAnswers(int(server.url.rsplit(":", 1)[1]), lose=lose, how=how)
    try:
        yield proxy
    finally:
        proxy.close()


def campaigns(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env["COUPON_ADMIN_TOKEN"] = TOKEN
    return subprocess.run(
        [sys.executable, "-m", "coupon", "campaigns", "--url", url, *args],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


STARTS = "2026-01-01T00:00:00Z"


def create_args(name: str, *extra: str) -> list[str]:
    return ["--json", "create", "--name", name, "--coupons", "5", "--starts-at", STARTS, *extra]


@pytest.mark.parametrize("how", ["reset", "silent"])
async def test_the_cli_retries_a_create_whose_answer_was_lost_and_makes_one_campaign(
    server: ServerProcess, client: CouponServiceClient, how: str
) -> None:
    name = unique(f"lost answer {how}")
    with losing(server, lose=1, how=how) as proxy:
        result = await asyncio.to_thread(campaigns, proxy.url, "--timeout", "2", *create_args(name))
        sent = proxy.creates()
    assert result.returncode == 0, result.stderr
    why = "the connection failed" if how == "reset" else "no answer within 2s"
    assert result.stderr == (
        f"coupon: CreateCampaign failed ({why}); retrying in 0.5s with the same request id "
        "(retry 1 of 3)\n"
    ), result.stderr
    assert len(sent) == 2 and sent[0].request_id == sent[1].request_id
    assert uuid.UUID(sent[0].request_id)  # a fresh UUID
    assert [c.id for c in await named(client, name)] == [
        coupon_pb.CreateCampaignResponse.from_json(result.stdout).campaign.id  # type: ignore[union-attr]
    ]


async def test_the_cli_gives_up_after_three_retries_with_one_campaign_made(
    server: ServerProcess, client: CouponServiceClient
) -> None:
    name = unique("every answer lost")
    with losing(server, lose=10) as proxy:
        result = await asyncio.to_thread(campaigns, proxy.url, *create_args(name))
        sent = proxy.creates()
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines == [
        f"coupon: CreateCampaign failed (the connection failed); retrying in {delay} with the "
        f"same request id (retry {n} of 3)"
        for n, delay in enumerate(["0.5s", "1s", "2s"], start=1)
    ] + [f"coupon: cannot reach the service at {proxy.url}: the connection failed"], lines
    assert len(sent) == 4 and len({s.request_id for s in sent}) == 1
    # Each of the four reached the service; one campaign came of them.
    assert len(await named(client, name)) == 1


async def test_a_script_run_twice_with_one_request_id_makes_one_campaign(
    server: ServerProcess, client: CouponServiceClient
) -> None:
    name, request_id = unique("script"), f"nightly-{uuid.uuid4()}"
    runs = [
        await asyncio.to_thread(
            campaigns, server.url, *create_args(name, "--request-id", request_id)
        )
        for _ in range(2)
    ]
    ids = [coupon_pb.CreateCampaignResponse.from_json(r.stdout).campaign.id for r in runs]  # type: ignore[union-attr]
    assert all(r.returncode == 0 and r.stderr == "" for r in runs)
    assert ids[0] == ids[1] and [c.id for c in await named(client, name)] == ids[:1]

    other = await asyncio.to_thread(
        campaigns, server.url, "create", "--name", name, "--coupons", "6", "--starts-at",
        STARTS, "--request-id", request_id,
    )  # fmt: skip
    assert other.returncode == 1 and other.stdout == ""
    assert other.stderr.startswith("coupon: already_exists: request_id: "), other.stderr
    assert ids[0] in other.stderr and "different total_coupons" in other.stderr
    assert len(other.stderr.splitlines()) == 1


async def test_a_relative_time_rerun_with_a_request_id_says_why_it_differs(
    server: ServerProcess,
) -> None:
    """`now` and +N are read anew on each run: a rerun asks for another start."""
    name, request_id = unique("relative"), f"rerun-{uuid.uuid4()}"
    args = ["create", "--name", name, "--coupons", "5", "--starts-at", "+1h"]
    first = await asyncio.to_thread(campaigns, server.url, *args, "--request-id", request_id)
    assert first.returncode == 0, first.stderr
    again = await asyncio.to_thread(campaigns, server.url, *args, "--request-id", request_id)
    assert again.returncode == 1
    first_line, hint = again.stderr.splitlines()
    assert first_line.startswith("coupon: already_exists: request_id: ")
    assert "different starts_at" in first_line
    assert hint == (
        "coupon: 'now' and +N times are read anew on every run: give --starts-at and "
        "--ends-at as ISO 8601 times with --request-id"
    )


async def test_each_create_of_the_cli_sends_a_request_id_of_its_own(
    server: ServerProcess, client: CouponServiceClient
) -> None:
    name = unique("fresh ids")
    with losing(server, lose=0) as proxy:
        for _ in range(2):
            result = await asyncio.to_thread(campaigns, proxy.url, *create_args(name))
            assert result.returncode == 0 and result.stderr == "", result.stderr
        sent = proxy.creates()
    assert len(sent) == 2 and sent[0].request_id != sent[1].request_id
    assert all(uuid.UUID(s.request_id) for s in sent)
    assert len(await named(client, name)) == 2


def test_an_empty_request_id_is_a_usage_error(server: ServerProcess) -> None:
    result = campaigns(server.url, *create_args("empty id", "--request-id", ""))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "coupon: --request-id must not be empty (leave it out for a fresh one)\n"
    )
