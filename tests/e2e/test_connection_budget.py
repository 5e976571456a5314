"""A worker's connection budget, over real sockets to a real server started with few open
files: idle connections past the budget are closed to make room for new ones (those that
never sent a byte first, then the keep-alive connections idle longest, HTTP/2 ones with no
stream among them), never one with a request on its way, and the log says why."""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Iterator

import pytest

from coupon.entrypoints.http.budget import SEARCH_PAUSE
from harness.client import connect_client, create_campaign
from harness.raw_http import closed_by_peer, issue_request, open_connection, read_response
from harness.server import ServerProcess

pytestmark = pytest.mark.e2e
# The server's RLIMIT_NOFILE, soft and hard: its worker keeps half of so few for its own
# files and pools, and holds 150 connections at most.
OPEN_FILES = 300
BUDGET = 150
KEEP_ALIVE_CONNECTIONS = 170
H2_CONNECTIONS = 5
NEVER_SPOKEN = 200
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
GOAWAY = 0x7
# The budget's warning comes once a second at most, with the counts since the last.
LINE_EVERY = 1.5
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"


@pytest.fixture(scope="module")
def server(server_env: dict[str, str]) -> Iterator[ServerProcess]:
    # Room for the test's own sockets, well past the server's limit.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20_000), hard))
    with ServerProcess(
        env={**server_env, "COUPON_KEEPALIVE_SECONDS": "75"}, workers=1, open_files=OPEN_FILES
    ) as proc:
        yield proc


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(open_connection(url), 5)


def frame_types(data: bytes) -> list[int]:
    types = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        types.append(data[3])
        data = data[9 + length :]
    return types


def budget_lines(log: str) -> list[dict[str, object]]:
    return [
        entry
        for line in log.splitlines()
        if line.startswith("{") and "connection budget" in (entry := json.loads(line))["message"]
    ]


async def test_idle_connections_make_room_for_new_ones(server: ServerProcess) -> None:
    async with connect_client(server.url) as client:
        campaign = (await create_campaign(client, total=100, name="budget")).id
    # The oldest connection: an IssueCoupon whose body is still on its way.
    slow_reader, slow_writer = await connect(server.url)
    request = issue_request(campaign, "slow-user")
    slow_writer.write(request[:-5])
    await slow_writer.drain()
    # HTTP/2 connections with no stream, then HTTP/1.1 keep-alive ones after one request,
    # past the budget: the idle longest are closed as the newest arrive.
    h2 = []
    for _ in range(H2_CONNECTIONS):
        reader, writer = await connect(server.url)
        writer.write(PREFACE + EMPTY_SETTINGS)
        settings = await asyncio.wait_for(reader.readexactly(9), 5)  # the server's SETTINGS
        await reader.readexactly(int.from_bytes(settings[:3], "big"))
        h2.append((reader, writer))
    kept = []
    for _ in range(KEEP_ALIVE_CONNECTIONS):
        reader, writer = await connect(server.url)
        writer.write(HEALTHZ)
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
        kept.append((reader, writer))
    for reader, _ in h2:
        # GOAWAY, then a clean close: the client opens another when it needs one.
        rest = await asyncio.wait_for(reader.read(), 5)
        assert GOAWAY in frame_types(rest)
    for reader, _ in kept[:20]:
        assert await closed_by_peer(reader, 5), "the idle longest are closed, nothing written"
    for reader, writer in kept[-20:]:
        writer.write(HEALTHZ)
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 200

    # Connections that never send a byte, well past the budget and the worker's limit.
    silent = [await connect(server.url) for _ in range(NEVER_SPOKEN)]
    for _ in range(5):
        reader, writer = await connect(server.url)
        writer.write(HEALTHZ)
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
        writer.close()
    # Closed cleanly, nothing written (at EOF with nothing to read): awaited, as the
    # closes reach this end of the sockets.
    give_up = asyncio.get_running_loop().time() + 10
    while (closed := sum(1 for reader, _ in silent if reader.at_eof())) < NEVER_SPOKEN - BUDGET:
        assert asyncio.get_running_loop().time() < give_up, closed
        await asyncio.sleep(0.05)

    # The request on its way was never cut: it completes, and its coupon is answered.
    slow_writer.write(request[-5:])
    answer = await asyncio.wait_for(read_response(slow_reader), 10)
    assert answer.status == 200, answer
    assert answer.json()["coupon"]["userId"] == "slow-user"

    lines = budget_lines(server.log(tail=1_000_000))
    assert lines, server.log()
    assert lines[0]["level"] == "warning"
    assert lines[0]["budget"] == BUDGET and lines[0]["open_files_limit"] == OPEN_FILES
    assert sum(int(line["idle_closed"]) for line in lines) >= 1
    # And /metrics counts them, for the dashboards an operator watches.
    assert server.metric("coupon_connections_closed_total", reason="budget_idle") >= (
        NEVER_SPOKEN - BUDGET
    )
    for _, writer in [*h2, *kept, *silent]:
        writer.close()
    slow_writer.close()


async def test_with_no_idle_connection_a_new_one_is_closed_at_once(
    server: ServerProcess,
) -> None:
    """Every connection held has a request on its way: none is cut, and a new one is closed
    at once rather than left unanswered; room comes back as requests end."""
    begun = []
    for _ in range(BUDGET):
        reader, writer = await connect(server.url)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        begun.append((reader, writer))
    await asyncio.sleep(0.5)
    reader, writer = await connect(server.url)
    assert await closed_by_peer(reader, 5), "closed at once, nothing written"
    writer.close()
    for reader, writer in begun:
        writer.write(b"Host: test\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
    # Now kept alive, idle: they make room, once the pause after the search that found
    # none idle is over (a search a new connection, with every connection busy, would cost).
    await asyncio.sleep(SEARCH_PAUSE)
    reader, writer = await connect(server.url)
    writer.write(HEALTHZ)
    assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
    writer.close()
    await asyncio.sleep(LINE_EVERY)
    lines = budget_lines(server.log(tail=1_000_000))
    assert sum(int(line["new_refused"]) for line in lines) >= 1, server.log()
    assert server.metric("coupon_connections_closed_total", reason="budget_full") >= 1
    for _, writer in begun:
        writer.close()
